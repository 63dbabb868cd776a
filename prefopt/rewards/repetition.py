"""``repetition``: distinct-n of the completion's words. Higher = less repetitive."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from prefopt.rewards.base import (
    Reward,
    TokenScores,
    char_to_token,
    check_pairs,
    check_tokens,
    register_reward,
    token_ends,
    word_spans,
)

_WORD_RE = re.compile(r"\w+(?:['’]\w+)*")  # lowercase words; punctuation is not a word


def distinct_n(words: Sequence[str], n: int) -> float:
    """Distinct n-grams / total n-grams of ``words``; 1.0 when there are fewer than ``n`` words."""
    grams = [tuple(words[k : k + n]) for k in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def repeated_words(words: Sequence[str], n: int) -> list[bool]:
    """Per word: whether it belongs to an n-gram occurrence that repeats an earlier one (2nd+ occurrence)."""
    seen: set[tuple[str, ...]] = set()
    flags = [False] * len(words)
    for k in range(len(words) - n + 1):
        gram = tuple(words[k : k + n])
        if gram in seen:
            flags[k : k + n] = [True] * n
        seen.add(gram)
    return flags


@register_reward("repetition")
class RepetitionReward(Reward):
    """Distinct-n of the completion's lowercase words (``\\w+`` runs, apostrophes inside words kept; punctuation
    ignored): distinct word n-grams / total n-grams, in (0, 1], 1.0 when there are fewer than ``n`` words; prompt
    ignored. Higher = less repetitive.

    ``token_scores``: every token assigned; -1 on each token overlapping a word of a repeated n-gram occurrence
    (the 2nd and later occurrences, not the first), 0 elsewhere. Words are found in ``"".join(tokens[i])``.
    """

    def __init__(self, n: int = 2) -> None:
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"repetition n must be a positive integer, got {n!r}")
        self.n = int(n)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        return torch.tensor(
            [distinct_n([w for w, _, _ in word_spans(c, _WORD_RE)], self.n) for c in completions], dtype=torch.float32
        )

    def token_scores(
        self, prompts: Sequence[str], completions: Sequence[str], tokens: Sequence[Sequence[str]]
    ) -> TokenScores:
        check_pairs(prompts, completions)
        check_tokens(completions, tokens)
        values, assigned = [], []
        for pieces in tokens:
            value = torch.zeros(len(pieces), dtype=torch.float32)
            spans = word_spans("".join(pieces), _WORD_RE)
            ends = token_ends(pieces)
            flags = repeated_words([w for w, _, _ in spans], self.n)
            for (_, start, end), repeated in zip(spans, flags, strict=True):
                if repeated:
                    value[char_to_token(ends, start) : char_to_token(ends, end - 1) + 1] = -1.0
            values.append(value)
            assigned.append(torch.ones(len(pieces), dtype=torch.bool))
        return TokenScores(values, assigned)
