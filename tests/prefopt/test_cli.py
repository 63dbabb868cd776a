"""The command line: a sweep makes one run dir per job; user errors print one line and exit 2; local files in the
conversational and HH formats train."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import prefopt
from prefopt.data import synthetic

from .test_trainer import TINY, TINY_MODEL


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prefopt.train", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


# two processes (gloo DDP on the CPU) running prefopt-train, through torchrun: `accelerate launch --cpu
# --num_processes 2` starts ONE process on a machine without mpirun, so it cannot test anything distributed
LAUNCH_TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
LAUNCH_TWO += ["-m", "prefopt.train"]


def test_sweep_makes_one_run_dir_per_job(tmp_path):
    result = cli(
        "-m",
        "loss=dpo,ipo",
        "loss.beta=0.1,0.3",
        "trainer.max_steps=2",
        *TINY,
        f"cache_dir={tmp_path}/c",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(runs) == 4
    for run_dir in runs:
        assert (run_dir / "final" / "model.safetensors").exists()
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert lines[-1]["step"] == 2
    assert {json.loads((r / "summary.json").read_text())["loss_name"] for r in runs} == {"dpo", "ipo"}
    assert result.stdout.count("run dir: ") == 4
    card = (runs[0] / "final" / "README.md").read_text()  # the model card's command reproduces this job
    assert "prefopt-train loss=dpo loss.beta=0.1 trainer.max_steps=2" in card


def test_bad_row_is_one_line_and_exit_code_2(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = cli(
        "data=local",
        f"data.path={path}",
        "trainer.max_steps=1",
        *TINY_MODEL,
        f"cache_dir={tmp_path}/c",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("prefopt-train: error")]
    assert error_lines == [f"prefopt-train: error: {path} row 1: field 'rejected' is missing (null)"], result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_hyperparameter_exit_code_2(tmp_path):
    result = cli(
        "+loss.betta=0.1", "trainer.max_steps=1", f"cache_dir={tmp_path}/c", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "loss 'dpo' has no hyper-parameter 'betta'; valid: beta" in result.stderr
    assert "Traceback" not in result.stderr


def _reviews(n: int):
    train, _ = synthetic.make_preference_data(n, 1, seed=3)
    return train


@pytest.mark.parametrize("layout", ["conversational", "hh"])
def test_local_conversational_and_hh_files_train(tmp_path, layout):
    rows = []
    for row in _reviews(24):
        if layout == "conversational":
            user = {"role": "user", "content": row["prompt"]}
            rows.append(
                {
                    "chosen": [user, {"role": "assistant", "content": row["chosen"]}],
                    "rejected": [user, {"role": "assistant", "content": row["rejected"]}],
                }
            )
        else:
            head = f"\n\nHuman: {row['prompt']}\n\nAssistant:"
            rows.append({"chosen": f"{head} {row['chosen']}", "rejected": f"{head} {row['rejected']}"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = prefopt.compose(
        [
            *TINY_MODEL,
            "data=local",
            f"data.path={path}",
            "data.eval_fraction=0.25",
            "data.max_length=96",
            "data.max_prompt_length=48",
            "trainer.max_steps=2",
            f"cache_dir={tmp_path}/c",
        ]
    )
    summary = prefopt.fit(cfg, run_dir=tmp_path / "run")
    assert summary["train_pairs"] == 18 and summary["eval_pairs"] == 6
    assert summary["steps"] == 2


def one_and_two_processes(
    tmp_path: Path, *common: str, launch: list[str] = LAUNCH_TWO, distributed: str = "MULTI_CPU x 2"
) -> tuple[list[dict], list[dict], subprocess.CompletedProcess]:
    """The same run in one process and in two (``launch``: torchrun, gloo DDP by default): both metrics.jsonl and the
    two-process result; asserts both finished and that two processes really ran, as ``distributed``."""
    single = cli(*common, f"hydra.run.dir={tmp_path}/one", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run(
        [*launch, *common, f"hydra.run.dir={tmp_path}/two"], cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert double.returncode == 0, double.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["distributed"] == distributed
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    return one, two, double


def test_two_processes_log_the_same_losses_as_one(tmp_path):
    """Two processes (torchrun, gloo DDP) with the same global batch: same loss per step, and really two."""
    common = [*TINY, "trainer.max_steps=6", "trainer.warmup_steps=2", "trainer.lr=0.01", f"cache_dir={tmp_path}/c"]
    common += ["trainer.micro_batch_size=4"]  # one process accumulates 2 micro-batches of 4; two take one each
    one, two, double = one_and_two_processes(tmp_path, *common)
    assert double.stdout.count("run dir: ") == 1  # the summary is printed once, by rank 0
    assert len(one) == len(two) == 6
    assert [x["loss"] for x in two] == pytest.approx([x["loss"] for x in one], abs=1e-4)
    assert [x["lr"] for x in two] == [x["lr"] for x in one]  # the schedule advances once per step, not per process
