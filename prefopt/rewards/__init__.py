"""Reward functions by name, and scoring completions with several of them at once.

Every reward is ``fn(prompts, completions) -> Tensor[N]``; :func:`score_completions` stacks several into ``[N, K]``:

    get_reward("lexicon")(prompts, completions)  # [N]
    score_completions(["lexicon", "length"], prompts, completions)  # [N, 2], z-normalised per column
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from prefopt.rewards.simple import length_reward, lexicon_reward

RewardFn = Callable[[Sequence[str], Sequence[str]], torch.Tensor]

REWARDS: dict[str, RewardFn] = {"length": length_reward, "lexicon": lexicon_reward}

__all__ = ["REWARDS", "RewardFn", "get_reward", "length_reward", "lexicon_reward", "score_completions", "znormalize"]


def get_reward(name: str) -> RewardFn:
    """The reward function registered as ``name``; ``KeyError`` listing the valid names otherwise."""
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; valid: {sorted(REWARDS)}") from None


def znormalize(scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Z-normalise each column of ``scores`` [N, K] over its N rows (population std); a constant column (or N = 1)
    becomes zeros, never NaN."""
    mean = scores.mean(dim=0, keepdim=True)
    std = scores.std(dim=0, correction=0, keepdim=True)
    centred = scores - mean
    return torch.where(std > eps, centred / std.clamp_min(eps), torch.zeros_like(centred))


def score_completions(
    names: Sequence[str], prompts: Sequence[str], completions: Sequence[str], normalize: bool = True
) -> torch.Tensor:
    """[N, K] float32: column k is reward ``names[k]`` of each completion, z-normalised over the N completions
    when ``normalize``."""
    if isinstance(names, str):
        names = [names]
    fns = [get_reward(name) for name in names]
    if not fns:
        return torch.zeros(len(completions), 0)
    scores = torch.stack([fn(prompts, completions).to(torch.float32).reshape(-1) for fn in fns], dim=1)
    return znormalize(scores) if normalize else scores
