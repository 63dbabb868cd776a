"""``prefopt-compare RUN_DIRS...``: one table and two plots from finished training runs, aggregated over seeds.

    prefopt-compare outputs/2026-11-21/20-36-09 outputs/2026-11-21/20-41-30     # run dirs
    prefopt-compare multirun/2026-11-21/21-00-00                                 # a sweep dir: its runs
    prefopt-compare runs/ --group loss.name,reward.mode --param loss.beta --x eval/kl --y eval/reward/mean

Each argument is a run dir (it holds ``summary.json``, the resolved ``config.yaml`` and ``metrics.jsonl``) or a dir
whose runs lie one or two levels below it (a Hydra sweep, a recipe's ``METHOD/beta=B/seed=S`` tree). A dir that has a
``config.yaml`` or ``metrics.jsonl`` but no ``summary.json`` (an unfinished or crashed run) is skipped and counted.

Runs are grouped by a *method* (``--group``, dotted config keys; default ``loss.name``, plus ``reward.mode`` for runs
whose reward config has a ``mode``) and a *parameter* (``--param``, default ``loss.beta``); the runs of a group (the
seeds, ``trainer.seed``) are aggregated as mean ± std (sample standard deviation, n − 1; n is shown). Metrics are the
final evaluation values (the last line of ``metrics.jsonl`` with ``eval/`` keys) of ``--metrics`` (default: every
``eval/*`` key present) and the training time in seconds from ``summary.json``. A metric a run lacks is left out of
that run's aggregate; a group where no run has it gets a blank cell.

Writes to ``--out`` (default ``compare/``): ``compare.md`` (the Markdown table, also printed), ``compare.csv``,
``frontier.png`` (``--y`` against ``--x``, one series per method over the parameter values, error bars over seeds,
points annotated with the parameter) and ``curves.png`` (``--y`` against the step from the evaluation lines, one line
per (method, parameter), and the train metric ``--curve`` against the step). Unless given, the plotted metrics are
chosen from what every run logged: sampled gold reward against sampled KL where runs sampled, else reward accuracy
against the chosen completions' log-prob; the train curve is the online reward, else the reward accuracy, and the raw
loss only when every run trains the same loss (losses of different methods have different scales). Exit code 2 with
one line
``prefopt-compare: error: ...`` when an argument is missing or holds no run.

From Python: ``rows = prefopt.compare.compare(["runs/"], out="compare")`` (plain dicts, one per group).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt import tables
from prefopt.tables import markdown_table, pyplot
from prefopt.tables import styles as series_styles

__all__ = [
    "CompareError",
    "Run",
    "find_runs",
    "load_run",
    "aggregate",
    "Comparison",
    "run_comparison",
    "compare",
    "markdown",
    "write_csv",
    "plot_frontier",
    "plot_curves",
    "main",
    "cli",
]

PROG = "prefopt-compare"
SUMMARY, CONFIG, METRICS = "summary.json", "config.yaml", "metrics.jsonl"
TIME_METRIC = "seconds"  # training wall time from summary.json
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))


class CompareError(ValueError):
    """A user error: printed as one line, exit code 2."""


# --------------------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    evals: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl lines with eval/ keys, in order
    train: list[dict[str, Any]] = field(default_factory=list)  # training lines (a loss or train metrics)
    method: str = ""
    group_values: tuple[Any, ...] = ()
    param: Any = None

    @property
    def final_eval(self) -> dict[str, Any]:
        return self.evals[-1] if self.evals else {}

    def value(self, metric: str) -> float | None:
        """The final value of ``metric``: ``seconds`` from summary.json, else the last evaluation line."""
        raw = self.summary.get(TIME_METRIC) if metric == TIME_METRIC else self.final_eval.get(metric)
        return _number(raw)

    @property
    def seed(self) -> Any:
        return lookup(self.config, "trainer.seed")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def lookup(config: Mapping[str, Any], key: str) -> Any:
    """``config["a"]["b"]`` for ``key = "a.b"``; None when any part is missing."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _is_run(path: Path) -> bool:
    return (path / SUMMARY).is_file()


def _looks_like_run(path: Path) -> bool:
    return (path / CONFIG).is_file() or (path / METRICS).is_file()


