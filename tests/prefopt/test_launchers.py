"""Sweeps through Hydra's launcher and sweeper plugins: submitit_local (the local form of submitit_slurm) runs the
jobs as separate processes on one shared, empty cache; optuna searches loss.beta for the best `objective`."""

import json

import pytest
import yaml

from prefopt.compare import find_runs
from prefopt.train import objective

from .test_cli import cli
from .test_trainer import TINY


def test_submitit_local_sweep_shares_one_cache_and_compares(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = cli(
        "-m",
        "hydra/launcher=submitit_local",
        "loss=dpo,ipo",
        "trainer.max_steps=2",
        *TINY,
        f"cache_dir={tmp_path}/c",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    runs, _ = find_runs([tmp_path / "sweep"])
    assert sorted(p.name for p in runs) == ["0_dpo", "1_ipo"]
    assert all(json.loads((p / "summary.json").read_text())["steps"] == 2 for p in runs)
    assert (tmp_path / "sweep" / ".submitit").is_dir()  # the jobs went through submitit


def test_optuna_searches_beta_for_the_best_objective(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = cli(
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.direction=maximize",
        "hydra.sweeper.sampler.seed=0",
        "loss.beta=interval(0.05,0.5)",
        "objective=rewards/accuracies",
        *TINY,
        "trainer.max_steps=3",
        "trainer.eval_every=3",
        f"cache_dir={tmp_path}/c",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    found = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/summary.json"))]
    values = [s["eval"]["rewards/accuracies"] for s in summaries]
    assert len(values) == 3 and found["best_value"] == pytest.approx(max(values))
    assert 0.05 <= found["best_params"]["loss.beta"] <= 0.5


def test_objective_reads_eval_then_train_and_names_what_was_logged():
    summary = {"eval": {"rewards/accuracies": 0.75}, "train": {"loss": 0.5, "online/reward/mean": 0.2}}
    assert objective(summary, "eval/rewards/accuracies") == 0.75
    assert objective(summary, "loss") == 0.5 and objective(summary, "reward/mean") == 0.2
    assert objective(summary, None) is None
    from prefopt.config import ConfigError

    with pytest.raises(ConfigError, match="objective=kl: the run logged no such metric; it logged"):
        objective(summary, "kl")


def test_a_bad_objective_is_one_line_and_exit_code_2(tmp_path):
    result = cli(*TINY, "trainer.max_steps=1", "objective=nope", f"cache_dir={tmp_path}/c", cwd=tmp_path)
    assert result.returncode == 2 and "objective=nope" in result.stderr
    assert len([line for line in result.stderr.splitlines() if "prefopt-train:" in line]) == 1
