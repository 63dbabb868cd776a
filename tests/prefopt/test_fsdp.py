"""FSDP2 over two CPU processes (gloo), launched as a user launches it on GPUs: ``accelerate launch --config_file
conf/accelerate/fsdp.yaml``. The sharded run logs the same losses as one unsharded process, resumes from its own
(sharded) checkpoint to the same weights, and works with the precomputed and the live reference, with LoRA, and
online (every process samples in step: generation is a collective when parameters are sharded)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import prefopt

from .test_cli import one_and_two_processes
from .test_trainer import TINY

CONFIG = Path(prefopt.__file__).resolve().parents[1] / "conf" / "accelerate" / "fsdp.yaml"
# fp32 (the shipped config says bf16, for GPUs), so one and two processes can be compared to 1e-4
LAUNCH_FSDP = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG)]
LAUNCH_FSDP += ["--mixed_precision", "no", "--main_process_port", "29533", "-m", "prefopt.train"]
# two decoder layers: two sharded units plus the root's own parameters (embeddings, norm, head)
COMMON = [*TINY, "model.config.num_hidden_layers=2", "trainer.lr=0.01", "trainer.micro_batch_size=4"]
COMMON += ["data.n_eval=10", "trainer.eval_every=3"]  # 10 eval pairs: shards of 5, micro-batches of 4 and 1


def losses_of(lines: list[dict]) -> dict[int, float]:
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


def evals_of(lines: list[dict]) -> dict[int, float]:
    return {x["step"]: x["eval/loss"] for x in lines if "eval/loss" in x}


def fsdp(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*LAUNCH_FSDP, *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_fsdp_logs_the_losses_of_one_process_and_resumes_from_its_own_checkpoint(tmp_path):
    common = [*COMMON, "trainer.max_steps=6", "trainer.save_every=3", f"cache_dir={tmp_path}/c"]
    one, two, _ = one_and_two_processes(tmp_path, *common, launch=LAUNCH_FSDP, distributed="FSDP x 2")
    assert len(losses_of(two)) == 6 and len(evals_of(two)) == 2
    assert losses_of(two) == pytest.approx(losses_of(one), abs=1e-4)
    assert evals_of(two) == pytest.approx(evals_of(one), abs=1e-4)  # the mean over eval pairs, however split
    checkpoint = tmp_path / "two" / "checkpoints" / "step-3"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # sharded: one file per process
    fsdp(tmp_path, *common, f"trainer.resume={checkpoint}", f"hydra.run.dir={tmp_path}/resumed")
    resumed = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert losses_of(resumed) == {k: v for k, v in losses_of(two).items() if k > 3}  # bit-identical
    weights = {name: load_file(tmp_path / name / "final" / "model.safetensors") for name in ("one", "two", "resumed")}
    assert all(weights["resumed"][k].equal(v) for k, v in weights["two"].items())
    assert sorted(weights["one"]) == sorted(weights["two"])  # final/ holds the gathered full model
    assert max(float((weights["one"][k] - v).abs().max()) for k, v in weights["two"].items()) < 1e-4


def test_fsdp_with_a_live_reference_and_lora(tmp_path):
    """A fresh LoRA adapter under FSDP: its reference is the sharded model with the adapters disabled."""
    common = [*COMMON, "trainer.max_steps=3", "reference.mode=live", "model.lora.r=4", "model.lora.merge=true"]
    one, two, _ = one_and_two_processes(
        tmp_path, *common, f"cache_dir={tmp_path}/c", launch=LAUNCH_FSDP, distributed="FSDP x 2"
    )
    assert losses_of(two) == pytest.approx(losses_of(one), abs=1e-4) and len(losses_of(two)) == 3
    assert evals_of(two) == pytest.approx(evals_of(one), abs=1e-4)
    for name in ("adapter_model.safetensors", "merged/model.safetensors"):
        a, b = (load_file(tmp_path / run / "final" / name) for run in ("one", "two"))
        assert sorted(a) == sorted(b)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_fsdp_trains_online(tmp_path):
    """Online GRPO under FSDP: every process samples, scores and trains (a process that stopped generating before
    the others would hang the parameter gathers); the run finishes with its eval samples."""
    online = ["trainer=online", "loss=grpo", "reward=length", "trainer.max_steps=2", "trainer.eval_every=2"]
    fsdp(tmp_path, *COMMON, *online, f"cache_dir={tmp_path}/c", f"hydra.run.dir={tmp_path}/run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["distributed"] == "FSDP x 2" and summary["steps"] == 2
    assert "reward/mean" in "".join(summary["eval"]) and (tmp_path / "run" / "final" / "model.safetensors").exists()
