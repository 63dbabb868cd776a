"""``readability``: Flesch Reading Ease of the completion. Higher = easier to read."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from prefopt.rewards.base import Reward, register_reward

_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+|\n+")  # split after . ! ? followed by whitespace, and at newlines
_TOKEN_RE = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]+")  # words (with inner ' and -) or runs of punctuation
_HAS_WORD_RE = re.compile(r"\w")


def tokenize_for_readability(text: str) -> str:
    """``text`` in the input format of the ``readability`` package: one sentence per line (split after ``.``,
    ``!``, ``?`` and at newlines), tokens separated by single spaces; sentences without a word are dropped."""
    lines = []
    for sentence in _SENTENCE_END_RE.split(text):
        toks = _TOKEN_RE.findall(sentence)
        if any(_HAS_WORD_RE.search(t) for t in toks):
            lines.append(" ".join(toks))
    return "\n".join(lines)


@register_reward("readability")
class ReadabilityReward(Reward):
    """Flesch Reading Ease of the completion (``readability.getmeasures(..., lang='en')``, on the text tokenised
    by :func:`tokenize_for_readability`), times ``scale``; prompt ignored. Higher = easier to read (shorter
    sentences, fewer syllables per word). Unbounded: roughly 0-100 for ordinary prose, above 100 for very short
    words and sentences, negative for dense text; ``scale: 0.01`` brings it to about [0, 1]. A completion without
    any word (empty, whitespace, punctuation only) scores ``empty_score`` (default 0.0, i.e. "hard to read"),
    unscaled, as the package refuses such text."""

    def __init__(self, scale: float = 1.0, empty_score: float = 0.0, lang: str = "en") -> None:
        import readability

        self._getmeasures = readability.getmeasures
        self.scale = float(scale)
        self.empty_score = float(empty_score)
        self.lang = lang

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        return torch.tensor([self._score_one(c) for c in completions], dtype=torch.float32)

    def _score_one(self, text: str) -> float:
        tokenized = tokenize_for_readability(text)
        if not tokenized:
            return self.empty_score
        measures = self._getmeasures(tokenized, lang=self.lang)
        return self.scale * float(measures["readability grades"]["FleschReadingEase"])
