"""The exact testbed's report: the setup table, one fixed-point table per β (every registered pairwise loss, described
by its registry entry), the overfitting table under deterministic preferences, and ``exact.md`` / ``exact.csv`` /
``exact.png``. Nothing here names a loss: what a loss is, what its optimum is and whether it is piecewise linear come
from ``losses.spec(name)``; which losses run comes from the config.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

import losses
from prefopt import tables
from recipes.exact.testbed import (
    GROUP_REASON,
    SKIP_REASONS,
    Fit,
    Population,
    Problem,
    Unsupported,
    bind,
    dpo_optimum,
    fixed_point,
    ipo_least_squares,
    ipo_optimum,
    kl,
    log_grid,
    make_problem,
    sft_optimum,
    train_curve,
    tv,
    vertex_minimum,
)

__all__ = ["CONF_DIR", "Results", "setup_table", "fixed_point_table", "overfit_table", "compose", "run", "render"]

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf" / "recipe")
MATCH_TV = 1e-6


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10 ** (-digits) or abs(value) >= 1e5):
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    return tables.markdown_table(header, rows, cell=_fmt)


def _hparam_text(loss: losses.BoundLoss) -> str:
    """Every hyper-parameter of the bound loss (None omitted; a mapping of weights as ``w·name+...``)."""
    shown = {}
    modifiers = loss.spec.modifier_hparams  # WPO / LD-DPO / f-DPO: shown only when switched on
    for key, value in loss.hparams.items():
        if key in modifiers and value == modifiers[key]:
            continue
        if isinstance(value, Mapping):
            value = "+".join(f"{w:g}·{n}" for n, w in value.items())
        if value is not None:
            shown[key] = value
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()) or "—"


def _label(loss: losses.BoundLoss) -> str:
    """A short name for a run: the loss with β and the hyper-parameters not at their registered defaults."""
    defaults = {**loss.spec.modifier_hparams, **loss.spec.hparams}
    changed = {k: v for k, v in loss.hparams.items() if k == "beta" or v != defaults.get(k)}
    text = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changed.items())
    return f"{loss.name} ({text})" if text else loss.name


def _loss_hparams(cfg: DictConfig, name: str) -> dict[str, Any]:
    value = (cfg.get("hparams") or {}).get(name)
    return dict(OmegaConf.to_container(value, resolve=True)) if value is not None else {}


def _pairwise_names(cfg: DictConfig) -> tuple[list[str], list[tuple[str, str]]]:
    requested = list(losses.available()) if cfg.losses in ("all", None) else [str(n) for n in cfg.losses]
    names, skipped = [], []
    for name in requested:
        spec = losses.spec(name)  # unknown names raise UnknownLossError
        if name in set(cfg.get("skip") or []):
            skipped.append((name, "skipped by config"))
        elif spec.kind != "pair":
            skipped.append((name, SKIP_REASONS.get(spec.kind, GROUP_REASON)))
        else:
            names.append(name)
    return names, skipped


@dataclass
class Results:
    setup: str = ""
    sections: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # the CSV
    curves: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)  # run -> step -> metrics
    references: dict[str, float] = field(default_factory=dict)  # horizontal lines of the plot
    files: dict[str, str] = field(default_factory=dict)


def _fit_from_starts(pop: Population, starts: Mapping[str, Tensor], fcfg: DictConfig) -> tuple[Fit, str]:
    """L-BFGS from every start. The run from the first start (π_ref, where training starts) is reported unless another
    start reaches a clearly lower loss (a non-convex loss); the note then describes where the π_ref run stopped."""
    fits = {
        key: fixed_point(pop, init, max_evals=int(fcfg.max_evals), grad_tol=float(fcfg.grad_tol))
        for key, init in starts.items()
    }
    first_key = next(iter(starts))
    best_key = min(fits, key=lambda k: math.inf if math.isnan(fits[k].value) else fits[k].value)
    first, best = fits[first_key], fits[best_key]
    note = ""
    lower = best.value < first.value - 1e-4 * max(1.0, abs(best.value)) or math.isnan(first.value)
    if lower and tv(first.logp, best.logp) > 1e-3:
        reward = float((first.logp.exp() * pop.problem.reward).sum())
        divergence = kl(first.logp, pop.problem.ref_logp)
        note = (
            "non-convex: from π_ref L-BFGS stops at another stationary point "
            f"(loss {first.value:.4f} > {best.value:.4f} from {best_key}; "
            f"there E_π[r] = {reward:.4f}, KL(π‖π_ref) = {divergence:.4f})"
        )
    else:
        best = first
    best.evals = sum(f.evals for f in fits.values())
    if best.status == "converged" and not _attained(pop, best):
        best.status = "boundary"
    return best, note


def _attained(pop: Population, fit: Fit, far: Sequence[float] = (10.0, 100.0), tiny: float = 1e-12) -> bool:
    """Whether a stationary point with numerically vanished responses (π(y) < ``tiny``) is a minimum at finite θ:
    pushing those responses further toward 0 (their logits down by 10 and 100) must raise the loss. A loss whose
    infimum lies on the boundary of the simplex (unattained) stays flat or falls there: its gradient vanished by
    saturation, not at a minimum."""
    vanished = fit.logp < math.log(tiny)
    if not bool(vanished.any()):
        return True
    direction = -vanished.to(fit.logp.dtype)
    tolerance = 1e-12 * max(1.0, abs(fit.value))
    with torch.no_grad():
        return all(float(pop(torch.log_softmax(fit.logp + t * direction, 0))) > fit.value + tolerance for t in far)


def fixed_point_table(cfg: DictConfig, problem: Problem, beta: float, results: Results) -> str:
    fcfg = cfg.fit
    names, skipped = _pairwise_names(cfg)
    dpo_star, ipo_star = dpo_optimum(problem, beta), ipo_optimum(problem, beta)
    ipo_solved, sft_star = ipo_least_squares(problem, beta), sft_optimum(problem)
    starts = {"π_ref": problem.ref_logp, "π*_DPO": dpo_star}
    closed = {"π*_DPO": dpo_star, "π*_IPO": ipo_star, "SFT closed form": sft_star}  # a fixed point matching one
    header = [
        "loss",
        "hyper-parameters",
        "fixed point",
        "KL(π‖π*_DPO)",
        "KL(π‖π_ref)",
        "E_π[r]",
        "TV(π, π*_DPO)",
        "TV(π, π*_IPO)",
        "min π",
        "note",
    ]
    keys = ("kl_to_dpo_opt", "kl_to_ref", "expected_reward", "tv_to_dpo_opt", "tv_to_ipo_opt", "min_prob")
    rows: list[list[Any]] = []

    def add(name: str, hp: str, status: str, logp: Tensor, note: str, extra: dict | None = None) -> None:
        values = [
            kl(logp, dpo_star),
            kl(logp, problem.ref_logp),
            float((logp.exp() * problem.reward).sum()),
            tv(logp, dpo_star),
            tv(logp, ipo_star),
            float(logp.exp().min()),
        ]
        rows.append([name, hp, status, *values, note])
        results.rows.append(
            {
                "section": "fixed_point",
                "preferences": "bt",
                "loss": name,
                "beta": beta,
                "hparams": hp,
                "status": status,
                **dict(zip(keys, values, strict=True)),
                **(extra or {}),
                "note": note,
                "policy": " ".join(f"{p:.6g}" for p in logp.exp().tolist()),
            }
        )

    add("π_ref", "—", "reference", problem.ref_logp, "the reference policy (θ's starting point)")
    add("π*_DPO", f"β={beta:g}", "closed form", dpo_star, "π_ref·exp(r/β)/Z")
    gap = float((ipo_star - ipo_solved).abs().max())
    add("π*_IPO", f"β={beta:g}", "closed form", ipo_star, f"π_ref·exp(P(y≻μ)/β)/Z = least-squares solve ({gap:.0e})")
    for name in names:
        try:
            loss = bind(name, beta, _loss_hparams(cfg, name))
            pop = Population(loss, problem, "bt", batch_rows=int(fcfg.batch_rows))
        except Unsupported as error:
            skipped.append((name, str(error)))
            continue
        notes = [loss.spec.optimum]
        if loss.spec.piecewise_linear and problem.n <= int(fcfg.max_vertex_n):
            smooth = fixed_point(pop, problem.ref_logp, max_evals=int(fcfg.max_evals), grad_tol=float(fcfg.grad_tol))
            fit = vertex_minimum(pop)
            notes.append(
                f"exact vertex {fit.detail}, loss {fit.value:.4f}; L-BFGS stops at a kink (loss {smooth.value:.4f}, "
                f"TV {tv(smooth.logp, fit.logp):.2f} away)"
            )
        else:
            fit, local = _fit_from_starts(pop, starts, fcfg)
            notes.append(local)
        notes.append(pop.note)
        if float(fit.logp.exp().max()) > 0.999:
            y = int(fit.logp.argmax())
            notes.append(
                f"π ≈ δ at y = {y} (r = {float(problem.reward[y]):g}, π_ref = {float(problem.ref_logp[y].exp()):g})"
            )
        if fit.status == "boundary":
            notes.append(
                "infimum not attained: pushing the vanished responses further toward π(y) = 0 does not raise the loss; "
                f"the row is where L-BFGS stopped ({fit.evals} evaluations)"
            )
        if fit.status == "not converged":
            notes.append(f"‖∇θ‖ = {fit.grad_norm:.0e} after {fit.evals} evaluations")
        status = next(
            (
                f"= {label} (TV {tv(fit.logp, form):.0e})"
                for label, form in closed.items()
                if tv(fit.logp, form) < MATCH_TV
            ),
            fit.status,
        )
        add(
            name,
            _hparam_text(loss),
            status,
            fit.logp,
            "; ".join(n for n in notes if n),
            {"evals": fit.evals, "grad_norm": fit.grad_norm, "loss_value": fit.value},
        )
    text = [
        f"### Bradley–Terry preferences, β = {beta:g}",
        "",
        "fixed point: full-batch L-BFGS from π_ref (and from π*_DPO, kept only when it reaches a clearly lower loss); "
        "`= π*_DPO` / `= π*_IPO` / `= SFT closed form` when TV < 1e-6; `converged` ‖∇θ‖ < tol at a finite minimum; "
        "`boundary` the infimum lies at π(y) → 0 (unattained); `LP vertex` exact minimiser by vertex enumeration. "
        "β is passed to every loss with a `beta`; every hyper-parameter is shown; the note starts "
        "with the loss's registered optimum.",
        "",
        markdown_table(header, rows),
    ]
    if skipped:
        text += ["", "Not evaluated: " + "; ".join(f"`{n}` ({why})" for n, why in skipped) + "."]
    return "\n".join(text)


def overfit_table(cfg: DictConfig, problem: Problem, results: Results) -> str:
    ocfg = cfg.overfit
    kind = "deterministic"
    max_steps = int(ocfg.max_steps)
    report = sorted({int(s) for s in ocfg.report_steps if int(s) <= max_steps} | {max_steps})
    steps = log_grid(max_steps, report)
    best = problem.best
    vertex_kl = -float(problem.ref_logp[best])  # KL(δ_best ‖ π_ref): the largest KL(π‖π_ref) a table can reach
    results.references["vertex: all mass on the best response"] = vertex_kl
    header = [
        "run",
        *[f"KL(π‖π_ref) @ {s}" for s in report],
        f"KL(π_ref‖π) @ {report[-1]}",
        f"π(best) @ {report[-1]}",
        f"E_π[r] @ {report[-1]}",
        "end of training",
        "fixed point KL(π‖π_ref)",
    ]
    rows = []
    for run in ocfg.runs:
        run = dict(OmegaConf.to_container(run, resolve=True))
        name = str(run.pop("loss"))
        beta = float(run.pop("beta", ocfg.beta))
        hp = {**_loss_hparams(cfg, name), **run}
        loss = bind(name, beta, hp)
        pop = Population(loss, problem, kind, batch_rows=int(cfg.fit.batch_rows))
        label = _label(loss)
        curve, state = train_curve(
            pop,
            problem.ref_logp,
            steps=steps,
            lr=float(ocfg.lr),
            optimizer=str(ocfg.optimizer),
            update_tol=float(ocfg.update_tol),
        )
        metrics = {
            s: {
                "kl_to_ref": kl(lp, problem.ref_logp),
                "kl_ref_to_policy": kl(problem.ref_logp, lp),
                "p_best": float(lp[best].exp()),
                "expected_reward": float((lp.exp() * problem.reward).sum()),
                "max_log_ratio_gap": float((lp - problem.ref_logp).max() - (lp - problem.ref_logp).min()),
            }
            for s, lp in curve.items()
        }
        results.curves[label] = metrics
        target = _target(cfg, pop, problem, kind, beta, curve[max_steps], results, vertex_kl)
        last = metrics[report[-1]]
        rows.append(
            [
                label,
                *[metrics[s]["kl_to_ref"] for s in report],
                last["kl_ref_to_policy"],
                last["p_best"],
                last["expected_reward"],
                state,
                target,
            ]
        )
        for s, m in metrics.items():
            results.rows.append(
                {
                    "section": "deterministic",
                    "preferences": kind,
                    "loss": name,
                    "beta": beta,
                    "hparams": _hparam_text(loss),
                    "step": s,
                    **m,
                    "status": state,
                    "policy": " ".join(f"{p:.6g}" for p in curve[s].exp().tolist()),
                }
            )
    intro = (
        f"### Deterministic preferences (the better response always wins): {ocfg.optimizer} lr {float(ocfg.lr):g}, "
        f"full batch, from π = π_ref\n\nKL(π‖π_ref) of a table is at most {vertex_kl:.4f} = −log π_ref(best) (all mass "
        "on the best response); the forward KL(π_ref‖π) and the log-ratio gaps are unbounded."
    )
    return intro + "\n\n" + markdown_table(header, rows)


def _target(cfg, pop: Population, problem: Problem, kind: str, beta: float, last: Tensor, results, vertex_kl) -> str:
    """Where training should end: the population fixed point (L-BFGS from π_ref), named when it is IPO's closed form
    (then also a line on the plot), or none when the infimum lies on the boundary of the simplex."""
    fit = fixed_point(pop, problem.ref_logp, max_evals=int(cfg.fit.max_evals), grad_tol=float(cfg.fit.grad_tol))
    if fit.status == "converged" and not _attained(pop, fit):
        return f"none: the infimum is at π(y) → 0 (KL(π‖π_ref) ≤ {vertex_kl:.4f}, the vertex)"
    if fit.status != "converged":
        return fit.status
    target_kl = kl(fit.logp, problem.ref_logp)
    ipo_star = ipo_optimum(problem, beta, kind)
    if tv(fit.logp, ipo_star) < MATCH_TV:
        results.references[f"π*_IPO (β={beta:g})"] = target_kl
        return f"{target_kl:.4f} (= π*_IPO closed form; TV {tv(last, ipo_star):.1e})"
    return f"{target_kl:.4f} (L-BFGS, TV {tv(last, fit.logp):.1e})"


def setup_table(cfg: DictConfig, problem: Problem, betas: Sequence[float]) -> str:
    header = [
        "y",
        "r(y)",
        "π_ref(y)",
        "μ(y)",
        "P(y≻μ) BT",
        *[f"π*_DPO β={b:g}" for b in betas],
        *[f"π*_IPO β={b:g}" for b in betas],
        "SFT (chosen marginal)",
    ]
    columns = [
        problem.reward,
        problem.ref_logp.exp(),
        problem.mu,
        problem.win_rate("bt"),
        *[dpo_optimum(problem, b).exp() for b in betas],
        *[ipo_optimum(problem, b).exp() for b in betas],
        sft_optimum(problem).exp(),
    ]
    rows = [[y, *[float(c[y]) for c in columns]] for y in range(problem.n)]
    gaps = ", ".join(
        f"β={b:g}: {float((ipo_optimum(problem, b) - ipo_least_squares(problem, b)).abs().max()):.1e}" for b in betas
    )
    lines = [
        f"## Exact population fixed points: tabular softmax policy, one prompt, N = {problem.n} one-token responses",
        "",
        f"Pairs: two different responses from μ × μ (μ = {cfg.pairs_from}), every ordered pair one row weighted "
        "μ(y)μ(y')p(y≻y'); S = log π(y), lengths 1; float64; θ starts at log π_ref.",
        "",
        markdown_table(header, rows),
        "",
        f"IPO closed form vs. the direct least-squares solve of Σ w (ρ_w − ρ_l − 1/(2β))²: max |Δ log π| {gaps}.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- outputs
def write_plot(results: Results, path: Path, title: str) -> None:
    plt = tables.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    series = tables.styles(list(results.curves))
    for label, curve in results.curves.items():
        steps = sorted(curve)
        style = {**series[label], "markersize": 4, "label": label}
        axes[0].plot(steps, [curve[s]["kl_to_ref"] for s in steps], **style)
        axes[1].plot(steps, [curve[s]["kl_ref_to_policy"] for s in steps], **style)
    for j, (label, value) in enumerate(results.references.items()):
        axes[0].axhline(value, color="0.4", linestyle=("--", ":", "-.")[j % 3], linewidth=1, label=label)
    axes[0].set_ylabel("KL(π ‖ π_ref)  [nats]")
    axes[1].set_ylabel("KL(π_ref ‖ π)  [nats]")
    axes[1].set_yscale("symlog", linthresh=0.1)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("training steps (full batch)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("reverse KL to the reference (bounded by the vertex)")
    axes[1].set_title("forward KL to the reference (unbounded)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, loc="upper left")
    else:
        axes[0].text(
            0.5, 0.5, "no deterministic runs (overfit.runs is empty)", ha="center", transform=axes[0].transAxes
        )
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------- run
def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``python -m recipes.exact OVERRIDES`` would run (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="exact", overrides=list(overrides))


def run(cfg: DictConfig) -> Results:
    """Build the problem, compute every table, write ``exact.md``, ``exact.csv`` and ``exact.png`` to
    ``cfg.out_dir``; returns the results (``rows`` = the CSV, ``curves`` = the deterministic runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.get("threads") or threads))  # tiny tensors: one thread avoids sync overhead
    try:
        problem = make_problem(list(cfg.rewards), list(cfg.reference), str(cfg.pairs_from))
        betas = [float(b) for b in cfg.betas]
        results = Results()
        results.setup = setup_table(cfg, problem, betas)
        results.sections = [fixed_point_table(cfg, problem, b, results) for b in betas]
        if cfg.overfit.runs:
            results.sections.append(overfit_table(cfg, problem, results))
    finally:
        torch.set_num_threads(threads)
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "exact.md", "csv": out_dir / "exact.csv", "png": out_dir / "exact.png"}
    paths["md"].write_text(render(results) + "\n")
    tables.write_records(paths["csv"], results.rows)
    write_plot(
        results,
        paths["png"],
        f"Deterministic preferences, N = {problem.n}: DPO has no fixed point, IPO and MPO converge",
    )
    results.files = {k: str(v) for k, v in paths.items()}
    return results


def render(results: Results) -> str:
    return "\n\n".join([results.setup, *results.sections])
