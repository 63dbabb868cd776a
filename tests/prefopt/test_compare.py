"""prefopt-compare: run discovery (run dirs, sweep dirs, unfinished runs), grouping (by loss, reward mode, any config
key) and aggregation over seeds (mean ± sample std), the table / CSV / plots, user errors, and real training runs."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import prefopt
from prefopt import compare as cmp

from .test_trainer import TINY as TRAINER_TINY

METHODS = {"dpo": 1.0, "ipo": 2.0}  # the reward offset of each method
BETAS = [0.1, 0.5]
SEEDS = [0, 1]


def make_run(
    path: Path,
    loss: str,
    beta: float,
    seed: int,
    *,
    reward: dict | None = None,
    kl: float | None = None,
    mean: float | None = None,
    seconds: float | None = None,
) -> Path:
    """A finished run dir: config.yaml (OmegaConf), summary.json, metrics.jsonl with train, eval and table lines."""
    path.mkdir(parents=True, exist_ok=True)
    config = {"loss": {"name": loss, "beta": beta}, "trainer": {"seed": seed}, "reward": reward or {"name": "lexicon"}}
    OmegaConf.save(OmegaConf.create(config), path / "config.yaml")
    (path / "summary.json").write_text(
        json.dumps({"loss_name": loss, "seconds": 10.0 + seed if seconds is None else seconds})
    )
    kl = 10 * beta + seed if kl is None else kl
    mean = METHODS.get(loss, 0.0) + 2 * seed if mean is None else mean
    lines = [
        {"step": 1, "loss": 0.7, "rewards/accuracies": 0.5},
        {"step": 2, "eval/kl": kl / 2, "eval/reward/mean": mean - 1},
        {"step": 2, "samples": [{"prompt": "p", "completion": "c", "reward": 1.0}]},
        {"step": 3, "loss": 0.6 - seed / 10, "rewards/accuracies": 0.75},
        {"step": 4, "eval/kl": kl, "eval/reward/mean": mean},  # the final evaluation
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    if seed == 1:
        text += '{"step": 5, "loss": 0.5'  # a line cut by a kill: ignored
    (path / "metrics.jsonl").write_text(text)
    return path


@pytest.fixture
def sweep(tmp_path) -> Path:
    """2 methods x 2 betas x 2 seeds, laid out as sweep/METHOD/beta=B-seed=S (two levels)."""
    root = tmp_path / "sweep"
    for loss in METHODS:
        for beta in BETAS:
            for seed in SEEDS:
                make_run(root / loss / f"beta={beta}-seed={seed}", loss, beta, seed)
    return root


def row_of(rows, method, beta):
    return next(r for r in rows if r["method"] == method and r["loss.beta"] == beta)


def test_table_values_are_mean_and_sample_std_over_seeds(sweep, tmp_path):
    rows = cmp.compare([sweep])
    assert [(r["method"], r["loss.beta"]) for r in rows] == [("dpo", 0.1), ("dpo", 0.5), ("ipo", 0.1), ("ipo", 0.5)]
    row = row_of(rows, "ipo", 0.5)
    assert row["n"] == 2 and row["seeds"] == "0,1"
    # eval/kl: 10·β + seed = 5, 6 -> mean 5.5, sample std sqrt(((−0.5)² + 0.5²)/1) = 0.7071
    assert row["eval/kl"] == pytest.approx(5.5) and row["eval/kl:std"] == pytest.approx(math.sqrt(0.5))
    # eval/reward/mean: 2 + 2·seed = 2, 4 -> mean 3, std sqrt(2); the final evaluation line, not the first
    assert row["eval/reward/mean"] == pytest.approx(3.0) and row["eval/reward/mean:std"] == pytest.approx(math.sqrt(2))
    assert row["seconds"] == pytest.approx(10.5) and row["seconds:std"] == pytest.approx(math.sqrt(0.5))
    assert row["eval/kl:n"] == 2


def test_cli_writes_table_csv_and_plots(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert cmp.main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = (out / "compare.md").read_text()
    assert table.strip() in printed
    assert table.splitlines()[0] == "| method | loss.beta | n | seeds | eval/kl | eval/reward/mean | train s |"
    assert "| dpo | 0.1 | 2 | 0,1 | 1.5 ± 0.71 | 2 ± 1.4 | 10.5 ± 0.71 |" in table
    assert "8 run(s) in 4 group(s)" in printed
    with (out / "compare.csv").open() as handle:
        records = list(csv.DictReader(handle))
    assert list(records[0]) == [
        "method", "loss.beta", "n", "seeds",
        "eval/kl_mean", "eval/kl_std", "eval/kl_n",
        "eval/reward/mean_mean", "eval/reward/mean_std", "eval/reward/mean_n",
        "seconds_mean", "seconds_std", "seconds_n", "runs",
    ]  # fmt: skip
    assert len(records) == 4 and float(records[0]["eval/kl_mean"]) == pytest.approx(1.5)
    for name in ("frontier.png", "curves.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n", name


def test_default_grouping_adds_reward_mode_and_group_overrides_it(tmp_path):
    root = tmp_path / "runs"
    for mode in ("hierarchical", "weighted_sum"):
        for seed in SEEDS:
            make_run(root / f"{mode}-{seed}", "rloo", 0.05, seed, reward={"name": "alarm", "mode": mode})
    make_run(root / "plain", "dpo", 0.1, 0)  # a reward config without a mode: the loss name alone
    rows = cmp.compare([root])
    assert sorted(r["method"] for r in rows) == ["dpo", "rloo / hierarchical", "rloo / weighted_sum"]
    assert {r["n"] for r in rows if r["method"].startswith("rloo")} == {2}
    merged = cmp.compare([root], group=["loss.name"])
    assert [(r["method"], r["n"]) for r in merged] == [("dpo", 1), ("rloo", 4)]
    by_mode = cmp.compare([root], group=["reward.mode"], param="trainer.seed")
    assert ("—", 0) in [(r["method"], r["trainer.seed"]) for r in by_mode]  # dpo's missing mode


def test_sweep_dirs_run_dirs_and_unfinished_runs(sweep, tmp_path, capsys):
    (sweep / "ipo" / "crashed").mkdir()
    (sweep / "ipo" / "crashed" / "config.yaml").write_text("loss: {name: ipo}\n")  # no summary.json
    (sweep / ".hydra").mkdir()
    single = make_run(tmp_path / "single", "sft", 0.1, 0)
    runs, skipped = cmp.find_runs([sweep, single])
    assert len(runs) == 9 and skipped == [sweep / "ipo" / "crashed"]
    cmp.main([str(sweep), str(single), "--out", str(tmp_path / "out")])
    assert "9 run(s) in 5 group(s); skipped 1 dir(s) without summary.json" in capsys.readouterr().out
    deep = tmp_path / "deep"
    make_run(deep / "a" / "b" / "c", "dpo", 0.1, 0)  # three levels down: beyond the default depth
    with pytest.raises(cmp.CompareError, match="no runs"):
        cmp.find_runs([deep])
    assert len(cmp.find_runs([deep], depth=3)[0]) == 1


def test_missing_metrics_give_blank_cells(tmp_path, capsys):
    root = tmp_path / "runs"
    make_run(root / "a0", "dpo", 0.1, 0)
    partial = make_run(root / "a1", "dpo", 0.1, 1)
    lines = [json.loads(x) for x in (partial / "metrics.jsonl").read_text().splitlines() if x.endswith("}")]
    lines = [{k: v for k, v in x.items() if k != "eval/reward/mean"} for x in lines]
    (partial / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    noeval = make_run(root / "b0", "ipo", 0.1, 0)
    (noeval / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    out = tmp_path / "out"
    cmp.main([str(root), "--out", str(out), "--metrics", "eval/kl,eval/reward/mean,eval/nope"])
    captured = capsys.readouterr()
    table = (out / "compare.md").read_text()
    assert "| dpo | 0.1 | 2 | 0,1 | 1.5 ± 0.71 | 1 (1/2) |  | 10.5 ± 0.71 |" in table
    assert "| ipo | 0.1 | 1 | 0 |  |  |  | 10 |" in table
    assert "no run has a final value of eval/nope" in captured.err
    assert (out / "frontier.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    for args in ([str(tmp_path / "empty")], [str(tmp_path / "missing")]):
        with pytest.raises(SystemExit) as exit_info:
            cmp.main([*args, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("prefopt-compare: error: "), err
    result = subprocess.run(
        [sys.executable, "-c", "from prefopt.compare import cli; cli()", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"prefopt-compare: error: {tmp_path / 'empty'}: no runs (summary.json) in it or up to 2 levels below"
    )


TINY = [*TRAINER_TINY, "trainer.max_steps=2", "trainer.eval_every=2"]


def test_compares_real_training_runs(tmp_path):
    for loss in ("dpo", "ipo"):
        cfg = prefopt.compose([*TINY, f"cache_dir={tmp_path / 'cache'}", f"loss={loss}", "loss.beta=0.2"])
        prefopt.fit(cfg, run_dir=tmp_path / "sweep" / loss)
    out = tmp_path / "out"
    result = cmp.run_comparison([tmp_path / "sweep"], out=out, x="eval/rewards/margins", y="eval/rewards/accuracies")
    assert [(r["method"], r["loss.beta"], r["n"]) for r in result.rows] == [("dpo", 0.2, 1), ("ipo", 0.2, 1)]
    assert "eval/loss" in result.metrics and "eval/rewards/accuracies" in result.metrics
    for row, run in zip(result.rows, result.runs, strict=True):
        final = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines() if "eval/loss" in x][-1]
        assert final["step"] == 2 and row["eval/loss"] == pytest.approx(final["eval/loss"])
        assert row["seconds"] == pytest.approx(json.loads((run.path / "summary.json").read_text())["seconds"])
    assert result.warnings == []
    assert all((out / name).stat().st_size > 0 for name in ("compare.md", "compare.csv", "frontier.png", "curves.png"))


def test_a_first_sweep_without_sampling_plots_comparable_metrics(tmp_path):
    """``prefopt-train -m loss=dpo,ipo`` then ``prefopt-compare``: no run sampled, so the frontier and curves use what
    every run logged and means the same for every loss, never raw losses of different methods on one axis."""
    from .test_trainer import TINY

    for name in ("dpo", "ipo"):
        cfg = prefopt.compose(
            [*TINY, f"cache_dir={tmp_path}/c", f"loss={name}", "trainer.max_steps=2", "trainer.eval_every=2"]
        )
        prefopt.fit(cfg, run_dir=tmp_path / "sweep" / name)
    runs = [cmp.load_run(tmp_path / "sweep" / name) for name in ("dpo", "ipo")]
    assert cmp.pick_metrics(runs, None, None, None) == (
        "eval/logps/chosen",
        "eval/rewards/accuracies",
        "rewards/accuracies",
    )
    assert (
        cmp.pick_metrics(runs[:1], None, None, None)[2] == "rewards/accuracies"
    )  # accuracy first, loss as last resort
    result = cmp.run_comparison([tmp_path / "sweep"], out=tmp_path / "compare")
    assert not any(w.startswith("frontier: no final") for w in result.warnings), result.warnings