def find_runs(paths: Iterable[str | Path], depth: int = 2) -> tuple[list[Path], list[Path]]:
    """Run dirs (with ``summary.json``) among ``paths`` and up to ``depth`` levels below each, and the dirs skipped
    for lacking ``summary.json`` (they hold a ``config.yaml`` or ``metrics.jsonl``). Hidden dirs are not searched,
    nor are run dirs' own subdirs. Raises ``CompareError`` for a missing path or one with no run."""
    runs: list[Path] = []
    skipped: list[Path] = []
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise CompareError(f"{root}: no such directory")
        if not root.is_dir():
            raise CompareError(f"{root}: not a directory (pass a run dir or a sweep dir)")
        found: list[Path] = []
        missing: list[Path] = []
        level = [root]
        for current_depth in range(depth + 1):
            below = []
            for directory in level:
                if _is_run(directory):
                    found.append(directory)
                    continue
                if _looks_like_run(directory):
                    missing.append(directory)
                    continue
                if current_depth < depth:
                    below += sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
            level = below
        if not found:
            extra = f"; {len(missing)} dir(s) without {SUMMARY} skipped" if missing else ""
            raise CompareError(f"{root}: no runs ({SUMMARY}) in it or up to {depth} levels below{extra}")
        runs += [p for p in found if p.resolve() not in {r.resolve() for r in runs}]
        skipped += missing
    return runs, skipped


