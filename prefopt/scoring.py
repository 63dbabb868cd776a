"""Scorers: what the online trainer calls to turn sampled completions into the scalar reward a loss trains on.

``reward=<name>`` (``conf/reward/NAME.yaml``) scores with one reward function; ``reward=alarm`` composes a holistic
reward with aspect rewards through ALaRM's hierarchical gate (Lai et al. 2024, ``losses.alarm``). Every scorer returns
:class:`Scores`: the total [N], each component's raw values [N] (for logging) and scalar metrics.

    scorer = build_scorer(cfg.reward)
    scorer.fit(prompts, texts, pieces)        # statistics from reference samples (ALaRM's z-normalisation)
    scores = scorer(prompts, texts, pieces)   # Scores(total=[N], components={...}, metrics={...})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from losses.alarm import MODES, alarm_reward
from prefopt.config import ConfigError, plain
from prefopt.rewards import build_reward

__all__ = ["Scores", "RewardScorer", "AlarmScorer", "build_scorer"]


@dataclass
class Scores:
    total: Tensor  # [N] the reward the loss is trained on
    components: dict[str, Tensor]  # name -> [N] raw values of each reward involved
    metrics: dict[str, float] = field(default_factory=dict)
    tokens: list[Tensor] | None = None  # per sample, the reward of each completion token (sums to total), if any


class RewardScorer:
    """One reward function: the total is its score."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.reward = build_reward(cfg)
        self.name = str(cfg.get("name") or getattr(self.reward, "name", "reward"))

    def to(self, device) -> RewardScorer:
        self.reward = self.reward.to(device)
        return self

    def fit(self, prompts: Sequence[str], texts: Sequence[str], pieces: Sequence[Sequence[str]]) -> dict[str, Any]:
        return {}

    def load_stats(self, stats: Mapping[str, Any]) -> None:
        pass

    def __call__(self, prompts: Sequence[str], texts: Sequence[str], pieces: Sequence[Sequence[str]]) -> Scores:
        total = self.reward(prompts, texts)
        return Scores(total, {self.name: total})


