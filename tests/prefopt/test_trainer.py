"""End to end on a tiny model, seconds each: every pairwise loss trains; reference handling follows the loss's
declaration; precomputed = live reference; local formats; resume continues the same trajectory; the CLI."""

import json
from pathlib import Path

import pytest

import losses
import prefopt
from prefopt import reference as reference_module

TINY_MODEL = [
    "model.vocab_size=256",
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=1",
    "model.sft.steps=0",
    "trainer.batch_size=8",
    "trainer.warmup_steps=0",
    "trainer.eval_every=0",
    "trainer.progress_bar=false",
    "regularization.max_new_tokens=8",
]
TINY = [*TINY_MODEL, "data.n_train=48", "data.n_eval=16", "data.max_length=40", "data.max_prompt_length=12"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run(tmp_path: Path, cache_dir: Path, *overrides: str, name: str = "run") -> dict:
    cfg = prefopt.compose([*TINY, f"cache_dir={cache_dir}", *overrides])
    return prefopt.fit(cfg, run_dir=tmp_path / name)


def metrics(summary: dict, prefix: str = "") -> list[dict]:
    lines = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    return [line for line in lines if any(k.startswith(prefix) for k in line if k != "step")] if prefix else lines


@pytest.mark.parametrize("name", [n for n in losses.available() if losses.spec(n).kind == "pair"])
def test_every_pairwise_loss_trains(tmp_path, cache_dir, name):
    summary = run(tmp_path, cache_dir, f"loss={name}", "trainer.max_steps=3")
    assert summary["steps"] == 3
    lines = [line for line in metrics(summary) if "loss" in line]
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        assert all(isinstance(v, (int, float)) and v == v and abs(v) != float("inf") for v in line.values()), line
    assert (Path(summary["model_dir"]) / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo", "mpo loss.pair_center=none", "sft"])
def test_reference_free_losses_build_no_reference(tmp_path, cache_dir, monkeypatch, name):
    def forbidden(*args, **kwargs):
        raise AssertionError("a reference-free loss must not build or precompute a reference")

    monkeypatch.setattr(reference_module, "frozen_copy", forbidden)
    monkeypatch.setattr(reference_module.Reference, "precomputed", forbidden)
    summary = run(tmp_path, cache_dir, *f"loss={name}".split(), "trainer.max_steps=2", "reference.mode=live")
    assert summary["reference_model"] is False


def test_mpo_holds_no_reference_model(tmp_path, cache_dir, monkeypatch):
    """MPO's centred pair term reads the pairs' precomputed reference log-probs: no frozen copy is ever made."""

    def forbidden(*args, **kwargs):
        raise AssertionError("MPO must not hold a reference model while optimising")

    monkeypatch.setattr(reference_module, "frozen_copy", forbidden)
    summary = run(tmp_path, cache_dir, "loss=mpo", "trainer.max_steps=2")
    assert summary["reference_model"] is False
    lines = [line for line in metrics(summary) if "loss" in line]
    assert lines[0]["mpo/sigma_prime_mean"] == pytest.approx(0.25, abs=1e-6)  # centred: σ(0) at the start


def test_precomputed_and_live_reference_give_the_same_losses(tmp_path, cache_dir):
    live = run(tmp_path, cache_dir, "loss=dpo", "trainer.max_steps=4", "reference.mode=live", name="live")
    cached = run(tmp_path, cache_dir, "loss=dpo", "trainer.max_steps=4", "reference.mode=precomputed", name="cached")
    assert live["reference_model"] and not cached["reference_model"]
    for a, b in zip(metrics(live), metrics(cached), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)


def test_resume_continues_the_same_trajectory(tmp_path, cache_dir):
    full = run(tmp_path, cache_dir, "trainer.max_steps=6", "trainer.save_every=3", name="full")
    checkpoint = Path(full["run_dir"]) / "checkpoints" / "step-3"
    assert (checkpoint / "trainer_state.json").exists()
    resumed = run(tmp_path, cache_dir, "trainer.max_steps=6", f"trainer.resume={checkpoint}", name="resumed")
    tail = [line["loss"] for line in metrics(full) if line["step"] > 3]
    assert [line["loss"] for line in metrics(resumed)] == pytest.approx(tail, abs=1e-6)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, cache_dir):
    one = run(tmp_path, cache_dir, "trainer.max_steps=3", name="one")
    accumulated = run(tmp_path, cache_dir, "trainer.max_steps=3", "trainer.micro_batch_size=2", name="acc")
    for a, b in zip(metrics(one), metrics(accumulated), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


@pytest.fixture(scope="module")
def default_four_steps(tmp_path_factory, cache_dir) -> dict:
    return run(tmp_path_factory.mktemp("base"), cache_dir, "trainer.max_steps=4", name="base")


@pytest.mark.parametrize(
    "setting",
    [
        "trainer.length_buckets=false",
        "trainer.bucket_overhead_tokens=0",
        "trainer.gradient_checkpointing=true",
        "trainer.fused_optimizer=false",
    ],
)
def test_performance_settings_do_not_change_the_trajectory(tmp_path, cache_dir, default_four_steps, setting):
    """Length buckets, gradient checkpointing and the fused optimizer change speed and memory, not the losses."""
    base = default_four_steps
    other = run(tmp_path, cache_dir, "trainer.max_steps=4", setting, name="other")
    for a, b in zip(metrics(base), metrics(other), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-4)
    perf = [line for line in metrics(base) if "perf/step_seconds" in line]
    assert len(perf) == 4 and all(line["perf/tokens_per_second"] > 0 for line in perf)
    peaks = [line["perf/peak_memory_mib"] for line in perf]
    assert peaks == sorted(peaks) and 50 < peaks[0] < 100_000  # a running peak, in MiB


def test_cpu_training_flushes_denormals(tmp_path, cache_dir):
    import torch

    torch.set_flush_denormal(False)
    try:
        assert float(torch.tensor(1e-39) * 1.0) != 0.0
        run(tmp_path, cache_dir, "trainer.max_steps=1")
        assert float(torch.tensor(1e-39) * 1.0) == 0.0  # flushed to zero: no slow denormal arithmetic
    finally:
        torch.set_flush_denormal(False)


def test_default_run_learns_the_preference(tmp_path, cache_dir):
    """A short version of the default run: held-out reward accuracy rises well above chance."""
    summary = run(
        tmp_path,
        cache_dir,
        "trainer.max_steps=40",
        "trainer.eval_every=20",
        "data.n_train=640",
        "data.n_eval=64",
        "trainer.batch_size=16",
        "model.vocab_size=512",
        "data.max_length=64",
        "data.max_prompt_length=24",
    )
    evals = [line for line in metrics(summary) if "eval/rewards/accuracies" in line]
    assert evals[-1]["eval/rewards/accuracies"] >= 0.75, evals
