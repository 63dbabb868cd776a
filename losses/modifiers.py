"""DPO modifiers: WPO weighting, LD-DPO and f-divergence DPO, written once and applied to every loss they fit.

A modifier is a hyper-parameter that every fitting registered loss accepts besides its own, with TRL 1.16
``DPOConfig``'s name and meaning (``losses.get("dpo", ld_alpha=0.5)``, ``prefopt-train loss.ld_alpha=0.5``):

* ``use_weighting`` — **WPO** (Zhou et al. 2024, arXiv 2406.11827, Eq. 2): each pair's loss is multiplied by
  ``w(y_w)·w(y_l)``, ``w(y) = exp((1/|y|) Σ_t [log π_θ(y_t | x, y_<t) − log Σ_v π_θ(v | x, y_<t)²])``, detached: the
  policy's length-normalised probability of the completion relative to its own sampling distribution. On **summed**
  log-probs: ``log w = (S_θ(y) − Q_θ(y)) / |y|`` with ``Q_θ(y) = Σ_t log Σ_v p_v²`` (``policy_*_log_sum_sq_probs``,
  from the chunked LM head). Every pairwise loss except those that sort the batch (``aot``, ``aot_unpaired``: their
  rows are not pairs), as TRL.
* ``ld_alpha`` — **LD-DPO** (Liu et al. 2024, arXiv 2409.06411): ``S → S_shared + α·(S − S_shared)``, where
  ``S_shared`` sums the log-probs of the first ``min(|y_w|, |y_l|)`` completion tokens (``*_shared_logps``), for the
  policy and the reference alike: tokens beyond the shorter completion count α. The loss then sees these **summed**
  values in place of ``S`` (one that averages divides by the full length, as TRL). ``None`` = off, 1 = plain, 0 =
  both completions cut to the shorter one's length. Every pairwise loss of both completions.
* ``f_divergence_type`` / ``f_alpha_divergence_coef`` — **f-DPO** (Wang et al. 2023, arXiv 2309.16240): the
  log-ratio ``ρ = S_θ − S_ref`` enters the margin as ``f'(e^ρ)``, ``Δ = f'(e^{ρ_w}) − f'(e^{ρ_l})``: ``reverse_kl``
  ρ (plain DPO), ``forward_kl`` 1 − e^{−ρ}, ``js_divergence`` log 2 + log σ(ρ), ``alpha_divergence``
  (e^{(α−1)ρ} − 1)/(α − 1) (α = ``f_alpha_divergence_coef``; α = 1 is reverse_kl). Only losses of the margin Δ
  alone (registered ``margin_only=True``): the reparameterisation leaves β·log Z(x), which cancels only in ρ_w − ρ_l
  (TRL #6559); any other loss refuses a non-default value. The logged ``rewards/*`` stay β·ρ, as TRL's.

Order, as TRL: WPO's weights from the raw summed log-probs; LD-DPO's values replace the summed log-probs (policy
and reference); f-DPO's scores replace the log-ratios in the margin; the per-pair loss is multiplied by the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from losses._common import HyperParameterError, LossOutput, MissingInputError, reference_metrics, token_mean

__all__ = [
    "HPARAMS",
    "F_DIVERGENCES",
    "WPO_INPUTS",
    "LD_POLICY_INPUTS",
    "LD_REFERENCE_INPUTS",
    "INPUTS",
    "Modifiers",
    "wpo_weights",
    "ld_logps",
    "f_divergence_scores",
    "supported",
    "refusal",
]

# every modifier hyper-parameter and its default (off), TRL DPOConfig's names
HPARAMS: dict[str, Any] = {
    "use_weighting": False,
    "ld_alpha": None,
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
}
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_F_KEYS = ("f_divergence_type", "f_alpha_divergence_coef")
_POLICY = ("policy_chosen_logps", "policy_rejected_logps")
_REFERENCE = ("ref_chosen_logps", "ref_rejected_logps")
# [B] Σ_t log Σ_v π_θ(v | x, y_<t)² over each completion's tokens (no gradient), and the completions' lengths
WPO_INPUTS = (
    *_POLICY,
    "chosen_lengths",
    "rejected_lengths",
    "policy_chosen_log_sum_sq_probs",
    "policy_rejected_log_sum_sq_probs",
)
# [B] summed log-probs of the first min(|y_w|, |y_l|) completion tokens of each side
LD_POLICY_INPUTS = ("policy_chosen_shared_logps", "policy_rejected_shared_logps")
LD_REFERENCE_INPUTS = ("ref_chosen_shared_logps", "ref_rejected_shared_logps")
# every input a modifier takes: a loss with the modifiers off drops them, as it drops unused standard inputs
INPUTS = tuple(dict.fromkeys((*WPO_INPUTS, *LD_POLICY_INPUTS, *LD_REFERENCE_INPUTS)))
# float32 exponents clamp where TRL clamps them, so e^t stays finite once cast back (fp16: 11)
_EXP_CLAMP = {torch.float16: 11.0}


# ------------------------------------------------------------------------------------------------- the math
def wpo_weights(
    policy_chosen_logps: Tensor,  # [B] S_θ(y_w), summed
    policy_rejected_logps: Tensor,  # [B]
    policy_chosen_log_sum_sq_probs: Tensor,  # [B] Q_θ(y_w) = Σ_t log Σ_v p_v²
    policy_rejected_log_sum_sq_probs: Tensor,  # [B]
    chosen_lengths: Tensor,  # [B] completion tokens
    rejected_lengths: Tensor,  # [B]
) -> Tensor:
    """WPO's pair weights ``w(y_w)·w(y_l)``, ``w(y) = exp((S_θ(y) − Q_θ(y)) / |y|)`` (|y| clamped ≥ 1), detached:
    arXiv 2406.11827 Eq. 2 with TRL 1.16's aligned probabilities. [B]."""
    chosen = token_mean(policy_chosen_logps.detach() - policy_chosen_log_sum_sq_probs.detach(), chosen_lengths)
    rejected = token_mean(policy_rejected_logps.detach() - policy_rejected_log_sum_sq_probs.detach(), rejected_lengths)
    return torch.exp(chosen) * torch.exp(rejected)


