"""The time-to-first-step runs of ``prefopt-train``: which caches each one starts with."""

from __future__ import annotations

import shutil
from pathlib import Path

STARTUP_RUNS = {  # name -> what the data cache holds when the run starts
    "first": "empty cache (tokenizer only): tokenize + precompute the reference",
    "cold": "cold data cache, reference log-probs cached",
    "warm": "warm data cache, reference log-probs cached",
}


def prepare_startup_cache(tokenizer_cache: Path, cache: Path, name: str) -> None:
    """Before each startup run: the first gets the embedded tokenizer copied in (built with the model) and nothing
    else; the cold one has the tokenized-data cache removed (the reference log-probs stay: they are keyed by the data
    fingerprint, which does not depend on the cache); the warm one keeps everything."""
    if name == "first":
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        for tokenizer_dir in tokenizer_cache.glob("tokenizer-*"):
            shutil.copytree(tokenizer_dir, cache / tokenizer_dir.name)
    elif name == "cold":
        shutil.rmtree(cache / "data", ignore_errors=True)
