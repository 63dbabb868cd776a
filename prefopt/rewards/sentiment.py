"""``sentiment``: VADER compound sentiment of the completion. Higher = more positive."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from prefopt.rewards.base import Reward, register_reward


@register_reward("sentiment")
class SentimentReward(Reward):
    """VADER's compound score of the completion, in [-1, 1] (prompt ignored; 0.0 for text without sentiment,
    including empty text). Higher = more positive. The analyzer (``vaderSentiment``, rule-based, no model download)
    is built once per reward object."""

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        return torch.tensor([self.analyzer.polarity_scores(c)["compound"] for c in completions], dtype=torch.float32)
