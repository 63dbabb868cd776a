"""The loss registry: names -> LossSpec, a decorator to register, and bound losses with validated hyper-parameters.

A loss function's signature *is* its declaration:

* positional-or-keyword parameters are tensor inputs; those without a default are required. The standard ones are
  ``policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
  rejected_lengths``; any other name is a method-specific extra (``reg_logps``, ``aux_rewards_chosen`` ...);
* keyword-only parameters (after ``*``) are hyper-parameters with their defaults.

Group losses (``kind="group"``, k sampled completions per prompt, e.g. ``rloo``) take the group inputs
``policy_logps, ref_logps, rewards, lengths``, each ``[G, K]``, in place of the pairwise ones.

Token losses (``kind="token"``, the GRPO family: ``grpo``, ``dapo``, ``gspo`` ...) take per-token inputs
(``TOKEN_INPUTS``) for N sampled completions padded to T tokens: ``policy_token_logps [N, T]`` (with grad),
``old_token_logps [N, T]`` (the sampling policy's; optional: absent means one on-policy step, ``policy.detach()``),
``ref_token_logps [N, T]`` (only when the loss's ``beta > 0``), ``completion_mask [N, T]`` (1 on completion tokens,
0 on padding) and ``advantages`` ``[N]`` or ``[N, T]`` (computed outside the loss, e.g. ``losses.group_advantages``).

Unpaired losses (``kind="unpaired"``, KTO's family: ``kto``, ``apo_zero_unpaired``) take N single completions, each
labelled desirable or undesirable, instead of pairs (``UNPAIRED_INPUTS``): ``policy_logps [N]`` and ``ref_logps [N]``
(summed log-probs; the same names as the group inputs, which are ``[G, K]`` there), ``labels [N]`` (bool, True =
desirable) and, for KTO's KL reference point, ``policy_kl_logps [M]`` and ``ref_kl_logps [M]``: the log-probs of M
mismatched (prompt, completion) pairs (TRL pairs each prompt of the batch with another row's completion), required
only by the losses that use them.

Reward losses (``kind="reward"``: ``bradley_terry``) train a reward model, not a policy: their inputs are one scalar
score per (prompt, completion) from a sequence classifier (``REWARD_INPUTS``): ``chosen_scores [B]``,
``rejected_scores [B]`` and optionally ``margins [B]`` (a per-pair margin from the data).

So a trainer reads ``needs_reference``, ``extras`` and ``kind`` from ``losses.get(name).requirements`` and builds its
batch (and skips the reference model) from that alone. Composite losses (``upo``, ``combo``) take ``**inputs`` and
give a ``requires`` hook that derives their needs from their hyper-parameters (e.g. ``upo`` over ``simpo`` needs no
reference).
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from losses import modifiers as _modifiers
from losses._common import HyperParameterError, LossOutput, MissingInputError, NonFiniteError, UnknownLossError

__all__ = [
    "STANDARD_INPUTS",
    "REFERENCE_INPUTS",
    "GROUP_INPUTS",
    "TOKEN_INPUTS",
    "UNPAIRED_INPUTS",
    "REWARD_INPUTS",
    "Requirements",
    "LossSpec",
    "BoundLoss",
    "register",
    "available",
    "get",
    "spec",
    "set_finite_checks",
    "positive",
    "non_negative",
    "in_range",
    "one_of",
    "optional",
    "lengths_if",
    "required_if",
]

REFERENCE_INPUTS = ("ref_chosen_logps", "ref_rejected_logps")
LENGTH_INPUTS = ("chosen_lengths", "rejected_lengths")
STANDARD_INPUTS = ("policy_chosen_logps", "policy_rejected_logps", *REFERENCE_INPUTS, *LENGTH_INPUTS)
GROUP_INPUTS = ("policy_logps", "ref_logps", "rewards", "lengths")  # kind "group": each [G prompts, K samples]
# kind "token": [N completions, T tokens] each, advantages [N] or [N, T]
# batch_tokens []: the completion tokens per loss call of the whole step's batch (the token-mean normaliser a trainer
# computes over every micro-batch and process)
TOKEN_INPUTS = (
    "policy_token_logps",
    "old_token_logps",
    "ref_token_logps",
    "completion_mask",
    "advantages",
    "batch_tokens",
)
# kind "unpaired": [N] single labelled completions (policy_logps / ref_logps as in GROUP_INPUTS, there [G, K]) and
# [M] mismatched (prompt, completion) pairs for KTO's KL reference point
UNPAIRED_INPUTS = ("policy_logps", "ref_logps", "labels", "policy_kl_logps", "ref_kl_logps")
# kind "reward": [B] a reward model's scores of each pair's chosen and rejected completion, optional per-pair margins
REWARD_INPUTS = ("chosen_scores", "rejected_scores", "margins")
# what a trainer passes to any loss; dropped when unused (each name once: the group and unpaired kinds share two)
_BATCH_INPUTS = tuple(dict.fromkeys((*STANDARD_INPUTS, *GROUP_INPUTS, *TOKEN_INPUTS, *UNPAIRED_INPUTS, *REWARD_INPUTS)))
# the reference inputs of the group, token and unpaired kinds (the pair kind needs both of REFERENCE_INPUTS)
_KIND_REFERENCE_INPUTS = ("ref_logps", "ref_token_logps", "ref_kl_logps")
KINDS = ("pair", "group", "token", "unpaired", "reward")
ENTRY_POINT_GROUP = "prefopt.losses"

_REGISTRY: dict[str, LossSpec] = {}
_PLUGINS_LOADED = False
_CHECK_FINITE = True

Check = Callable[[str, Any], None]


# ----------------------------------------------------------------------------------------------- hyper-parameter checks
def positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
        raise HyperParameterError(f"{name} must be a finite number > 0, got {value!r}")


def non_negative(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or not math.isfinite(value):
        raise HyperParameterError(f"{name} must be a finite number >= 0, got {value!r}")


def optional(check: Check) -> Check:
    """``check`` unless the value is None."""

    def maybe(name: str, value: Any) -> None:
        if value is not None:
            check(name, value)

    return maybe


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    """A check for ``low <(=) value <(=) high``; the message writes the interval."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def check(name: str, value: Any) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:
            raise HyperParameterError(f"{name} must lie in {interval}, got {value!r}")

    return check


