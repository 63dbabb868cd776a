"""Length rewards on whitespace words: ``length`` (higher = longer) and ``conciseness`` (higher = shorter)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from prefopt.rewards.base import Reward, register_reward


@register_reward("length")
class LengthReward(Reward):
    """The number of whitespace-separated words of the completion (prompt ignored). Higher = longer."""

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        return torch.tensor([len(c.split()) for c in completions], dtype=torch.float32)


@register_reward("conciseness")
class ConcisenessReward(Reward):
    """Minus the number of whitespace words; with ``target``, minus the words beyond it, ``-max(0, words -
    target)`` (0 for any completion within the target). Higher = more concise."""

    def __init__(self, target: int | None = None) -> None:
        if target is not None and (isinstance(target, bool) or int(target) != target or target < 0):
            raise ValueError(f"conciseness target must be a non-negative integer or None, got {target!r}")
        self.target = None if target is None else int(target)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        counts = torch.tensor([len(c.split()) for c in completions], dtype=torch.float32)
        if self.target is None:
            return -counts
        return -(counts - self.target).clamp_min(0.0)


@register_reward("constant")
class ConstantReward(Reward):
    """The same ``value`` for every completion: a switched-off objective (e.g. UPO's designer-off control, where
    every advantage is 0 and the auxiliary term is a plain NLL of both completions)."""

    def __init__(self, value: float = 0.0) -> None:
        self.value = float(value)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        return torch.full((len(completions),), self.value, dtype=torch.float32)
