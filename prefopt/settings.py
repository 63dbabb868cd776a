"""Typed settings: the config groups ``trainer``, ``trainer.online``, ``reference``, ``regularization`` and ``data``
as frozen dataclasses, validated once by :mod:`prefopt.build` (the one module that reads a Hydra config).

``Settings.from_mapping(d)`` takes a plain dict (``prefopt.config.plain(cfg.trainer)``); a key the dataclass does not
know, or a value of the wrong kind, is a one-line :class:`~prefopt.config.ConfigError` naming ``group.key``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from prefopt.config import ConfigError

__all__ = [
    "SamplingSettings",
    "TrainerSettings",
    "ReferenceSettings",
    "RegularizationSettings",
    "DataSettings",
    "SftDataSettings",
    "AuxValueSettings",
    "Resume",
    "parse_resume",
]

Resume = Literal["latest"] | Path | None  # None: a fresh run

# trainer.report_to: accelerate tracker name -> (module that must be importable, setup.cfg extra that installs it)
TRACKERS = {
    "tensorboard": ("tensorboard", None),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
    "comet_ml": ("comet_ml", "comet"),
}


def parse_resume(value: Any) -> Resume:
    """``trainer.resume``: false/null -> None, true/"latest" -> "latest", anything else a checkpoint path."""
    if value in (False, None) or str(value).lower() in ("false", "none", "null", ""):
        return None
    if value is True or str(value).lower() in ("true", "latest"):
        return "latest"
    return Path(str(value)).expanduser()


def _coerce(group: str, name: str, kind: Any, value: Any) -> Any:
    """``value`` as ``kind`` (int, float, bool, str, tuple[float, ...], Optional of those); else a ConfigError."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None:
            return None
        return _coerce(group, name, options[0], value)
    if origin is tuple:
        if isinstance(value, str) and typing.get_args(kind)[0] is str:  # one name for a list of names
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{group}.{name} must be a list, got {value!r}")
        inner = typing.get_args(kind)[0]
        return tuple(_coerce(group, name, inner, v) for v in value)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false"):
                return str(value).lower() == "true"
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{group}.{name} must be {kind.__name__}, got {value!r}") from None
    return value


