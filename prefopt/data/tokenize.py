"""Token ids for standard preference pairs: the prompt and each completion are tokenized separately, then truncated.

Rules, in order:

1. every text is encoded with ``tokenizer(text, add_special_tokens=False)``;
2. a pair whose chosen or rejected text encodes to no tokens at all is dropped (``None``);
3. the prompt gets the BOS token in front when the tokenizer's normal encoding adds one, unless it already starts
   with it; each completion gets the EOS token at the end, unless it already ends with it;
4. the prompt is cut from the left to ``max_prompt_length`` tokens (its end is kept, and so is a leading BOS);
5. each completion is cut from the right to ``max_length - len(prompt)`` tokens (its EOS is lost when it is cut).

Since ``max_prompt_length < max_length``, a completion always keeps at least one token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

__all__ = ["tokenize_pair", "tokenize_pairs"]

logger = logging.getLogger("prefopt.data")

FIELDS = ("prompt", "chosen", "rejected")
_BATCH_SIZE = 1000


@dataclass(frozen=True)
class _Specials:
    """The tokenizer's BOS/EOS ids and whether its normal encoding starts with BOS."""

    bos: int | None
    add_bos: bool
    eos: int


def tokenize_pair(
    example: dict[str, str], tokenizer: Any, *, max_length: int, max_prompt_length: int
) -> dict[str, Any] | None:
    """Tokenize one standard pair; ``None`` when a completion has no tokens.

    Returns the example's own keys (``prompt``, ``chosen``, ``rejected``, ...) plus ``"prompt_ids"``,
    ``"chosen_ids"``, ``"rejected_ids"`` (lists of ints) and ``"truncated"`` (whether anything was cut). See the
    module docstring for the rules.
    """
    _check_lengths(max_length, max_prompt_length)
    specials = _specials(tokenizer)
    prompt, chosen, rejected = (_encode(tokenizer, [example[field]])[0] for field in FIELDS)
    ids = _assemble(prompt, chosen, rejected, specials, max_length, max_prompt_length)
    return None if ids is None else {**example, **ids}


def tokenize_pairs(
    examples: list[dict[str, str]], tokenizer: Any, *, max_length: int, max_prompt_length: int
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Tokenize many pairs (in batches) with the rules of :func:`tokenize_pair`; return the kept ones and stats.

    ``stats`` is ``{"pairs", "kept", "dropped_empty_completion", "truncated"}``; ``truncated`` counts kept pairs.
    One warning goes to the ``prefopt.data`` logger when any pair was dropped or truncated.
    """
    _check_lengths(max_length, max_prompt_length)
    specials = _specials(tokenizer)
    columns = [_encode(tokenizer, [example[field] for example in examples]) for field in FIELDS]
    kept = []
    for example, prompt, chosen, rejected in zip(examples, *columns, strict=True):
        ids = _assemble(prompt, chosen, rejected, specials, max_length, max_prompt_length)
        if ids is not None:
            kept.append({**example, **ids})
    return kept, _stats("pairs", len(examples), kept, max_length, max_prompt_length)


def _stats(
    unit: str, total: int, kept: list[dict], max_length: int, max_prompt_length: int, label: str | None = None
) -> dict[str, int]:
    """What tokenizing ``total`` rows (``unit``: pairs or rows, the count's key) kept, dropped and truncated; one
    warning on the ``prefopt.data`` logger (naming them ``label``, default ``unit``) when any was dropped or
    truncated."""
    stats = {
        unit: total,
        "kept": len(kept),
        "dropped_empty_completion": total - len(kept),
        "truncated": sum(row["truncated"] for row in kept),
    }
    if stats["dropped_empty_completion"] or stats["truncated"]:
        logger.warning(
            "tokenized %d %s: dropped %d with an empty completion, truncated %d (max_length=%d, max_prompt_length=%d)",
            total, label or unit, stats["dropped_empty_completion"], stats["truncated"], max_length, max_prompt_length,
        )  # fmt: skip
    return stats


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be less than max_length ({max_length}) "
            "to leave room for the completions"
        )


def _specials(tokenizer: Any) -> _Specials:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; completions must end with an end-of-sequence token")
    bos = tokenizer.bos_token_id
    add_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    return _Specials(bos=bos, add_bos=add_bos, eos=eos)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, encoding ``_BATCH_SIZE`` texts per call."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), _BATCH_SIZE):
        ids.extend(tokenizer(texts[start : start + _BATCH_SIZE], add_special_tokens=False)["input_ids"])
    return ids


def _assemble(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    specials: _Specials,
    max_length: int,
    max_prompt_length: int,
) -> dict[str, Any] | None:
    """Add BOS/EOS and truncate (rules 2-5 of the module docstring)."""
    if not chosen or not rejected:
        return None
    if specials.add_bos and prompt[:1] != [specials.bos]:
        prompt = [specials.bos, *prompt]
    chosen, rejected = (ids if ids[-1] == specials.eos else [*ids, specials.eos] for ids in (chosen, rejected))
    cut_prompt = _keep_end(prompt, max_prompt_length, specials.bos)
    budget = max_length - len(cut_prompt)
    return {
        "prompt_ids": cut_prompt,
        "chosen_ids": chosen[:budget],
        "rejected_ids": rejected[:budget],
        "truncated": len(cut_prompt) < len(prompt) or len(chosen) > budget or len(rejected) > budget,
    }


def _keep_end(prompt: list[int], limit: int, bos: int | None) -> list[int]:
    """The last ``limit`` tokens of the prompt; a leading BOS stays in front (and counts toward the limit)."""
    if len(prompt) <= limit:
        return prompt
    if bos is not None and prompt[0] == bos:
        return [bos, *prompt[len(prompt) - limit + 1 :]]
    return prompt[-limit:]
