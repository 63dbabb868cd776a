"""One content-addressed cache helper for every cache prefopt keeps under ``cache_dir`` (tokenizer, SFT weights,
tokenized data, sampled pairs, reference log-probs, regularisation samples).

A cache entry is named by :func:`cache_key` of everything that produced it. :func:`cached` loads it when present,
else builds and writes it atomically (a temporary file or dir next to it, renamed when complete, so a killed run never
leaves a half-written entry); an entry that fails to load (truncated, altered, wrong shape) is reported in one warning
and rebuilt, never used. A cache dir that cannot be written costs the cache, not the run.

Jobs that share a cache dir (a sweep's jobs running at once, on one machine or a cluster's shared file system) build
each entry once: :func:`entry_lock` holds a lock file next to the entry while it is checked and built, so the other
jobs wait and then load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = [
    "cache_key",
    "digest",
    "atomic_write",
    "cached",
    "entry_lock",
    "save_tensors",
    "load_tensors",
    "sequence_key",
]

log = logging.getLogger("prefopt")

T = TypeVar("T")


def digest(payload: Any) -> str:
    """Full sha256 hex digest of ``payload`` as canonical JSON (sorted keys; other objects by ``str``)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def cache_key(*parts: object) -> str:
    """A 16-hex-digit name for a cache entry produced from ``parts``."""
    return digest(parts)[:16]


def sequence_key(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> bytes:
    """A 128-bit content key of one (prompt, completion) token sequence: tables of per-sequence values (precomputed
    reference log-probs, auxiliary rewards) are looked up by content, not by position."""
    return hashlib.blake2b(f"{list(prompt_ids)}|{list(completion_ids)}".encode(), digest_size=16).digest()


def atomic_write(path: Path, write: Callable[[Path], None], *, replace: bool = False) -> None:
    """``write(tmp)`` to a temporary file or dir next to ``path``, then rename it to ``path``. When ``path`` exists
    by then (another process finished first), the first writer wins and the new one is discarded, unless ``replace``
    (a damaged entry being rebuilt)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        if path.exists() and not replace:
            return
        if path.is_dir():  # a directory entry (a tokenizer): move the old one aside first
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def entry_lock(path: Path, what: str, logger: logging.Logger = log):
    """Hold the lock of cache entry ``path`` (``.NAME.lock`` beside it, an OS file lock released when the process
    dies): while one job checks and builds the entry, the others wait here. Where no lock file can be created (a
    read-only cache dir) the entry is built unlocked."""
    from filelock import FileLock, Timeout

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.with_name(f".{path.name}.lock")))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("%s: another job is building %s; waiting for it", what, path)
            lock.acquire()
    except OSError as error:
        logger.warning("%s: no lock for %s (%s); building it unlocked", what, path, error)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def cached(
    path: Path,
    build: Callable[[], T],
    *,
    save: Callable[[T, Path], None],
    load: Callable[[Path], T],
    what: str,
    logger: logging.Logger = log,
) -> T:
    """``load(path)`` when the entry exists and loads; else ``build()``, saved atomically with ``save(value, tmp)``
    (a ``save`` that raises OSError costs the cache, not the run). Under the entry's lock (:func:`entry_lock`)."""
    with entry_lock(path, what, logger):
        return _cached(Path(path), build, save=save, load=load, what=what, logger=logger)


def _cached(path: Path, build, *, save, load, what: str, logger: logging.Logger):
    damaged = False
    if path.exists():
        try:
            value = load(path)
        except Exception as error:  # noqa: BLE001 - any failure to read means: rebuild, never use
            logger.warning("%s cache %s is unusable (%s); rebuilding it", what, path, error)
            damaged = True
        else:
            logger.info("%s: loaded %s", what, path)
            return value
    value = build()
    try:
        atomic_write(path, lambda tmp: save(value, tmp), replace=damaged)
    except OSError as error:
        logger.warning("%s not cached at %s: %s", what, path, error)
    return value


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=device)