def ld_logps(summed_logps: Tensor, shared_logps: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO's log-probs ``S_shared + α·(S − S_shared)`` (arXiv 2409.06411): the tokens beyond the pair's shared
    length ``min(|y_w|, |y_l|)`` weighted α. [B] summed in, [B] out."""
    return shared_logps + ld_alpha * (summed_logps - shared_logps)


def f_divergence_scores(logratios: Tensor, f_divergence_type: str, alpha: float = 0.5) -> Tensor:
    """``f'(e^ρ)`` of f-DPO (arXiv 2309.16240, Table 1) for the log-ratios ``ρ`` [B]: reverse_kl ρ, forward_kl
    1 − e^{−ρ}, js_divergence log 2 + log σ(ρ), alpha_divergence (e^{(α−1)ρ} − 1)/(α − 1) with the exponent clamped
    at 80 (11 in fp16) as TRL, and reverse_kl at |α − 1| < 1e-6 (its limit)."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return -torch.expm1(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        exponent = (alpha - 1.0) * logratios
        wide = torch.promote_types(exponent.dtype, torch.float32)
        exponent = exponent.to(wide).clamp(max=_EXP_CLAMP.get(logratios.dtype, 80.0))
        return (torch.expm1(exponent) / (alpha - 1.0)).to(logratios.dtype)
    raise HyperParameterError(f"f_divergence_type must be one of {list(F_DIVERGENCES)}, got {f_divergence_type!r}")


# ---------------------------------------------------------------------------------------------- declarations
def supported(spec: Any) -> dict[str, Any]:
    """The modifier hyper-parameters (with their defaults) that the loss ``spec`` (a ``LossSpec``) accepts."""
    if refusal(spec, "ld_alpha", 0.0) is not None:
        return {}
    out = {"ld_alpha": None}
    if refusal(spec, "use_weighting", True) is None:
        out["use_weighting"] = False
    if spec.margin_only:
        out.update({key: HPARAMS[key] for key in _F_KEYS})
    return {key: out[key] for key in HPARAMS if key in out}


def refusal(spec: Any, key: str, value: Any) -> str | None:
    """Why the loss ``spec`` cannot take modifier ``key`` = ``value`` (one line), or None when it can (a default
    f-divergence setting is accepted by every pairwise loss: it changes nothing)."""
    name = spec.name
    if spec.kind != "pair":
        return f"loss '{name}' is a {spec.kind} loss; {key} modifies pairwise (chosen vs rejected) losses only"
    if spec.accepts_any_input:
        return f"loss '{name}' combines other losses: set {key} on its parts (e.g. combo.parts.dpo.{key})"
    if not set(_POLICY) <= set(spec.inputs):
        return f"loss '{name}' does not compare both completions' log-probs, so {key} does not apply to it"
    if key == "use_weighting" and spec.batch_dependent and value:
        return (
            f"loss '{name}' sorts the batch, so its rows are not pairs: WPO's pair weights (use_weighting) do not apply"
        )
    if key in _F_KEYS and not spec.margin_only and value != HPARAMS[key]:
        return (
            f"loss '{name}' is not a function of the margin ρ_w − ρ_l alone, so {key} does not apply: f-DPO's "
            "β·log Z(x) cancels only there (TRL #6559; it fits dpo, cdpo, robust, hinge, sigmoid_norm, discopop, ipo, "
            "exo_pair)"
        )
    return None


def _check(key: str, value: Any) -> None:
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if key == "use_weighting" and not isinstance(value, bool):
        raise HyperParameterError(f"use_weighting must be true or false, got {value!r}")
    if key == "ld_alpha" and value is not None and not (finite and 0.0 <= value <= 1.0):
        raise HyperParameterError(f"ld_alpha must lie in [0.0, 1.0] or be null (off), got {value!r}")
    if key == "f_divergence_type" and value not in F_DIVERGENCES:
        raise HyperParameterError(f"f_divergence_type must be one of {list(F_DIVERGENCES)}, got {value!r}")
    if key == "f_alpha_divergence_coef" and not finite:
        raise HyperParameterError(f"f_alpha_divergence_coef must be a finite number, got {value!r}")


# ------------------------------------------------------------------------------------------------- binding
@dataclass(frozen=True)
class Modifiers:
    """The modifier settings of one loss: what they add to its inputs, and the modified call."""

    use_weighting: bool = False
    ld_alpha: float | None = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5

    @classmethod
    def of(cls, loss_name: str, hparams: Mapping[str, Any]) -> Modifiers:
        """The settings among ``hparams`` (validated; other keys ignored)."""
        settings = {key: hparams[key] for key in HPARAMS if key in hparams}
        for key, value in settings.items():
            try:
                _check(key, value)
            except HyperParameterError as error:
                raise HyperParameterError(f"{loss_name}.{error}") from None
        return cls(**settings)

    @property
    def f_divergence(self) -> bool:
        return self.f_divergence_type != "reverse_kl" and not (
            self.f_divergence_type == "alpha_divergence" and abs(self.f_alpha_divergence_coef - 1.0) < 1e-6
        )

    @property
    def active(self) -> bool:
        return self.use_weighting or self.ld_alpha is not None or self.f_divergence

    def inputs(self, loss_inputs: tuple[str, ...]) -> tuple[str, ...]:
        """The inputs the active modifiers need, for a loss with inputs ``loss_inputs`` (LD-DPO's reference prefixes
        only where the loss takes the reference)."""
        names: list[str] = []
        if self.use_weighting:
            names += WPO_INPUTS
        if self.ld_alpha is not None:
            names += LD_POLICY_INPUTS
            if set(_REFERENCE) <= set(loss_inputs):
                names += LD_REFERENCE_INPUTS
        return tuple(dict.fromkeys(names))

    def apply(self, fn: Callable[..., LossOutput], arguments: dict[str, Any], extra: Mapping[str, Tensor], beta):
        """``fn(**arguments)`` modified: ``arguments`` are the loss's own (inputs and hyper-parameters), ``extra`` the
        inputs only the modifiers take, ``beta`` the loss's β (the logged rewards' scale)."""
        given = {**arguments, **extra}
        missing = [n for n in self.inputs(tuple(arguments)) if given.get(n) is None]
        if missing:
            raise MissingInputError(f"the modifiers {self.describe()} need input(s) {', '.join(missing)}")
        arguments = dict(arguments)
        weights = wpo_weights(**{n: given[n] for n in WPO_INPUTS}) if self.use_weighting else None
        if self.ld_alpha is not None:
            for key in (*_POLICY, *_REFERENCE):
                if key in arguments and arguments[key] is not None:
                    shared = given[key.replace("_logps", "_shared_logps")]
                    arguments[key] = ld_logps(arguments[key], shared, self.ld_alpha)
        metrics = None
        if self.f_divergence:
            logps = tuple(arguments[k] for k in (*_POLICY, *_REFERENCE))
            metrics = reference_metrics(beta, *logps)
            for policy_key, ref_key in zip(_POLICY, _REFERENCE, strict=True):
                logratios = arguments[policy_key] - arguments[ref_key]
                arguments[policy_key] = f_divergence_scores(
                    logratios, self.f_divergence_type, self.f_alpha_divergence_coef
                )
                arguments[ref_key] = torch.zeros_like(logratios)
        out = fn(**arguments)
        if metrics is not None:
            out.metrics.update(metrics)
        if weights is not None:
            per_example = out.per_example * weights
            out = LossOutput(per_example.mean(), per_example, {**out.metrics, "wpo/weight": weights.mean()})
        return out

    def describe(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in HPARAMS if getattr(self, k) != HPARAMS[k])
