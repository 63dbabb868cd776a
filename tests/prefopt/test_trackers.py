"""trainer.report_to: accelerate's trackers get the resolved config as parameters and every logged metric, under
the names of metrics.jsonl; a tracker that is not installed is one line."""

import json
from pathlib import Path

import pytest

import prefopt
from prefopt.build import read_settings
from prefopt.config import ConfigError
from prefopt.trainer import flat_config

from .test_trainer import TINY, run


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _logged(summary: dict) -> set[str]:
    lines = [json.loads(x) for x in Path(summary["metrics"]).read_text().splitlines()]
    return {k for line in lines for k, v in line.items() if k != "step" and isinstance(v, (int, float))}


def test_mlflow_records_the_parameters_and_every_metric(tmp_path, cache_dir, monkeypatch):
    pytest.importorskip("mlflow")
    import mlflow

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow >= 3.x keeps the file store behind this switch
    mlflow.set_tracking_uri(f"file:{store}")
    summary = run(
        tmp_path,
        cache_dir,
        "trainer.report_to=[mlflow]",
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        "loss.beta=0.3",
    )
    client = mlflow.tracking.MlflowClient(f"file:{store}")
    [experiment] = [e for e in client.search_experiments() if e.name == "prefopt"]
    [found] = client.search_runs([experiment.experiment_id])
    assert found.data.params["loss.name"] == "dpo" and found.data.params["loss.beta"] == "0.3"
    assert found.info.run_name == "run"
    assert set(found.data.metrics) == _logged(summary)
    history = client.get_metric_history(found.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2]


def test_wandb_offline_writes_its_run_dir(tmp_path, cache_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = run(tmp_path, cache_dir, "trainer.report_to=[wandb]", "trainer.max_steps=2")
    runs = list((Path(summary["run_dir"]) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_trackio_records_the_config_and_every_metric_locally(tmp_path, cache_dir, monkeypatch):
    """trackio (local-first: a SQLite file under TRACKIO_DIR, nothing uploaded without a Space)."""
    pytest.importorskip("trackio")
    import sqlite3
    import sys

    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    for name, module in list(sys.modules.items()):  # trackio reads TRACKIO_DIR once, when first imported
        if name.startswith("trackio") and hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")
    summary = run(tmp_path, cache_dir, "trainer.report_to=[trackio]", "trainer.max_steps=2", "trainer.eval_every=2")
    database = sqlite3.connect(tmp_path / "trackio" / "prefopt.db")
    rows = database.execute("select run_name, step, metrics from metrics order by id").fetchall()
    assert {name for name, _, _ in rows} == {"run"}
    logged = [(step, json.loads(metrics)) for _, step, metrics in rows]
    assert [step for step, values in logged if "loss" in values] == [1, 2]
    assert {k for _, values in logged for k in values} == _logged(summary)
    [(config,)] = database.execute("select config from configs").fetchall()
    assert json.loads(config)["loss.name"] == "dpo"


def test_no_tracker_and_a_single_name(tmp_path, cache_dir):
    summary = run(tmp_path, cache_dir, "trainer.report_to=[]", "trainer.max_steps=1", name="none")
    assert not (Path(summary["run_dir"]) / "tensorboard").exists()
    settings = read_settings(prefopt.compose([*TINY, "trainer.report_to=tensorboard"]))
    assert settings.trainer.report_to == ("tensorboard",)


def test_unknown_or_missing_trackers_are_one_line(monkeypatch):
    with pytest.raises(ConfigError, match="trainer.report_to must be one of"):
        read_settings(prefopt.compose([*TINY, "trainer.report_to=[neptune]"]))
    import importlib.util

    from prefopt import build

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "comet_ml" else real(name, *a))
    with pytest.raises(ConfigError, match=r"comet_ml is not installed \(pip install 'prefopt\[comet\]'\)"):
        build._check_trackers(("tensorboard", "comet_ml"))


def test_flat_config_has_dotted_keys_and_plain_values():
    flat = flat_config({"loss": {"name": "dpo", "beta": 0.1}, "trainer": {"adam_betas": [0.9, 0.99], "x": None}})
    assert flat == {"loss.name": "dpo", "loss.beta": 0.1, "trainer.adam_betas": "[0.9, 0.99]", "trainer.x": "None"}
