"""Rewards by name or config, and scoring completions with several of them at once.

A reward is a :class:`Reward`: ``reward(prompts, completions) -> Tensor[N]`` (float32, CPU, finite) and
``reward.token_scores(prompts, completions, tokens) -> TokenScores`` (per-token values and assigned masks).

    get_reward("lexicon")(prompts, completions)  # [N]
    get_reward("conciseness", target=20)(prompts, completions)  # [N]
    build_reward(OmegaConf.load("conf/reward/readability.yaml"))  # from a config (see build_reward)
    score_completions(["lexicon", "length"], prompts, completions)  # [N, 2], z-normalised per column

Registered (``REWARDS``; each class documents its direction): ``length``, ``conciseness``, ``lexicon``,
``repetition``, ``sentiment`` (VADER), ``readability`` (Flesch Reading Ease), ``classifier`` (a sequence
classification model). Register more with ``@register_reward("name")`` on a :class:`Reward` subclass; wrap a plain
function ``fn(prompts, completions) -> list | Tensor`` with :class:`FunctionReward`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig

from prefopt.config import plain
from prefopt.rewards.base import REWARDS, FunctionReward, Reward, TokenScores, register_reward
from prefopt.rewards.classifier import ClassifierReward
from prefopt.rewards.flesch import ReadabilityReward
from prefopt.rewards.length import ConcisenessReward, ConstantReward, LengthReward
from prefopt.rewards.lexicon import LexiconReward
from prefopt.rewards.repetition import RepetitionReward
from prefopt.rewards.sentiment import SentimentReward
from prefopt.rewards.simple import length_reward, lexicon_reward

RewardFn = Callable[[Sequence[str], Sequence[str]], torch.Tensor]  # a plain reward function (see FunctionReward)
RewardSpec = str | Mapping | DictConfig | Reward  # what build_reward and score_completions accept per reward

__all__ = [
    "REWARDS",
    "ClassifierReward",
    "ConcisenessReward",
    "FunctionReward",
    "LengthReward",
    "ConstantReward",
    "LexiconReward",
    "ReadabilityReward",
    "RepetitionReward",
    "Reward",
    "RewardFn",
    "SentimentReward",
    "TokenScores",
    "build_reward",
    "get_reward",
    "length_reward",
    "lexicon_reward",
    "register_reward",
    "score_completions",
    "znormalize",
]

# keys of a `_target_` config that describe the reward rather than being arguments of the target
_META_KEYS = ("name", "higher_is_better")


def get_reward(name: str, **kwargs: Any) -> Reward:
    """A new instance of the reward registered as ``name``, built with ``kwargs``; ``KeyError`` listing the valid
    names for an unknown name, ``TypeError`` listing the accepted arguments for a wrong keyword."""
    try:
        cls = REWARDS[name]
    except (KeyError, TypeError):
        raise KeyError(f"unknown reward {name!r}; valid: {sorted(REWARDS)}") from None
    signature = inspect.signature(cls)
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        raise TypeError(f"reward {name!r}: {e}; accepted arguments: {list(signature.parameters)}") from None
    return cls(**kwargs)


def build_reward(cfg: RewardSpec) -> Reward:
    """A :class:`Reward` from a config (dict or ``DictConfig``, resolved first; a ``???`` value raises):

    - ``{"name": registered_name, **kwargs}``: ``get_reward(name, **kwargs)``;
    - ``{"_target_": "dotted.path", **kwargs}``: instantiated with ``hydra.utils.instantiate`` (``_convert_: all``
      unless given). A class target is constructed with the kwargs; a non-class target (a function) is taken as
      the reward function itself, the kwargs bound to it (``_partial_`` defaults to true for functions; set
      ``_partial_: false`` to call a factory that returns the reward). A result that is not a :class:`Reward` but
      is callable as ``fn(prompts, completions) -> list | Tensor`` is wrapped in a :class:`FunctionReward`.
      ``name`` and ``higher_is_better`` next to ``_target_`` are not passed to the target: they set the built
      reward's attributes (``name`` defaults to the function's name for a wrapped function).

    A registered name (str) or a :class:`Reward` instance is accepted as is.
    """
    if isinstance(cfg, Reward):
        return cfg
    if isinstance(cfg, str):
        return get_reward(cfg)
    if not isinstance(cfg, (Mapping, DictConfig)):
        raise TypeError(f"a reward config must be a mapping, a registered name or a Reward, got {type(cfg).__name__}")
    cfg = plain(cfg, missing="raise")
    if "_target_" in cfg:
        return _instantiate(cfg)
    if "name" not in cfg:
        raise ValueError(f"a reward config needs `name` (one of {sorted(REWARDS)}) or `_target_`; got keys {list(cfg)}")
    name = cfg.pop("name")
    return get_reward(name, **cfg)


def _instantiate(cfg: dict[str, Any]) -> Reward:
    """The reward of a ``_target_`` config (see :func:`build_reward`)."""
    from hydra.utils import get_object, instantiate

    meta = {key: cfg.pop(key) for key in _META_KEYS if key in cfg}
    target = cfg["_target_"]
    obj = get_object(target) if isinstance(target, str) else target
    if not isinstance(obj, type):
        cfg.setdefault("_partial_", True)
    cfg.setdefault("_convert_", "all")
    result = instantiate(cfg)
    if isinstance(result, Reward):
        reward = result
    elif callable(result):
        reward = FunctionReward(result, name=meta.get("name"))
    else:
        raise TypeError(f"reward target {target!r} gave {type(result).__name__}, neither a Reward nor a callable")
    if meta.get("name"):
        reward.name = str(meta["name"])
    if "higher_is_better" in meta:
        reward.higher_is_better = bool(meta["higher_is_better"])
    return reward


_SHARED: dict[str, Reward] = {}


def _shared(name: str) -> Reward:
    """The default-argument instance of reward ``name``, built on first use (rebuilt if the name was re-registered)."""
    reward = _SHARED.get(name)
    if reward is None or type(reward) is not REWARDS.get(name):
        reward = _SHARED[name] = get_reward(name)
    return reward


def znormalize(scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Z-normalise each column of ``scores`` [N, K] over its N rows (population std); a constant column (or N = 1)
    becomes zeros, never NaN."""
    mean = scores.mean(dim=0, keepdim=True)
    std = scores.std(dim=0, correction=0, keepdim=True)
    centred = scores - mean
    return torch.where(std > eps, centred / std.clamp_min(eps), torch.zeros_like(centred))


def score_completions(
    names: Sequence[RewardSpec] | RewardSpec,
    prompts: Sequence[str],
    completions: Sequence[str],
    normalize: bool = True,
) -> torch.Tensor:
    """[N, K] float32: column k is reward ``names[k]`` (a registered name, a config for :func:`build_reward` or a
    :class:`Reward`) of each completion, z-normalised over the N completions when ``normalize``. A name's default
    instance is built once and reused across calls (e.g. VADER's analyzer in an online loop); configs are built on
    every call, so pass built :class:`Reward` objects to reuse those."""
    if isinstance(names, str | Mapping | DictConfig | Reward):
        names = [names]
    rewards = [_shared(spec) if isinstance(spec, str) else build_reward(spec) for spec in names]
    if not rewards:
        return torch.zeros(len(completions), 0)
    scores = torch.stack([reward(prompts, completions).to(torch.float32).reshape(-1) for reward in rewards], dim=1)
    return znormalize(scores) if normalize else scores
