"""Fixtures of the data-layer tests: an offline tokenizer, a file writer, and a private ``datasets`` cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pytest

from ._helpers import make_tokenizer, write_rows


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return make_tokenizer()


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the arrow files ``datasets`` writes for each test file out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    """``write(rows, suffix, name="train")`` -> the path of a new file in the test's tmp dir."""
    return lambda rows, suffix, name="train": write_rows(tmp_path, rows, suffix, name)
