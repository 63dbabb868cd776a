"""Jobs of a sweep running at once share one cache dir safely: each entry is built once, under its lock, and the
other job waits and loads it."""

import subprocess
import sys
import threading
import time
from pathlib import Path

from prefopt.cache import cached, entry_lock

from .test_trainer import TINY


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def test_two_jobs_started_at_once_on_an_empty_cache_build_everything_once(tmp_path):
    cache = tmp_path / "cache"
    # every kind of entry: tokenizer, SFT weights, tokenized data, reference log-probs, MPO's regularisation pool
    common = [*TINY, "model.sft.steps=20", "trainer.max_steps=2", "loss=mpo"]
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefopt.train",
                *common,
                f"cache_dir={cache}",
                f"hydra.run.dir={tmp_path / f'job{i}'}",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # Hydra's job logging goes to stdout
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    for job in jobs:
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, output[-2000:]
        logs.append(output)
    for what in ("sft warm start", "reference log-probs", "regularisation samples", "embedded tokenizer"):
        loaded = [what + ": loaded" in log for log in logs]
        assert loaded.count(True) == 1, (what, loaded)  # built by one job, loaded by the other
    files = _files(cache)
    assert not [f for f in files if ".tmp" in f], files  # no half-written entries left behind
    single = tmp_path / "single"
    done = subprocess.run(
        [sys.executable, "-m", "prefopt.train", *common, f"cache_dir={single}", f"hydra.run.dir={tmp_path / 'alone'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert files == _files(single)  # one set of cache files, as one job alone makes


def test_a_waiting_builder_loads_what_the_first_one_built(tmp_path):
    path, built = tmp_path / "entry.txt", []

    def build(tag: str):
        def make():
            built.append(tag)
            time.sleep(0.3)
            return tag

        return make

    def save(value, tmp):
        Path(tmp).write_text(value)

    results = {}

    def job(tag: str):
        results[tag] = cached(path, build(tag), save=save, load=lambda p: Path(p).read_text(), what="entry")

    first = threading.Thread(target=job, args=("a",))
    first.start()
    time.sleep(0.05)
    job("b")
    first.join()
    assert built == ["a"] and results == {"a": "a", "b": "a"}


def test_an_entry_whose_lock_cannot_be_created_is_built_unlocked(tmp_path, caplog):
    """Where no lock file can be created (here the entry's parent is a file, so even root cannot make the folder),
    the entry is built without the lock, with one warning, instead of failing the run."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    ran = []
    with entry_lock(blocker / "entry", "entry"):
        ran.append(True)
    assert ran == [True]
    assert any("building it unlocked" in r.getMessage() for r in caplog.records)
