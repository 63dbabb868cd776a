"""The reward interface: :class:`Reward` (sequence scores [N] and per-token scores), :class:`TokenScores`, the
registry decorator and helpers shared by the rewards.

A reward scores ``(prompt, completion)`` pairs; higher is better unless the class says ``higher_is_better =
False``. ``reward(prompts, completions)`` validates the inputs, calls :meth:`Reward.score` and returns a finite
float32 CPU tensor [N]. :meth:`Reward.token_scores` spreads the score over the completion's tokens (by default the
whole sequence score on the last token), for trainers that use dense, per-token rewards.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "REWARDS",
    "FunctionReward",
    "Reward",
    "TokenScores",
    "char_to_token",
    "check_pairs",
    "check_tokens",
    "register_reward",
    "token_ends",
    "word_spans",
]


@dataclass
class TokenScores:
    """Per-token rewards of N completions.

    ``values[i]``: float32 [T_i], ``T_i = len(tokens[i])``; ``assigned[i]``: bool [T_i], where the reward gave a
    value (a raw 0 can be assigned; unassigned positions hold 0).
    """

    values: list[Tensor]
    assigned: list[Tensor]

    def __post_init__(self) -> None:
        if len(self.values) != len(self.assigned):
            raise ValueError(f"got {len(self.values)} value rows but {len(self.assigned)} assigned rows")
        for i, (value, mask) in enumerate(zip(self.values, self.assigned, strict=True)):
            if value.dim() != 1 or value.shape != mask.shape:
                raise ValueError(f"row {i}: values {tuple(value.shape)} and assigned {tuple(mask.shape)} must be [T]")
            if value.dtype != torch.float32 or mask.dtype != torch.bool:
                raise ValueError(f"row {i}: values must be float32 and assigned bool, got {value.dtype}, {mask.dtype}")
            if not torch.isfinite(value).all():
                raise ValueError(f"row {i}: non-finite token score")

    def __len__(self) -> int:
        return len(self.values)


class Reward:
    """A reward of (prompt, completion) pairs. Subclasses implement :meth:`score` (-> [N]) and may override
    :meth:`token_scores` and :meth:`to`."""

    name: str = "reward"  # the registry name (set by @register_reward)
    higher_is_better: bool = True

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        """[N] raw scores of the pairs (inputs already validated by ``__call__``)."""
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        """[N] float32 CPU scores; ``ValueError`` on mismatched inputs, a wrong shape or a non-finite score."""
        check_pairs(prompts, completions)
        out = self.score(prompts, completions)
        out = torch.as_tensor(out).detach().to(device="cpu", dtype=torch.float32)
        if out.shape != (len(completions),):
            raise ValueError(f"reward {self.name!r} returned shape {tuple(out.shape)}, expected ({len(completions)},)")
        bad = (~torch.isfinite(out)).nonzero()
        if len(bad):
            row = int(bad[0, 0])
            raise ValueError(f"reward {self.name!r} gave a non-finite score {out[row].item()} at row {row}")
        return out

    def token_scores(
        self, prompts: Sequence[str], completions: Sequence[str], tokens: Sequence[Sequence[str]]
    ) -> TokenScores:
        """Per-token scores; ``tokens[i]`` are the decoded text pieces of completion i's tokens (``"".join(tokens[i])
        ≈ completions[i]``). Default: the sequence score assigned on the last token (no tokens: empty tensors)."""
        check_tokens(completions, tokens)
        return last_token_scores(self(prompts, completions), tokens)

    def to(self, device: torch.device | str) -> Reward:
        """Move to ``device`` (the trainer's); a no-op unless the reward holds a model. Returns ``self``."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


REWARDS: dict[str, type[Reward]] = {}
_R = TypeVar("_R", bound=type[Reward])


def register_reward(name: str) -> Callable[[_R], _R]:
    """Class decorator: register a :class:`Reward` subclass as ``name`` (and set its ``name``)."""

    def decorator(cls: _R) -> _R:
        if not (isinstance(cls, type) and issubclass(cls, Reward)):
            raise TypeError(f"@register_reward({name!r}) needs a Reward subclass, got {cls!r}")
        existing = REWARDS.get(name)
        if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"reward {name!r} is already registered to {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        REWARDS[name] = cls
        return cls

    return decorator


class FunctionReward(Reward):
    """Wrap a plain callable ``fn(prompts, completions) -> list | Tensor`` (one number per completion) as a
    :class:`Reward`; ``name`` defaults to the function's name."""

    def __init__(
        self, fn: Callable[[Sequence[str], Sequence[str]], Any], name: str | None = None, higher_is_better: bool = True
    ) -> None:
        if not callable(fn):
            raise TypeError(f"FunctionReward needs a callable, got {fn!r}")
        self.fn = fn
        self.name = name or _callable_name(fn)
        self.higher_is_better = higher_is_better

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        out = self.fn(prompts, completions)
        if isinstance(out, Tensor):
            return out.reshape(-1) if out.numel() == len(completions) else out
        return torch.tensor([float(v) for v in out], dtype=torch.float32)


def _callable_name(fn: Any) -> str:
    """``fn.__name__``, looking through ``functools.partial``; the type name for other callables."""
    while hasattr(fn, "func"):
        fn = fn.func
    return getattr(fn, "__name__", None) or type(fn).__name__


# ---------------------------------------------------------------------------------------------------- helpers
def check_pairs(prompts: Sequence[str], completions: Sequence[str]) -> None:
    """Raise when prompts and completions are not two sequences paired one to one."""
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError("prompts and completions must be sequences of strings, not a single string")
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")


def check_tokens(completions: Sequence[str], tokens: Sequence[Sequence[str]]) -> None:
    """Raise unless ``tokens`` holds one list of text pieces per completion."""
    if len(tokens) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(tokens)} token lists")
    for i, pieces in enumerate(tokens):
        if isinstance(pieces, str):
            raise TypeError(f"tokens[{i}] must be a sequence of token strings, not a single string")


def last_token_scores(scores: Tensor, tokens: Sequence[Sequence[str]]) -> TokenScores:
    """Each sequence score on the last token of its completion (no tokens: empty tensors)."""
    values, assigned = [], []
    for score, pieces in zip(scores.tolist(), tokens, strict=True):
        value = torch.zeros(len(pieces), dtype=torch.float32)
        mask = torch.zeros(len(pieces), dtype=torch.bool)
        if len(pieces):
            value[-1], mask[-1] = score, True
        values.append(value)
        assigned.append(mask)
    return TokenScores(values, assigned)


def token_ends(pieces: Sequence[str]) -> list[int]:
    """Cumulative end character offsets of the token pieces: token j covers ``[ends[j-1], ends[j])``."""
    ends, total = [], 0
    for piece in pieces:
        total += len(piece)
        ends.append(total)
    return ends


def char_to_token(ends: Sequence[int], char: int) -> int:
    """The token covering character ``char`` of ``"".join(pieces)`` (given ``token_ends(pieces)``); characters
    past the end map to the last token. ``ends`` must be non-empty."""
    return min(bisect.bisect_right(ends, char), len(ends) - 1)


def word_spans(text: str, pattern: re.Pattern[str]) -> list[tuple[str, int, int]]:
    """``(lowercase word, start, end)`` for every match of ``pattern`` in ``text`` lowercased character by
    character (so offsets index ``text`` itself)."""
    lowered = "".join(ch if len(low := ch.lower()) != 1 else low for ch in text)
    return [(m.group(), m.start(), m.end()) for m in pattern.finditer(lowered)]