class AlarmScorer:
    """ALaRM hierarchical reward (Lai et al. 2024, arXiv 2403.06754) over reward functions from the registry.

    The holistic reward is z-normalised with a mean and std estimated on reference samples before training (or
    given as ``holistic_mean`` / ``holistic_std``). Each aspect with a non-zero weight contributes either per-token
    values (``token_level`` aspects: the reward's ``token_scores``, like ALaRM's grammar aspect) or one value on the
    last token (sequence-level, like ALaRM's readability and completeness aspects). How each aspect's values are
    normalised is ``normalize.<aspect>``: ``mode`` ``fit`` (z-score with mean and std estimated on reference samples;
    the default for sequence-level aspects), ``fixed`` (z-score with the given ``mean`` and ``std``) or ``none``
    (raw; the default for token-level aspects), then ``scale`` · value + ``bias`` (1 and 0 by default) — so the
    authors' fixed constants (e.g. completeness × 0.3 + bias, raw language confidence) can be written down.
    """

    def __init__(self, cfg: Mapping[str, Any]):
        cfg = plain(cfg)
        self.cfg = cfg
        if cfg.get("mode") not in MODES:
            raise ConfigError(f"reward.mode must be one of {list(MODES)}, got {cfg.get('mode')!r}")
        self.holistic = build_reward(cfg["holistic"])
        self.aspects = {name: build_reward(aspect) for name, aspect in (cfg.get("aspects") or {}).items()}
        weights = {str(k): float(v) for k, v in (cfg.get("weights") or {}).items()}
        unknown = sorted(set(weights) - set(self.aspects)) + sorted(
            set(cfg.get("token_level") or []) - set(self.aspects)
        )
        if unknown:
            raise ConfigError(f"reward.weights / reward.token_level name unknown aspect(s): {', '.join(unknown)}")
        self.weights = weights
        self.token_level = set(cfg.get("token_level") or [])
        self.normalize = {
            name: self._normalization(name, (cfg.get("normalize") or {}).get(name)) for name in self.aspects
        }
        unknown = sorted(set(cfg.get("normalize") or {}) - set(self.aspects))
        if unknown:
            raise ConfigError(f"reward.normalize names unknown aspect(s): {', '.join(unknown)}")
        self.stats: dict[str, tuple[float, float]] = {}
        if cfg.get("holistic_mean") is not None and cfg.get("holistic_std") is not None:
            self.stats["holistic"] = (float(cfg["holistic_mean"]), float(cfg["holistic_std"]))

    def _normalization(self, name: str, spec: Mapping[str, Any] | None) -> dict[str, Any]:
        spec = dict(spec or {})
        unknown = sorted(set(spec) - {"mode", "mean", "std", "scale", "bias"})
        if unknown:
            raise ConfigError(
                f"reward.normalize.{name} has no key {', '.join(unknown)}; valid: mode, mean, std, scale, bias"
            )
        mode = spec.get("mode", "none" if name in self.token_level else "fit")
        if mode not in ("fit", "fixed", "none"):
            raise ConfigError(f"reward.normalize.{name}.mode must be fit, fixed or none, got {mode!r}")
        if mode == "fit" and name in self.token_level:
            raise ConfigError(f"reward.normalize.{name}: a token-level aspect is normalised fixed or none, not fit")
        if mode == "fixed" and (spec.get("mean") is None or not spec.get("std")):
            raise ConfigError(f"reward.normalize.{name}: mode fixed needs mean and a non-zero std")
        return {
            "mode": mode,
            "mean": spec.get("mean"),
            "std": spec.get("std"),
            "scale": float(spec.get("scale", 1.0)),
            "bias": float(spec.get("bias", 0.0)),
        }

    def _normalized(self, name: str, values: Tensor) -> Tensor:
        """``scale`` · (z-scored or raw ``values``) + ``bias`` as ``normalize.<name>`` says."""
        spec = self.normalize[name]
        if spec["mode"] == "fit":
            mean, std = self._stat(name)
            values = (values - mean) / std
        elif spec["mode"] == "fixed":
            values = (values - float(spec["mean"])) / float(spec["std"])
        return spec["scale"] * values + spec["bias"]

    @property
    def active(self) -> dict[str, float]:
        return {name: weight for name, weight in self.weights.items() if weight}

    def to(self, device) -> AlarmScorer:
        self.holistic = self.holistic.to(device)
        self.aspects = {name: reward.to(device) for name, reward in self.aspects.items()}
        return self

    def set_weights(self, weights: Mapping[str, float]) -> None:
        self.weights = {name: float(weights.get(name, 0.0)) for name in self.aspects}

    def fit(self, prompts: Sequence[str], texts: Sequence[str], pieces: Sequence[Sequence[str]]) -> dict[str, Any]:
        """Mean and std of the holistic and of every sequence-level aspect on (reference) samples."""
        values = {"holistic": self.holistic(prompts, texts)}
        values.update({name: reward(prompts, texts) for name, reward in self.aspects.items()})
        for name, column in values.items():
            if name == "holistic" and "holistic" in self.stats:
                continue
            std = float(column.double().std(correction=0))
            self.stats[name] = (float(column.double().mean()), std if std > 1e-8 else 1.0)
        return {name: {"mean": mean, "std": std} for name, (mean, std) in self.stats.items()}

    def load_stats(self, stats: Mapping[str, Any]) -> None:
        self.stats.update({name: (float(s["mean"]), float(s["std"])) for name, s in stats.items()})

    def _aspect_tensors(self, prompts, texts, pieces, width: int) -> tuple[dict, dict, dict]:
        n = len(texts)
        values, assigned, raw = {}, {}, {}
        for name, reward in self.aspects.items():
            raw[name] = reward(prompts, texts)
            if name not in self.active:
                continue
            grid, mask = torch.zeros(n, width), torch.zeros(n, width, dtype=torch.bool)
            if name in self.token_level:
                token = reward.token_scores(prompts, texts, pieces)
                for row, (v, a) in enumerate(zip(token.values, token.assigned, strict=True)):
                    grid[row, : v.numel()], mask[row, : a.numel()] = self._normalized(name, v.float()), a.bool()
            else:
                last = torch.tensor([max(len(p), 1) - 1 for p in pieces])
                grid[torch.arange(n), last] = self._normalized(name, raw[name])
                mask[torch.arange(n), last] = True
            values[name], assigned[name] = grid, mask
        return values, assigned, raw

    def _stat(self, name: str) -> tuple[float, float]:
        if name not in self.stats:
            raise RuntimeError(f"alarm: no statistics for '{name}'; call fit() on reference samples first")
        return self.stats[name]

    def __call__(self, prompts: Sequence[str], texts: Sequence[str], pieces: Sequence[Sequence[str]]) -> Scores:
        cfg = self.cfg
        width = max([len(p) for p in pieces] + [1])
        holistic = self.holistic(prompts, texts)
        values, assigned, raw = self._aspect_tensors(prompts, texts, pieces, width)
        mean, std = self._stat("holistic")
        lengths = torch.tensor([max(len(p), 1) for p in pieces])
        too_short = torch.tensor([len(p) < int(cfg.get("min_tokens", 0)) for p in pieces])
        if not values:  # no active aspect (holistic_only, or every weight 0): a zero aspect layer
            values, assigned = (
                {"none": torch.zeros(len(texts), width)},
                {"none": torch.zeros(len(texts), width, dtype=torch.bool)},
            )
        out = alarm_reward(
            holistic,
            values,
            assigned,
            lengths,
            aspect_weights=self.active or {"none": 0.0},
            holistic_mean=mean,
            holistic_std=std,
            threshold=float(cfg["threshold"]),
            holistic_weight=float(cfg["holistic_weight"]),
            sigmoid_shaping=bool(cfg["sigmoid_shaping"]),
            mode=str(cfg["mode"]),
            too_short=too_short,
        )
        metrics = {k: float(v) for k, v in out.metrics.items() if k != "alarm/aspect/none"}
        metrics["alarm/passed_gate_frac"] = float(out.passed_gate.float().mean())
        tokens = [out.token_rewards[row, : int(n)].float() for row, n in enumerate(lengths)]  # R_t, Σ_t = total
        return Scores(out.sequence_rewards.float(), {"holistic": holistic, **raw}, metrics, tokens)


def build_scorer(cfg: Mapping[str, Any]) -> RewardScorer | AlarmScorer:
    """``reward=alarm`` (a config with a ``holistic`` reward) -> :class:`AlarmScorer`; any other reward config ->
    :class:`RewardScorer`."""
    return AlarmScorer(cfg) if "holistic" in cfg else RewardScorer(cfg)