def one_of(*choices: Any) -> Check:
    def check(name: str, value: Any) -> None:
        if value not in choices:
            raise HyperParameterError(f"{name} must be one of {list(choices)}, got {value!r}")

    return check


# --------------------------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class Requirements:
    """What a configured loss needs from the batch."""

    inputs: tuple[str, ...]  # every required tensor input, standard and extra
    optional_inputs: tuple[str, ...]  # used when given
    # "pair" (chosen vs rejected), "group" (k samples per prompt), "token" (per-token, GRPO family) or "unpaired"
    # (single completions labelled desirable / undesirable, KTO family) or "reward" (a reward model's scores of pairs)
    kind: str

    @property
    def needs_reference(self) -> bool:
        """ref_chosen_logps and ref_rejected_logps, or any of a group / unpaired loss's ``ref_logps``, a token loss's
        ``ref_token_logps`` or an unpaired loss's ``ref_kl_logps``, among the required inputs."""
        return set(REFERENCE_INPUTS) <= set(self.inputs) or bool(set(_KIND_REFERENCE_INPUTS) & set(self.inputs))

    @property
    def needs_lengths(self) -> bool:  # chosen_lengths / rejected_lengths, or a group loss's lengths
        return bool(set(LENGTH_INPUTS) & set(self.inputs)) or "lengths" in self.inputs

    @property
    def extras(self) -> tuple[str, ...]:  # required method-specific inputs
        return tuple(n for n in self.inputs if n not in _BATCH_INPUTS)

    @property
    def optional_extras(self) -> tuple[str, ...]:
        return tuple(n for n in self.optional_inputs if n not in _BATCH_INPUTS)


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., LossOutput]  # the plain, validated function
    kind: str
    paper: str  # "arXiv 2305.18290" ...
    aggregation: str  # how completion log-probs enter: "sum", "mean", or a sentence
    summary: str  # one-line formula for tables
    inputs: tuple[str, ...]  # required tensor inputs
    optional_inputs: tuple[str, ...]
    hparams: Mapping[str, Any]  # defaults (inspect.Parameter.empty = required)
    checks: Mapping[str, Check] = field(default_factory=dict)
    requires: Callable[[Mapping[str, Any]], Requirements] | None = None
    batch_dependent: bool = False  # the value of a row depends on the other rows (AOT sorts the batch)
    accepts_any_input: bool = False  # takes **inputs (composite losses pass them on)
    optimum: str = ""  # the population minimiser on a tabular policy, in words (the exact testbed's notes)
    piecewise_linear: bool = False  # minimised exactly at a vertex (the exact testbed enumerates them)
    margin_only: bool = False  # a function of the margin Δ = ρ_w − ρ_l alone: f-DPO's modifier applies
    step_sums: tuple[str, ...] = ()  # optional inputs that are LossOutput.sums totalled over the step's batch

    @property
    def modifier_hparams(self) -> dict[str, Any]:
        """The modifiers (:mod:`losses.modifiers`: WPO, LD-DPO, f-DPO) this loss takes, with their defaults (off)."""
        return _modifiers.supported(self)

    def validate(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """Unknown names and out-of-range values raise ``HyperParameterError``; returns defaults + ``hparams``, the
        modifiers' included. A modifier the loss cannot take is refused in one line saying why."""
        modifier_hparams = self.modifier_hparams
        for key in sorted(set(hparams) & set(_modifiers.HPARAMS) - set(modifier_hparams)):
            reason = _modifiers.refusal(self, key, hparams[key])
            if reason:
                raise HyperParameterError(reason)
        hparams = {k: v for k, v in hparams.items() if k in modifier_hparams or k not in _modifiers.HPARAMS}
        unknown = sorted(set(hparams) - set(self.hparams) - set(modifier_hparams))
        if unknown:
            valid = ", ".join(sorted(self.hparams)) or "none"
            valid += f" (modifiers: {', '.join(modifier_hparams)})" if modifier_hparams else ""
            raise HyperParameterError(
                f"loss '{self.name}' has no hyper-parameter {', '.join(map(repr, unknown))}; valid: {valid}"
            )
        resolved = {**self.hparams, **modifier_hparams, **hparams}
        _modifiers.Modifiers.of(self.name, resolved)  # the modifiers' own checks
        missing = sorted(k for k, v in resolved.items() if v is inspect.Parameter.empty)
        if missing:
            raise HyperParameterError(f"loss '{self.name}' needs hyper-parameter(s) {', '.join(missing)}")
        for key, check in self.checks.items():
            check(f"{self.name}.{key}", resolved[key])
        return resolved

    def requirements(self, hparams: Mapping[str, Any] | None = None) -> Requirements:
        resolved = self.validate(hparams or {})
        if self.requires is not None:
            base = self.requires(resolved)
        else:
            base = Requirements(inputs=self.inputs, optional_inputs=self.optional_inputs, kind=self.kind)
        added = _modifiers.Modifiers.of(self.name, resolved).inputs(base.inputs)  # what active modifiers take
        added = tuple(n for n in added if n not in base.inputs)
        if not added:
            return base
        optional_inputs = tuple(n for n in base.optional_inputs if n not in added)
        return Requirements(inputs=base.inputs + added, optional_inputs=optional_inputs, kind=base.kind)


# ------------------------------------------------------------------------------------------------- finite checks
def set_finite_checks(enabled: bool) -> None:
    """Turn the per-call NaN/inf checks of inputs and loss off (e.g. under CUDA graphs); on by default."""
    global _CHECK_FINITE
    _CHECK_FINITE = bool(enabled)


def _check_finite(loss_name: str, tensors: Mapping[str, Tensor], out: LossOutput) -> None:
    """One host sync when all is well; on failure name the first bad input (or the output) and its rows."""
    floats = {k: t for k, t in tensors.items() if isinstance(t, Tensor) and t.is_floating_point()}
    flags = [torch.isfinite(t).all() for t in floats.values()] + [torch.isfinite(out.loss)]
    if bool(torch.stack(flags).all()):
        return
    for key, tensor in floats.items():
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"loss '{loss_name}': input '{key}' is not finite {_bad_rows(tensor)}")
    raise NonFiniteError(
        f"loss '{loss_name}' produced a non-finite loss from finite inputs {_bad_rows(out.per_example)}"
        " (check the hyper-parameters and the scale of the log-probs)"
    )