class _FromMapping:
    GROUP = ""

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None, group: str | None = None):
        group = group or cls.GROUP
        values = dict(values or {})
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in fields(cls) if f.init}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{group} has no setting {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        kwargs = {}
        for name, value in values.items():
            kind = hints[name]
            if dataclasses.is_dataclass(kind):
                kwargs[name] = kind.from_mapping(value, f"{group}.{name}")
            elif name in getattr(cls, "RAW", ()):
                kwargs[name] = value
            else:
                kwargs[name] = _coerce(group, name, kind, value)
        settings = cls(**kwargs)
        settings.validate()
        return settings

    def validate(self) -> None:
        pass


def _one_of(group: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{group}.{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


@dataclass(frozen=True)
class SamplingSettings(_FromMapping):
    """``trainer.online``: sampling for the online source and for ``trainer.sample_eval``."""

    GROUP = "trainer.online"
    samples_per_prompt: int = 4  # k completions per prompt (>= 2)
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    generation_batch_size: int = 64
    pairing: str = "best_worst"  # best_worst | all
    pair_margin: float = 0.0
    fit_prompts: int = 64  # train prompts sampled from the reference before training (reward statistics)
    eval_prompts: int = 64
    eval_samples_per_prompt: int = 2
    table_every: int = 20
    table_rows: int = 4
    scale_rewards: str = "group"  # token losses' advantages (losses.group_advantages): group | batch | none
    num_iterations: int = 1  # optimizer steps on each draw of samples (TRL's num_iterations, the papers' mu)
    steps_per_generation: int = 1  # optimizer steps per draw, each on its own slice of batch_size prompts
    mask_truncated_completions: bool = False  # token losses: no loss on completions cut at max_new_tokens
    overlong_buffer: int = 0  # DAPO's soft overlong punishment over the last this-many tokens (0 = off)
    overlong_penalty: float = 1.0
    dynamic_sampling: bool = False  # DAPO: replace prompts whose rewards all tie by newly sampled ones
    dynamic_sampling_rounds: int = 3  # extra sampling rounds at most
    kl_reward_coef: float = 0.0  # subtract coef * sampled sequence KL to the reference from each reward
    early_stopping: bool = False  # end a draw's remaining steps once a step's policy/approxkl > 1.5 * target_kl
    target_kl: float = 1.0

    def validate(self) -> None:
        _one_of(self.GROUP, "scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        for name in ("steps_per_generation",):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.online.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("overlong_buffer", "dynamic_sampling_rounds", "overlong_penalty", "kl_reward_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"trainer.online.{name} must be >= 0, got {getattr(self, name)}")
        if self.overlong_buffer > self.max_new_tokens:
            raise ConfigError(
                f"trainer.online.overlong_buffer={self.overlong_buffer} must be <= max_new_tokens={self.max_new_tokens}"
            )
        if self.num_iterations < 1:
            raise ConfigError(f"trainer.online.num_iterations must be >= 1, got {self.num_iterations}")
        if not self.target_kl > 0:
            raise ConfigError(f"trainer.online.target_kl must be > 0, got {self.target_kl}")
        if self.early_stopping and self.num_iterations * self.steps_per_generation == 1:
            raise ConfigError(
                "trainer.online.early_stopping=true ends the later steps of a draw, and each draw serves one step: "
                "set num_iterations or steps_per_generation > 1"
            )
        if self.samples_per_prompt < 2:
            raise ConfigError(
                f"trainer.online.samples_per_prompt must be >= 2 to rank samples, got {self.samples_per_prompt}"
            )
        _one_of(self.GROUP, "pairing", self.pairing, ("best_worst", "all"))


@dataclass(frozen=True)
class TrainerSettings(_FromMapping):
    """``trainer``: the loop, the optimizer and the performance switches (``conf/trainer/default.yaml``)."""

    GROUP = "trainer"
    RAW = ("resume",)
    source: str = "offline"  # offline | online
    max_steps: int = 150
    batch_size: int = 32  # global: all processes, all accumulation micro-steps
    micro_batch_size: int | None = None  # per forward per process; None = batch_size
    seed: int = 0
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    scheduler: str = "linear"
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    fused_optimizer: bool = True
    length_buckets: bool = True
    bucket_overhead_tokens: int | None = None
    flush_denormal: bool = True
    gradient_checkpointing: bool = False
    cpu: bool = False
    log_every: int = 1
    eval_every: int = 50
    eval_at_start: bool = False
    save_every: int = 0
    keep_last: int | None = None
    max_nonfinite_steps: int = 5
    resume: Any = None  # parsed by parse_resume: None | "latest" | Path
    progress_bar: bool = True
    push_to_hub: str | None = None  # a Hugging Face Hub repo id: final/ is uploaded there at the end
    report_to: tuple[str, ...] = ("tensorboard",)  # experiment trackers (TRACKERS); [] = metrics.jsonl only
    project: str = "prefopt"  # the trackers' project / experiment name
    sample_eval: bool = False
    online: SamplingSettings = field(default_factory=SamplingSettings)

    def validate(self) -> None:
        object.__setattr__(self, "resume", parse_resume(self.resume))
        _one_of("trainer", "source", self.source, ("offline", "online"))
        _one_of("trainer", "optimizer", self.optimizer, ("adamw", "rmsprop"))
        if self.micro_batch_size is None:  # each process's share of the batch, no accumulation
            world = int(os.environ.get("WORLD_SIZE", "1"))
            share = self.batch_size // world if world > 1 and self.batch_size % world == 0 else self.batch_size
            object.__setattr__(self, "micro_batch_size", share)
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError("trainer.batch_size and trainer.micro_batch_size must be >= 1")
        for tracker in self.report_to:
            _one_of("trainer", "report_to", tracker, tuple(TRACKERS))

    @property
    def buckets(self) -> bool | int:
        """``sequence_logps``'s ``buckets``: False, True (overhead per device) or the overhead in tokens."""
        if not self.length_buckets:
            return False
        return True if self.bucket_overhead_tokens is None else int(self.bucket_overhead_tokens)


@dataclass(frozen=True)
class SyncSettings(_FromMapping):
    """``reference.sync``: TR-DPO's moving reference, π_ref ← α·π + (1 − α)·π_ref every ``every`` steps."""

    GROUP = "reference.sync"
    every: int = 0  # optimizer steps between updates; 0 = a fixed reference
    alpha: float = 1.0  # weight of the policy (1 = a hard copy; TR-DPO's soft update: 0.5-0.8)

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"reference.sync.every must be >= 0 (0 = off), got {self.every}")
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"reference.sync.alpha must lie in (0, 1], got {self.alpha}")


@dataclass(frozen=True)
class ReferenceSettings(_FromMapping):
    GROUP = "reference"
    mode: str = "precomputed"  # precomputed | live
    sync: SyncSettings = field(default_factory=SyncSettings)

    def validate(self) -> None:
        if self.mode not in ("precomputed", "live"):
            raise ConfigError(f"reference.mode must be precomputed or live, got {self.mode!r}")


@dataclass(frozen=True)
class RegularizationSettings(_FromMapping):
    """``regularization``: MPO's samples from the reference policy, generated before training."""

    GROUP = "regularization"
    pool_size: int | None = None  # samples generated; None = max(train pairs, max_steps x batch_size x batch_ratio)
    batch_ratio: float = 1.0  # regularisation sequences per preference pair in each forward
    max_reuse: float = 4.0  # warn when the run draws each sample more often than this (the NLL memorises them)
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64  # generation batch

    def key(self) -> dict[str, Any]:
        """What decides the samples: part of their cache key."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("batch_ratio", "max_reuse")}

    def validate(self) -> None:
        if self.pool_size is not None and self.pool_size < 1:
            raise ConfigError(
                f"regularization.pool_size must be >= 1 (or null: sized from the data), got {self.pool_size}"
            )
        if not self.batch_ratio > 0:
            raise ConfigError(f"regularization.batch_ratio must be > 0, got {self.batch_ratio}")


@dataclass(frozen=True)
class SftDataSettings(_FromMapping):
    """``sft_data``: supervised sequences for losses that declare ``sft_logps`` (MPO's ``ptx_weight`` term)."""

    GROUP = "sft_data"
    source: str = "chosen"  # chosen (the train pairs' chosen completions) | synthetic (the embedded SFT corpus)
    batch_ratio: float = 1.0  # SFT sequences per preference pair in each forward
    n_rows: int = 2000  # synthetic: pairs whose two completions are SFT targets
    seed: int = 1000  # synthetic: its data stream (as model.sft)

    def validate(self) -> None:
        _one_of(self.GROUP, "source", self.source, ("chosen", "synthetic"))
        if not self.batch_ratio > 0:
            raise ConfigError(f"sft_data.batch_ratio must be > 0, got {self.batch_ratio}")


@dataclass(frozen=True)
class AuxValueSettings(_FromMapping):
    """``aux_value``: the value head of UPO's ``value_head`` baseline (:mod:`prefopt.value`)."""

    GROUP = "aux_value"
    hidden: int = 32  # tanh hidden units (0 = linear)
    steps: int = 300  # full-batch Adam steps
    lr: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 64  # prompts per feature forward

    def validate(self) -> None:
        if self.hidden < 0 or self.steps < 0 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError(
                "aux_value needs hidden >= 0, steps >= 0, batch_size >= 1, lr > 0 and weight_decay >= 0, got "
                f"hidden={self.hidden} steps={self.steps} batch_size={self.batch_size} lr={self.lr} "
                f"weight_decay={self.weight_decay}"
            )


@dataclass(frozen=True)
class DataSettings(_FromMapping):
    """``data``: one dataclass for every source; each source reads the fields it documents (``conf/data/``)."""

    GROUP = "data"
    RAW = ("reward",)
    source: str = "synthetic"  # synthetic | local | hub | sampled
    seed: int = 0
    max_length: int = 512
    max_prompt_length: int = 256
    on_bad_row: str = "error"  # error | skip
    unpair: bool = False  # split each pair into a desirable and an undesirable row (unpaired losses: kto, ...)
    max_train_rows: int | None = None
    max_eval_rows: int | None = None
    # synthetic / sampled
    n_train: int = 2000
    n_eval: int = 200
    # local
    path: str | None = None
    eval_path: str | None = None
    eval_fraction: float = 0.05
    # hub
    name: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    # sampled: pairs sampled from the starting policy, labelled by a gold reward
    reward: Any = None
    eval_items: int = 6
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    generation_batch_size: int = 64

    def validate(self) -> None:
        _one_of("data", "source", self.source, ("synthetic", "local", "hub", "sampled"))
        _one_of("data", "on_bad_row", self.on_bad_row, ("error", "skip"))

    def key(self) -> dict[str, Any]:
        """What decides the data of this source (the fields it reads): part of the data cache key."""
        common = ("source", "seed", "max_length", "max_prompt_length", "on_bad_row", "max_train_rows", "max_eval_rows")
        common += ("unpair",) if self.unpair else ()  # pairs keep their cache key
        per_source = {
            "synthetic": ("n_train", "n_eval"),
            "local": ("path", "eval_path", "eval_fraction"),
            "hub": ("name", "train_split", "eval_split"),
            "sampled": (
                "n_train",
                "n_eval",
                "reward",
                "eval_items",
                "max_new_tokens",
                "temperature",
                "top_p",
                "generation_batch_size",
            ),
        }[self.source]
        return {name: getattr(self, name) for name in (*common, *per_source)}