def load_run(path: str | Path) -> Run:
    """A run dir's summary, resolved config and metrics (sample tables and malformed lines ignored)."""
    from omegaconf import OmegaConf

    path = Path(path)
    try:
        summary = json.loads((path / SUMMARY).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CompareError(f"{path / SUMMARY}: cannot read ({error})") from None
    config: dict[str, Any] = {}
    if (path / CONFIG).is_file():
        loaded = OmegaConf.to_container(OmegaConf.load(path / CONFIG), resolve=False)
        config = loaded if isinstance(loaded, dict) else {}
    run = Run(path, config, summary if isinstance(summary, dict) else {})
    if (path / METRICS).is_file():
        for line in (path / METRICS).read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: ignore
            if not isinstance(record, dict) or "samples" in record or "step" not in record:
                continue
            if any(k.startswith("eval/") for k in record):
                run.evals.append(record)
            elif any(k != "step" for k in record):
                run.train.append(record)
    return run


# --------------------------------------------------------------------------------------------------- aggregation
def _method_keys(run: Run, group: Sequence[str] | None) -> list[str]:
    if group:
        return list(group)
    keys = ["loss.name"]
    if isinstance(lookup(run.config, "reward"), Mapping) and lookup(run.config, "reward.mode") is not None:
        keys.append("reward.mode")
    return keys


def _text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _sort_key(value: Any) -> tuple:
    if value is None:
        return (2, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _stats(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def default_metrics(runs: Sequence[Run]) -> list[str]:
    """Every ``eval/*`` key with a number in some run's final evaluation, sorted."""
    keys = {k for run in runs for k, v in run.final_eval.items() if k.startswith("eval/") and _number(v) is not None}
    return sorted(keys)


def aggregate(
    runs: Sequence[Run],
    *,
    group: Sequence[str] | None = None,
    param: str = "loss.beta",
    metrics: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per (method, parameter value): ``method``, the group keys, ``param``, ``n``, ``seeds``, ``runs`` and,
    for each metric and ``seconds``, ``<metric>`` (mean), ``<metric>:std`` and ``<metric>:n`` (runs that have it)."""
    metrics = list(metrics) if metrics is not None else default_metrics(runs)
    groups: dict[tuple[str, Any], list[Run]] = {}
    for run in runs:
        keys = _method_keys(run, group)
        run.group_values = tuple(lookup(run.config, k) for k in keys)
        run.method = " / ".join(_text(v) for v in run.group_values)  # "dpo", "dpo / hierarchical"
        run.param = lookup(run.config, param)
        groups.setdefault((run.method, _freeze(run.param)), []).append(run)
    rows = []
    for (method, _), members in sorted(groups.items(), key=lambda item: (item[0][0], _sort_key(item[1][0].param))):
        first = members[0]
        row: dict[str, Any] = {"method": method, param: first.param, "n": len(members)}
        seeds = [m.seed for m in members]
        row["seeds"] = ",".join(_text(s) for s in sorted(seeds, key=_sort_key))
        for name in [*metrics, TIME_METRIC]:
            values = [v for v in (m.value(name) for m in members) if v is not None]
            mean, std = _stats(values)
            row[name], row[f"{name}:std"], row[f"{name}:n"] = mean, std, len(values)
        row["runs"] = " ".join(str(m.path) for m in members)
        rows.append(row)
    return rows


def _freeze(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        return json.dumps(value, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------------------------- output
def _cell(mean: float | None, std: float | None, have: int, n: int) -> str:
    if mean is None:
        return ""
    text = f"{mean:.4g}" + (f" ± {std:.2g}" if std is not None else "")
    return text + (f" ({have}/{n})" if have < n else "")


def markdown(rows: Sequence[Mapping[str, Any]], param: str, metrics: Sequence[str]) -> str:
    """The table: method | param | n | seeds | each metric as mean ± std | train seconds."""
    header = ["method", param, "n", "seeds", *metrics, "train s"]
    cells = [
        [row["method"], _text(row[param]), str(row["n"]), row["seeds"]]
        + [_cell(row[name], row[f"{name}:std"], row[f"{name}:n"], row["n"]) for name in [*metrics, TIME_METRIC]]
        for row in rows
    ]
    return markdown_table(header, cells)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path, param: str, metrics: Sequence[str]) -> None:
    """``method, <param>, n, seeds``, then ``<metric>_mean, <metric>_std, <metric>_n`` per metric and ``seconds``,
    then ``runs``; blank where there is no value."""
    columns = ["method", param, "n", "seeds"]
    for name in [*metrics, TIME_METRIC]:
        columns += [f"{name}_mean", f"{name}_std", f"{name}_n"]
    columns.append("runs")
    records = []
    for row in rows:
        out = [row["method"], row[param], row["n"], row["seeds"]]
        for name in [*metrics, TIME_METRIC]:
            out += [row[name], row[f"{name}:std"], row[f"{name}:n"]]
        records.append([*out, row["runs"]])
    tables.write_csv(path, columns, records)


def _short(param: str) -> str:
    last = param.split(".")[-1]
    return {"beta": "β", "kl_coef": "β"}.get(last, last)


def plot_frontier(
    rows: Sequence[Mapping[str, Any]], path: Path, *, x: str, y: str, param: str, title: str | None = None
) -> list[str]:
    """``y`` against ``x`` per method over the parameter values, error bars over seeds, points annotated with the
    parameter. Returns the methods left out (no run has both metrics)."""
    plt = pyplot()
    methods = sorted({row["method"] for row in rows})
    styles = series_styles(methods)
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    missing = []
    for method in methods:
        points = [r for r in rows if r["method"] == method and r[x] is not None and r[y] is not None]
        if not points:
            missing.append(method)
            continue
        points.sort(key=lambda r: _sort_key(r[param]))
        xs, ys = [r[x] for r in points], [r[y] for r in points]
        xerr = [r[f"{x}:std"] or 0.0 for r in points]
        yerr = [r[f"{y}:std"] or 0.0 for r in points]
        style = styles[method]
        many = any(e > 0 for e in xerr + yerr)
        ax.errorbar(
            xs,
            ys,
            xerr=xerr if many else None,
            yerr=yerr if many else None,
            color=style["color"],
            marker=style["marker"],
            markersize=7,
            linewidth=1.5,
            capsize=3,
            label=method,
        )
        for r, px, py in zip(points, xs, ys, strict=True):
            if r[param] is not None:
                ax.annotate(
                    f"{_short(param)}={_text(r[param])}",
                    (px, py),
                    textcoords="offset points",
                    xytext=(5, 5),
                    fontsize=7,
                    color=style["color"],
                )
    if len(missing) == len(methods):
        ax.text(0.5, 0.5, f"no run has both {x} and {y}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title or f"{y} vs {x} (mean ± std over seeds; labels: {param})")
    ax.grid(True, alpha=0.3)
    if len(missing) < len(methods):
        ax.legend(fontsize=8, title="method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return missing


def _mean_curve(runs: Sequence[Run], metric: str, lines: str) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over the runs of ``metric`` at each step where some run logged it."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for record in getattr(run, lines):
            value = _number(record.get(metric))
            if value is not None and isinstance(record.get("step"), int):
                by_step.setdefault(record["step"], []).append(value)
    steps = sorted(by_step)
    stats = [_stats(by_step[s]) for s in steps]
    return steps, [m for m, _ in stats], [s or 0.0 for _, s in stats]


def plot_curves(
    runs: Sequence[Run], path: Path, *, y: str, param: str, curve: str | None = None, title: str | None = None
) -> None:
    """``y`` against the step from the evaluation lines (left) and the train metric ``curve`` (right, if given);
    one line per (method, parameter), the mean over seeds with a ±std band."""
    plt = pyplot()
    panels = [("evals", y, "evaluation")] + ([("train", curve, "training")] if curve else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), squeeze=False)
    methods = sorted({run.method for run in runs})
    styles = series_styles(methods)
    groups: dict[tuple[str, Any], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.method, _freeze(run.param)), []).append(run)
    params = sorted({key[1] for key in groups}, key=_sort_key)
    for ax, (lines, metric, what) in zip(axes[0], panels, strict=True):
        drawn = 0
        for (method, value), members in sorted(groups.items(), key=lambda i: (i[0][0], _sort_key(i[0][1]))):
            steps, means, stds = _mean_curve(members, metric, lines)
            if not steps:
                continue
            style = styles[method]
            label = method + (f" {_short(param)}={_text(members[0].param)}" if members[0].param is not None else "")
            ax.plot(
                steps,
                means,
                color=style["color"],
                marker=style["marker"],
                markersize=4 if len(steps) < 30 else 0,
                linestyle=LINESTYLES[params.index(value) % len(LINESTYLES)],
                label=label,
            )
            if any(stds):
                low = [m - s for m, s in zip(means, stds, strict=True)]
                high = [m + s for m, s in zip(means, stds, strict=True)]
                ax.fill_between(steps, low, high, color=style["color"], alpha=0.15, linewidth=0)
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, f"no run logged {metric}", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=7)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} during {what}")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title or "mean over seeds (band: ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- the API
@dataclass
class Comparison:
    rows: list[dict[str, Any]]
    runs: list[Run]
    skipped: list[Path]
    metrics: list[str]
    files: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    table: str = ""


# What to plot when not told, first choice first: sampled gold reward against sampled KL (online runs, sample_eval,
# the recipes); otherwise what every offline run logs and means the same for every loss (reward accuracy against the
# chosen completions' log-prob); the train curve: the reward being optimised, else the reward accuracy, and the raw
# loss only when every run trains the same loss (losses of different methods live on different scales).
X_CHOICES = ("eval/kl", "eval/logps/chosen")
Y_CHOICES = ("eval/reward/mean", "eval/rewards/accuracies")
CURVE_CHOICES = ("online/reward/mean", "rewards/accuracies")


def pick_metrics(runs: Sequence[Run], x: str | None, y: str | None, curve: str | None) -> tuple[str, str, str | None]:
    """``x``, ``y`` and ``curve``, each the one given or the first of its choices that every run logged."""

    def everywhere(name: str, lines: str) -> bool:
        return all(any(name in line for line in getattr(run, lines)) for run in runs)

    x = x or next((m for m in X_CHOICES if everywhere(m, "evals")), X_CHOICES[0])
    y = y or next((m for m in Y_CHOICES if everywhere(m, "evals")), Y_CHOICES[0])
    if curve is None:
        one_loss = len({lookup(run.config, "loss.name") for run in runs}) == 1
        choices = (*CURVE_CHOICES, "loss") if one_loss else CURVE_CHOICES
        curve = next((m for m in choices if everywhere(m, "train")), None)
    return x, y, curve or None


def run_comparison(
    run_dirs: Sequence[str | Path],
    *,
    group: Sequence[str] | None = None,
    param: str = "loss.beta",
    metrics: Sequence[str] | None = None,
    out: str | Path | None = None,
    x: str | None = None,
    y: str | None = None,
    curve: str | None = None,
    depth: int = 2,
) -> Comparison:
    """Find, load, aggregate; write the outputs when ``out`` is given. ``x``, ``y`` and ``curve`` default to what the
    runs logged (:func:`pick_metrics`); ``curve=""`` draws no train curve. Raises ``CompareError`` on user errors."""
    if not run_dirs:
        raise CompareError("give at least one run dir or sweep dir")
    paths, skipped = find_runs(run_dirs, depth=depth)
    runs = [load_run(p) for p in paths]
    x, y, curve = pick_metrics(runs, x, y, curve)
    metrics = list(metrics) if metrics else default_metrics(runs)
    rows = aggregate(runs, group=group, param=param, metrics=metrics)
    result = Comparison(rows, runs, skipped, metrics)
    result.table = markdown(rows, param, metrics)
    present = set(default_metrics(runs))
    for name in metrics:
        if name not in present:
            result.warnings.append(f"no run has a final value of {name}: its column is blank")
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = {name: out / name for name in ("compare.md", "compare.csv", "frontier.png", "curves.png")}
        files["compare.md"].write_text(result.table + "\n")
        # the frontier needs x and y aggregated even when they are not table columns
        plotted = aggregate(runs, group=group, param=param, metrics=sorted({x, y}))
        left_out = plot_frontier(plotted, files["frontier.png"], x=x, y=y, param=param)
        if left_out:
            result.warnings.append(f"frontier: no final {x} and {y} for {', '.join(left_out)}")
        write_csv(rows, files["compare.csv"], param, metrics)
        plot_curves(runs, files["curves.png"], y=y, param=param, curve=curve)
        result.files = {k: str(v) for k, v in files.items()}
    return result


def compare(run_dirs: Sequence[str | Path], **kwargs: Any) -> list[dict[str, Any]]:
    """The aggregated rows (plain dicts, one per method and parameter value); ``out=DIR`` also writes the files.
    Keyword arguments as :func:`run_comparison`."""
    return run_comparison(run_dirs, **kwargs).rows


# ---------------------------------------------------------------------------------------------------- the CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compare finished prefopt-train runs: a table (mean ± std over seeds), a frontier plot and "
        "learning curves.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs, or dirs with runs 1-2 levels below")
    parser.add_argument(
        "--group",
        default=None,
        help="comma-separated dotted config keys naming a method (default: loss.name, plus reward.mode when the "
        "reward config has a mode)",
    )
    parser.add_argument("--param", default="loss.beta", help="dotted config key of the swept parameter (loss.beta)")
    parser.add_argument(
        "--metrics", default=None, help="comma-separated final metrics for the table (default: every eval/* key)"
    )
    parser.add_argument("--x", default=None, help="frontier x metric (eval/kl, else eval/logps/chosen)")
    parser.add_argument(
        "--y", default=None, help="frontier y metric and eval curve (eval/reward/mean, else eval/rewards/accuracies)"
    )
    parser.add_argument(
        "--curve",
        default=None,
        help="train metric of the right curves panel (online/reward/mean, else rewards/accuracies; '' = none)",
    )
    parser.add_argument("--out", default="compare", help="output dir (compare/)")
    parser.add_argument("--depth", type=int, default=2, help="levels searched below each argument for runs (2)")
    return parser


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()] or None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); returns 0, or exits 2 on a user error."""
    args = _parser().parse_args(argv)
    try:
        result = run_comparison(
            args.run_dirs,
            group=_split(args.group),
            param=args.param,
            metrics=_split(args.metrics),
            out=args.out,
            x=args.x,
            y=args.y,
            curve=args.curve,
            depth=args.depth,
        )
    except CompareError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(result.table)
    groups = len(result.rows)
    print(f"\n{PROG}: {len(result.runs)} run(s) in {groups} group(s)", end="")
    if result.skipped:
        shown = ", ".join(str(p) for p in result.skipped[:5]) + (", ..." if len(result.skipped) > 5 else "")
        print(f"; skipped {len(result.skipped)} dir(s) without {SUMMARY}: {shown}", end="")
    print()
    for warning in result.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    print(f"wrote {', '.join(result.files.values())}")
    return 0


def cli() -> None:
    """Console entry point ``prefopt-compare``."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