def _bad_rows(tensor: Tensor) -> str:
    bad = ~torch.isfinite(tensor.detach())
    if tensor.dim() > 1:
        bad = bad.flatten(1).any(dim=1)
    rows = bad.nonzero().flatten().tolist() if tensor.dim() else []
    shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
    values = tensor.detach()[~torch.isfinite(tensor.detach())]
    kinds = sorted({"nan" if math.isnan(v) else ("+inf" if v > 0 else "-inf") for v in values.flatten()[:100].tolist()})
    return (f"at rows [{shown}] " if tensor.dim() else "") + f"({'/'.join(kinds)})"


# ------------------------------------------------------------------------------------------------------- register
def register(
    name: str,
    *,
    paper: str,
    summary: str,
    aggregation: str = "sum",
    kind: str = "pair",
    checks: Mapping[str, Check] | None = None,
    requires: Callable[[Mapping[str, Any]], Requirements] | None = None,
    batch_dependent: bool = False,
    optimum: str = "",
    piecewise_linear: bool = False,
    margin_only: bool = False,
    step_sums: tuple[str, ...] = (),
) -> Callable[[Callable[..., LossOutput]], Callable[..., LossOutput]]:
    """Register a loss under ``name``; the decorated function becomes the validated plain function.

    ``paper``, ``summary`` (a one-line formula), ``aggregation`` and ``optimum`` (its population minimiser, in words)
    describe it wherever losses are listed (README table, the exact testbed's report), so a new loss is described
    correctly without editing any of them.

    ``checks`` maps hyper-parameter names to range checks (``positive``, ``in_range(0, 0.5, high_open=True)``...),
    applied by ``losses.get`` and by every plain call. Registering a name twice is an error.

    ``margin_only``: the loss depends on the log-ratios only through the margin ``Δ = ρ_w − ρ_l`` (per-token averaged
    where it averages), so f-DPO's ``f_divergence_type`` applies to it. Every pairwise loss also takes the modifiers
    of :mod:`losses.modifiers` that fit it (``use_weighting``, ``ld_alpha``), in its plain call too.

    ``step_sums`` names optional inputs that are statistics over the whole step's batch: the loss returns their
    partial sums over its call in ``LossOutput.sums`` and a trainer that splits a step into several calls totals them
    first (a pass without gradient) and passes the totals back under the same names.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def decorate(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        if name in _REGISTRY:
            raise ValueError(f"loss '{name}' is already registered (by {_REGISTRY[name].fn.__module__})")
        signature = inspect.signature(fn)
        inputs, optional, hparams = [], [], {}
        for param in signature.parameters.values():
            if param.kind is inspect.Parameter.KEYWORD_ONLY:
                hparams[param.name] = param.default
            elif param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
                (inputs if param.default is inspect.Parameter.empty else optional).append(param.name)
        var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        if requires is None and var_keyword:
            raise ValueError(f"loss '{name}' takes **inputs, so it must pass requires= to declare its needs")
        if set(step_sums) - set(optional):
            raise ValueError(f"loss '{name}': step_sums {sorted(step_sums)} must be optional inputs of the function")
        unknown_checks = set(checks or {}) - set(hparams)
        if unknown_checks:
            raise ValueError(f"loss '{name}': checks for unknown hyper-parameters {sorted(unknown_checks)}")

        @functools.wraps(fn)
        def plain(*args: Any, **kwargs: Any) -> LossOutput:
            settings = {k: kwargs.pop(k) for k in list(kwargs) if k in _modifiers.HPARAMS}
            modified = _modifiers.Modifiers.of(name, spec_.validate(settings)) if settings else None
            modified = modified if modified is not None and modified.active else None
            extra = {}  # inputs only the modifiers take
            if modified is not None:
                wanted = set(_modifiers.INPUTS) - set(signature.parameters)
                extra = {k: kwargs.pop(k) for k in list(kwargs) if k in wanted}
            bound = signature.bind(*args, **kwargs)
            given_hparams = {k: v for k, v in bound.arguments.items() if k in hparams}
            resolved = spec_.validate(given_hparams)
            if modified is not None:
                out = modified.apply(fn, dict(bound.arguments), extra, resolved.get("beta"))
            else:
                out = fn(*bound.args, **bound.kwargs)
            if _CHECK_FINITE:
                arguments = {**bound.arguments, **extra}
                arguments.update(arguments.pop(var_keyword, None) or {})
                tensors = {k: v for k, v in arguments.items() if isinstance(v, Tensor)}
                _check_finite(name, tensors, out)
            return out

        spec_ = LossSpec(
            name=name,
            fn=plain,
            kind=kind,
            paper=paper,
            aggregation=aggregation,
            summary=summary,
            inputs=tuple(inputs),
            optional_inputs=tuple(optional),
            hparams=hparams,
            checks=dict(checks or {}),
            requires=requires,
            batch_dependent=batch_dependent,
            accepts_any_input=var_keyword is not None,
            optimum=optimum,
            piecewise_linear=piecewise_linear,
            margin_only=margin_only,
            step_sums=tuple(step_sums),
        )
        _REGISTRY[name] = spec_
        plain.spec = spec_  # type: ignore[attr-defined]
        return plain

    return decorate


# ----------------------------------------------------------------------------------------------- lookup and binding
class BoundLoss:
    """A registered loss with validated hyper-parameters: call it with keyword tensor inputs.

    Standard inputs the loss does not use (lengths for DPO, reference log-probs for a reference-free loss) are
    dropped, so one trainer can pass the same batch to any loss; so are the group inputs (``GROUP_INPUTS``), so a
    trainer can pass the same four ``[G, K]`` tensors to any group loss, the token inputs (``TOKEN_INPUTS``), so
    it can pass the same per-token tensors to any token loss (``ref_token_logps`` is ignored where ``beta = 0``), and
    the unpaired inputs (``UNPAIRED_INPUTS``), so it can pass the same five tensors to any unpaired loss (the KL
    inputs are ignored by ``apo_zero_unpaired``). An unknown extra name is an error (a typo would otherwise be ignored
    silently).
    """

    def __init__(self, spec_: LossSpec, hparams: Mapping[str, Any]):
        self.spec = spec_
        self.name = spec_.name
        self.hparams = spec_.validate(hparams)
        self.requirements = spec_.requirements(self.hparams)
        self._given = dict(hparams)

    @property
    def needs_reference(self) -> bool:
        return self.requirements.needs_reference

    def __call__(self, **inputs: Tensor) -> LossOutput:
        req = self.requirements
        missing = [n for n in req.inputs if inputs.get(n) is None]
        if missing:
            raise MissingInputError(f"loss '{self.name}' needs input(s) {', '.join(missing)}")
        known = set(_BATCH_INPUTS) | set(req.inputs) | set(req.optional_inputs) | set(_modifiers.INPUTS)
        unknown = sorted(set(inputs) - known)
        if unknown:
            raise MissingInputError(
                f"loss '{self.name}' got unexpected input(s) {', '.join(unknown)}; "
                f"its extras are {', '.join(req.extras + req.optional_extras) or 'none'}"
            )
        if not self.spec.accepts_any_input:  # plain signature: pass only what it accepts
            accepted = set(self.spec.inputs) | set(self.spec.optional_inputs) | set(req.inputs)
            inputs = {k: v for k, v in inputs.items() if k in accepted}
        return self.spec.fn(**inputs, **self._given)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"losses.get({self.name!r}, {args})"


def required_if(
    condition: Callable[[Mapping[str, Any]], bool], names: tuple[str, ...]
) -> Callable[[Mapping[str, Any]], Requirements]:
    """A ``requires`` hook for losses whose signature has optional inputs ``names`` that become required when
    ``condition(hparams)`` holds (``rloo`` needs ``ref_logps`` only when ``kl_coef > 0``). The hook finds its loss by
    identity, so every loss needs a hook of its own (call ``required_if`` once per loss)."""

    def requires(hparams: Mapping[str, Any]) -> Requirements:
        loss_spec = next(s for s in _REGISTRY.values() if s.requires is requires)
        moved = names if condition(hparams) else ()
        return Requirements(
            inputs=loss_spec.inputs + tuple(n for n in loss_spec.optional_inputs if n in moved),
            optional_inputs=tuple(n for n in loss_spec.optional_inputs if n not in moved),
            kind=loss_spec.kind,
        )

    return requires


def lengths_if(flag: str) -> Callable[[Mapping[str, Any]], Requirements]:
    """A ``requires`` hook for losses whose signature has optional lengths that hyper-parameter ``flag`` makes
    necessary (``ipo`` with ``length_normalize=true``)."""
    return required_if(lambda hparams: bool(hparams[flag]), LENGTH_INPUTS)


def _load_plugins() -> None:
    """Import third-party losses advertised under the ``prefopt.losses`` entry-point group (once)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:  # a broken plugin must not take the built-in losses down with it
            warnings.warn(f"could not load loss plugin {entry.name!r} ({entry.value}): {exc}", stacklevel=2)


def available() -> list[str]:
    """Sorted names of every registered loss (built-in and plugins)."""
    _load_plugins()
    return sorted(_REGISTRY)


def spec(name: str) -> LossSpec:
    _load_plugins()
    if name not in _REGISTRY:
        raise UnknownLossError(f"unknown loss {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get(name: str, **hparams: Any) -> BoundLoss:
    """The loss ``name`` bound to ``hparams``; unknown names or hyper-parameters raise with the valid ones listed."""
    return BoundLoss(spec(name), hparams)
