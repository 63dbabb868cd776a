"""Unpaired rows — single completions labelled desirable or undesirable (TRL's unpaired preference format), the data
of the unpaired losses (``kto``, ``apo_zero_unpaired``).

A row is ``{"prompt", "completion", "label"}``; ``label`` is true when the completion is desirable:

* standard: ``prompt`` and ``completion`` are strings;
* conversational: ``completion`` is a list of assistant messages and ``prompt`` a list of messages (or a string: one
  user turn); the texts come from the tokenizer's chat template, split as for pairs (the prompt rendered with
  ``add_generation_prompt=True`` must be a prefix of the whole conversation's rendering).

``label`` is a boolean; 0 / 1 (integers, as parquet or pandas may store them) and ``"true"`` / ``"false"`` (CSV
text) are accepted too. A file is unpaired when its columns include ``completion`` or ``label`` and no
``chosen`` / ``rejected`` (:func:`is_unpaired`); every problem is a one-line :class:`DataError` naming the source,
the row and the field, as for pairs.

:func:`unpair` turns tokenized pairs into unpaired rows (``data.unpair=true``): each pair gives its chosen completion
as a desirable row and its rejected one as an undesirable row, in that order. :func:`tokenize_unpaired` tokenizes
with the rules of :mod:`prefopt.data.tokenize` (BOS on the prompt, EOS on the completion, prompt cut from the left,
completion from the right).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from .errors import DataError, row_error
from .formats import _check_completion, _kind, _messages, _render, _Row, _short
from .tokenize import _check_lengths, _encode, _keep_end, _specials, _stats

__all__ = ["FIELDS", "is_unpaired", "to_unpaired", "unpair", "tokenize_unpaired", "example_kind", "check_labels"]

logger = logging.getLogger("prefopt.data")

FIELDS = ("prompt", "completion", "label")
_PAIR_FIELDS = ("chosen", "rejected")


def is_unpaired(rows: Sequence[Any]) -> bool:
    """Whether rows read from one source are unpaired: some row has a ``completion`` or ``label`` key and no row has a
    non-null ``chosen`` or ``rejected`` (``datasets`` gives every row every column, so absent values come back null)."""
    dicts = [row for row in rows if isinstance(row, dict)]
    unpaired = any("completion" in row or "label" in row for row in dicts)
    paired = any(row.get(field) is not None for row in dicts for field in _PAIR_FIELDS)
    return unpaired and not paired


def example_kind(example: dict) -> str:
    """``"unpaired"`` for a tokenized unpaired row (``completion_ids``), else ``"pair"``."""
    return "unpaired" if "completion_ids" in example else "pair"


def to_unpaired(row: Any, *, source: str, index: int, tokenizer: Any = None) -> dict[str, Any]:
    """Convert and validate one unpaired row: ``{"prompt", "completion"}`` non-blank strings and ``"label"`` a bool.
    ``source`` and ``index`` (0-based) only locate errors; extra fields are ignored."""
    if not isinstance(row, dict):
        problem = f"a row must be an object with 'prompt', 'completion', 'label', got {_kind(row)}"
        raise row_error(source, index, None, problem)
    at = _Row(row, source, index)
    label = _label(at)
    if isinstance(row.get("completion"), list) or isinstance(row.get("prompt"), list):
        texts = _from_conversational(at, tokenizer)
    else:
        texts = {"prompt": at.value("prompt"), "completion": at.value("completion")}
    for field in ("prompt", "completion"):
        if not texts[field].strip():
            raise at.error(field, "is empty after conversion")
    return {**texts, "label": label}


def _label(at: _Row) -> bool:
    if "label" not in at.data:
        raise at.error("label", "is missing (true = desirable, false = undesirable)")
    value = at.data["label"]
    if value is None:
        raise at.error("label", "is missing (null)")
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise at.error("label", f"must be true (desirable) or false (undesirable), got {_short(value)}")


def _from_conversational(at: _Row, tokenizer: Any) -> dict[str, str]:
    """Prompt messages (or a string prompt as one user turn) and assistant completion messages, rendered."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise at.error(None, "conversational data (lists of messages) needs a tokenizer with a chat template")
    prompt_value = at.value("prompt")
    prompt = [{"role": "user", "content": prompt_value}] if isinstance(prompt_value, str) else _messages(at, "prompt")
    if isinstance(at.value("completion"), str):
        raise at.error("completion", "must be a list of messages, like the row's prompt, got str")
    completion = _messages(at, "completion")
    _check_completion(at, "completion", completion, 0)
    prompt_text = _render(at, "prompt", tokenizer, prompt, add_generation_prompt=True)
    full = _render(at, "completion", tokenizer, prompt + completion, add_generation_prompt=False)
    if not full.startswith(prompt_text):
        raise at.error(
            "completion",
            "cannot be split off: the chat template's rendering of the prompt (with add_generation_prompt=True) "
            "is not a prefix of its rendering of the prompt followed by this completion",
        )
    return {"prompt": prompt_text, "completion": full[len(prompt_text) :]}


def unpair(pairs: Sequence[dict]) -> list[dict]:
    """Tokenized pairs -> unpaired rows: each pair's chosen completion (label True), then its rejected one (False).
    The pair's other fields are kept (``pair`` = the pair's index, so the two rows can be told apart as a pair)."""
    rows = []
    for index, pair in enumerate(pairs):
        for side, label in (("chosen", True), ("rejected", False)):
            rows.append(
                {
                    "prompt": pair.get("prompt"),
                    "completion": pair.get(side),
                    "label": label,
                    "prompt_ids": pair["prompt_ids"],
                    "completion_ids": pair[f"{side}_ids"],
                    "truncated": bool(pair.get("truncated", False)),
                    "pair": index,
                }
            )
    return rows


def tokenize_unpaired(
    rows: list[dict[str, Any]], tokenizer: Any, *, max_length: int, max_prompt_length: int
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Tokenize unpaired rows with the rules of :mod:`prefopt.data.tokenize`; return the kept rows (their own keys
    plus ``prompt_ids``, ``completion_ids``, ``truncated``) and ``{"rows", "kept", "dropped_empty_completion",
    "truncated"}``. A row whose completion encodes to no tokens is dropped."""
    _check_lengths(max_length, max_prompt_length)
    specials = _specials(tokenizer)
    prompts = _encode(tokenizer, [row["prompt"] for row in rows])
    completions = _encode(tokenizer, [row["completion"] for row in rows])
    kept = []
    for row, prompt, completion in zip(rows, prompts, completions, strict=True):
        if not completion:
            continue
        if specials.add_bos and prompt[:1] != [specials.bos]:
            prompt = [specials.bos, *prompt]
        if completion[-1] != specials.eos:
            completion = [*completion, specials.eos]
        cut = _keep_end(prompt, max_prompt_length, specials.bos)
        budget = max_length - len(cut)
        truncated = len(cut) < len(prompt) or len(completion) > budget
        kept.append({**row, "prompt_ids": cut, "completion_ids": completion[:budget], "truncated": truncated})
    return kept, _stats("rows", len(rows), kept, max_length, max_prompt_length, "unpaired rows")


def check_labels(rows: Sequence[dict], source: str) -> None:
    """Unpaired training data needs rows of at least one label; warn when one label is missing entirely."""
    if not rows:
        raise DataError(f"{source}: no unpaired rows")
    desirable = sum(bool(row["label"]) for row in rows)
    if desirable in (0, len(rows)):
        logger.warning("%s: every row is %s", source, "desirable" if desirable else "undesirable")
