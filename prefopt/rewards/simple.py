"""Simple reward functions of (prompts, completions): each returns a float32 tensor [N], one value per completion.

The registered :class:`~prefopt.rewards.base.Reward` classes wrap these (``length``, ``lexicon``); the functions
stay importable for plain use and as ``_target_`` examples (``conf/reward/custom.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from prefopt.data.synthetic import LEXICON, words
from prefopt.rewards.base import check_pairs


def _check_lengths(prompts: Sequence[str], completions: Sequence[str]) -> None:
    """Raise when prompts and completions are not paired one to one."""
    check_pairs(prompts, completions)


def length_reward(prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
    """[N] float32: the number of whitespace-separated words of each completion."""
    _check_lengths(prompts, completions)
    return torch.tensor([len(c.split()) for c in completions], dtype=torch.float32)


def lexicon_reward(
    prompts: Sequence[str], completions: Sequence[str], lexicon: Mapping[str, float] | None = None
) -> torch.Tensor:
    """[N] float32: the sum of ``lexicon`` values of each completion's lowercase words (split on whitespace and
    punctuation); default lexicon :data:`prefopt.synthetic.LEXICON`, for which this is the synthetic gold reward."""
    _check_lengths(prompts, completions)
    lexicon = LEXICON if lexicon is None else lexicon
    return torch.tensor([sum(lexicon.get(w, 0.0) for w in words(c)) for c in completions], dtype=torch.float32)
