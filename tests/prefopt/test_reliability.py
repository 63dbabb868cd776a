"""Kill-and-resume to identical weights, atomic checkpoints, non-finite guards, config errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prefopt
from prefopt import checkpoint as checkpoint_module
from prefopt import models as models_module
from prefopt import step as step_module
from prefopt import trainer as trainer_module

from .test_cli import cli
from .test_trainer import TINY, metrics, run

KILL_RUN = [*TINY, "trainer.max_steps=10", "trainer.save_every=1", "data.n_train=96"]


def test_sigkill_then_resume_gives_bit_identical_weights(tmp_path):
    """A real subprocess is SIGKILLed mid-run (checkpoints every step, so the kill may land inside a save); the
    restart with trainer.resume=true ends with exactly the weights of an uninterrupted run."""
    cache = f"cache_dir={tmp_path}/c"
    reference = cli(*KILL_RUN, cache, f"hydra.run.dir={tmp_path}/full", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]

    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "prefopt.train", *KILL_RUN, cache, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "step-4").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_dir / "final").exists(), "the run finished before it could be killed"

    resumed = cli(*KILL_RUN, cache, f"hydra.run.dir={run_dir}", "trainer.resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    got = load_file(str(run_dir / "final" / "model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # each step logged once, though the killed run had logged some already


def test_partial_checkpoint_is_ignored_and_old_ones_pruned_after_the_new(tmp_path):
    summary = run(tmp_path, tmp_path / "c", "trainer.max_steps=5", "trainer.save_every=1", "trainer.keep_last=2")
    root = Path(summary["run_dir"]) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-3", "step-4"]
    # a save that was killed half-way leaves only a temporary dir: never chosen for resuming
    partial = root / ".step-5.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    found = checkpoint_module.checkpoints(root)
    assert sorted(p.name for p in found) == ["step-3", "step-4"]


def _nan_forward(monkeypatch, bad_calls):
    """Make the policy's forward return NaN log-probs on the given (0-based) training forward calls."""
    real = step_module.sequence_logps
    calls = {"n": 0}

    def forward(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        if model.training:
            calls["n"] += 1
            if calls["n"] - 1 in bad_calls:
                return out * float("nan")
        return out

    monkeypatch.setattr(step_module, "sequence_logps", forward)


def test_nonfinite_loss_skips_the_step_and_counts(tmp_path, monkeypatch, caplog):
    _nan_forward(monkeypatch, bad_calls={2})
    summary = run(tmp_path, tmp_path / "c", "trainer.max_steps=5")
    lines = metrics(summary)
    assert lines[2]["step"] == 3 and lines[2]["skipped"] == 1 and "loss" not in lines[2]
    assert [line.get("nonfinite_steps") for line in lines] == [0, 0, 1, 1, 1]
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 5
    assert "step 3 skipped: a non-finite loss" in caplog.text
    weights = load_file(str(Path(summary["model_dir"]) / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_gradient_skips_the_step(tmp_path, monkeypatch):
    real_build = models_module.build_model
    hits = {"n": 0}

    def build(cfg, tokenizer, **kwargs):
        model = real_build(cfg, tokenizer, **kwargs)

        def poison(grad):
            hits["n"] += 1
            return grad * float("nan") if hits["n"] == 2 else grad

        model.lm_head.weight.register_hook(poison)
        return model

    monkeypatch.setattr(models_module, "build_model", build)
    summary = run(tmp_path, tmp_path / "c", "trainer.max_steps=4", "reference.mode=precomputed")
    skipped = [line["step"] for line in metrics(summary) if line.get("skipped")]
    assert skipped == [2] and summary["nonfinite_steps"] == 1


def test_too_many_nonfinite_steps_stop_with_a_checkpoint(tmp_path, monkeypatch):
    _nan_forward(monkeypatch, bad_calls=set(range(2, 100)))
    with pytest.raises(trainer_module.NonFiniteTraining, match="stopped at step 5: 3 steps in a row had a non-finite"):
        run(tmp_path, tmp_path / "c", "trainer.max_steps=10", "trainer.max_nonfinite_steps=3")
    assert (tmp_path / "run" / "checkpoints" / "step-5" / "trainer_state.json").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["loss=nope"], "Could not find 'loss/nope' Available options in 'loss': aot"),
        (["-m", "loss=dpo,nope"], "Could not find 'loss/nope'"),
        (["trainer.max_stepz=3"], "Could not override 'trainer.max_stepz'"),
        (["loss.beta=-1"], "dpo.beta must be a finite number > 0, got -1"),
        (["data=local", "data.path=/nonexistent/pairs.jsonl"], "/nonexistent/pairs.jsonl: file not found"),
        (["trainer.batch_size=10", "trainer.micro_batch_size=4"], "must be a multiple of micro_batch_size=4"),
    ],
)
def test_bad_configs_are_one_line_with_exit_code_2(tmp_path, arguments, message):
    result = cli(
        *arguments, "trainer.max_steps=1", f"cache_dir={tmp_path}/c", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("prefopt-train: error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_compose_matches_the_cli_defaults():
    cfg = prefopt.compose([])
    assert cfg.loss.name == "dpo" and cfg.trainer.max_nonfinite_steps == 5


def test_resume_loads_checkpoints_with_weights_only(tmp_path, monkeypatch):
    """Security default: every torch.load on the resume path runs with weights_only=True (no pickle execution)."""
    run(tmp_path, tmp_path / "c", "trainer.max_steps=3", "trainer.save_every=2", name="first")
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    checkpoint = tmp_path / "first" / "checkpoints" / "step-2"
    run(tmp_path, tmp_path / "c", "trainer.max_steps=3", f"trainer.resume={checkpoint}", name="second")
    assert calls and all(flag is True for flag in calls), calls


def test_security_defaults_in_source_and_configs():
    root = Path(__file__).resolve().parents[2]
    for path in [*root.glob("prefopt/**/*.py"), *root.glob("losses/**/*.py")]:
        text = path.read_text()
        assert "import pickle" not in text, path
        assert "torch.load(" not in text or "weights_only=True" in text, path
    for path in root.glob("conf/model/*.yaml"):
        assert "trust_remote_code: false" in path.read_text(), path
