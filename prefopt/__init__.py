"""prefopt: models + data -> log-probs -> one training step for every registered loss (imports ``losses``)."""

from __future__ import annotations

from typing import Any

__all__ = ["fit", "compose"]


def fit(cfg: Any, run_dir: str | None = None) -> dict:
    """Train with a composed config (see ``compose``); returns the run summary. For notebooks and scripts.

    (Named ``fit`` because ``prefopt.train`` is the module behind ``python -m prefopt.train``.)"""
    from prefopt.trainer import train as _train

    return _train(cfg, run_dir=run_dir)


def compose(overrides: list[str] | None = None) -> Any:
    """The Hydra config ``prefopt-train`` would use with these command-line overrides, e.g. ``["loss=ipo"]``."""
    from prefopt.config import compose_config

    return compose_config(overrides or [])
