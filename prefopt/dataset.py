"""Data config -> tokenized train/eval pairs: the embedded synthetic task, a local file, or a hub dataset, through
``prefopt.data`` (format conversion, validation with row/field errors, tokenization and truncation rules)."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from prefopt import data as data_lib
from prefopt import synthetic
from prefopt.errors import ConfigError

__all__ = ["PreparedData", "prepare_data", "load_standard_rows"]

log = logging.getLogger("prefopt.data")


@dataclass
class PreparedData:
    train: list[dict]  # tokenized: prompt_ids, chosen_ids, rejected_ids (+ prompt/chosen/rejected strings)
    eval: list[dict]
    fingerprint: str  # hash of the tokenized ids: keys the reference and regularisation caches
    stats: dict[str, Any] = field(default_factory=dict)


def _split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not 0 < fraction < 1:
        raise ConfigError(f"data.eval_fraction must lie in (0, 1), got {fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def load_standard_rows(cfg, tokenizer) -> tuple[list[dict], list[dict], dict]:
    """(train rows, eval rows, stats) as standard ``prompt``/``chosen``/``rejected`` strings."""
    source = cfg.source
    if source == "synthetic":
        train, evaluation = synthetic.make_preference_data(cfg.n_train, cfg.n_eval, seed=cfg.seed)
        return train, evaluation, {"source": "synthetic", "rows": len(train) + len(evaluation)}
    if source == "local":
        if not cfg.get("path"):
            raise ConfigError("data=local needs data.path=FILE (jsonl, json, parquet or csv)")
        train, stats = data_lib.load_pairs(cfg.path, tokenizer=tokenizer, on_bad_row=cfg.on_bad_row)
        if cfg.get("eval_path"):
            evaluation, eval_stats = data_lib.load_pairs(cfg.eval_path, tokenizer=tokenizer, on_bad_row=cfg.on_bad_row)
            stats = {"train": stats, "eval": eval_stats}
        else:
            train, evaluation = _split(train, cfg.eval_fraction, cfg.seed)
        return train, evaluation, stats
    if source == "hub":
        train = data_lib.load_hub_pairs(cfg.name, cfg.train_split, tokenizer=tokenizer, on_bad_row=cfg.on_bad_row)
        evaluation = data_lib.load_hub_pairs(cfg.name, cfg.eval_split, tokenizer=tokenizer, on_bad_row=cfg.on_bad_row)
        return train[0], evaluation[0], {"train": train[1], "eval": evaluation[1]}
    raise ConfigError(f"data.source must be synthetic, local or hub, got {source!r}")


def _limit(rows: list[dict], limit: int | None) -> list[dict]:
    return rows[:limit] if limit else rows


def prepare_data(cfg, tokenizer) -> PreparedData:
    """Load, convert, validate and tokenize; rows left with an empty completion are dropped and counted."""
    train_rows, eval_rows, load_stats = load_standard_rows(cfg, tokenizer)
    train_rows, eval_rows = _limit(train_rows, cfg.get("max_train_rows")), _limit(eval_rows, cfg.get("max_eval_rows"))
    lengths = {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length}
    train, train_stats = data_lib.tokenize_pairs(train_rows, tokenizer, **lengths)
    evaluation, eval_stats = data_lib.tokenize_pairs(eval_rows, tokenizer, **lengths)
    if not train:
        raise ConfigError("no training pairs left after tokenization (check data.max_length / max_prompt_length)")
    digest = hashlib.sha256()
    for example in train + evaluation:
        digest.update(json.dumps([example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]]).encode())
    stats = {"load": load_stats, "tokenize_train": train_stats, "tokenize_eval": eval_stats}
    log.info("data: %d train pairs, %d eval pairs", len(train), len(evaluation))
    return PreparedData(train, evaluation, digest.hexdigest()[:16], stats)
