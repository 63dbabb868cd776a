"""The GRPO family as token-level losses (kind ``"token"``), equal to TRL 1.16's ``GRPOTrainer`` loss.

Every loss here is one clipped (or soft-gated) policy-gradient surrogate on **per-token** log-probs of N sampled
completions padded to T tokens. Inputs (``losses.registry.TOKEN_INPUTS``):

* ``policy_token_logps [N, T]`` log π_θ(o_t | q, o_<t) with grad;
* ``old_token_logps [N, T]`` the same under the sampling policy π_old (no grad). Optional: when absent the loss
  uses ``policy_token_logps.detach()`` — one gradient step per sampled batch, as TRL does when it skips computing
  them (``num_iterations == 1`` and generation aligned with the optimizer step);
* ``ref_token_logps [N, T]`` the reference's, required only when ``beta > 0``;
* ``completion_mask [N, T]`` 1 on completion tokens, 0 on padding (bool, int or float; TRL's
  ``completion_mask``, times its ``tool_mask`` where tools are used);
* ``advantages [N]`` (one per completion, e.g. from :func:`group_advantages`) or ``[N, T]`` (per token).

Notation: ``m_t`` the mask, ``|o_i| = Σ_t m_it``, ``r_it = exp(log π_θ − log π_old)`` the token importance ratio
(GSPO: ``s_i = exp(Σ_t m_it (log π_θ − log π_old)_it / |o_i|)``, one ratio per sequence), ``A`` the advantage,
``ε_low = epsilon``, ``ε_high = epsilon_high`` (``None`` → ``epsilon``), and the per-token KL estimate (Schulman's
k3, as TRL) ``KL̂_it = e^{d} − d − 1`` with ``d = log π_ref − log π_θ`` (≥ 0, with gradient through π_θ), times the
importance ratio when ``use_bias_correction_kl`` (TRL's default since the DeepSeek-V3.2 correction);
``kl_estimator="k2"`` uses ``d²/2`` and ``"k1"`` uses ``−d`` instead (the trainer can also put a sequence KL in the
reward: ``trainer.online.kl_reward_coef``).

Each loss = per-token surrogate ``ℓ_it`` (+ ``β·KL̂_it``), aggregated by the variant's normaliser. The surrogates:

* clipped (grpo, bnpo, dr_grpo, dapo, gspo): ``ℓ = −min(r̃·A, clip(r, 1 − ε_low, 1 + ε_high)·A)`` with
  ``r̃ = min(r, delta)`` when ``delta`` is set (INTELLECT-2's two-sided clipping), else ``r̃ = r``;
* CISPO: ``ℓ = −sg(min(r, ε_high))·A·log π_θ`` (the ratio is clipped and detached; the gradient is REINFORCE's);
* SAPO: ``ℓ = −(4/τ)·σ(τ·(r − 1))·A`` with ``τ = sapo_temperature_pos`` where ``A > 0`` and
  ``sapo_temperature_neg`` elsewhere (a soft gate: the gradient weight is ``4σ(1−σ)``, 1 at ``r = 1``).

The normalisers, for **one call** on one process with no gradient accumulation (what a pure function can see):

* per-sequence mean (grpo, sapo, gspo): ``L = (1/N) Σ_i (1/|o_i|) Σ_t m_it ℓ_it`` (``|o_i|`` clamped to ≥ 1);
* token mean over the call's batch (bnpo, dapo, cispo): ``L = Σ_it m_it ℓ_it / Σ_it m_it`` (clamped to ≥ 1). For
  bnpo TRL divides by the local micro-batch's token count, exactly this. For dapo and cispo TRL divides by
  ``num_items_in_batch / num_processes × gradient_accumulation_steps / steps_per_generation``, where
  ``num_items_in_batch`` counts the completion tokens of the whole generation batch over all processes; with one
  process, ``gradient_accumulation_steps == steps_per_generation`` micro-batches of equal token counts (in particular
  1 and 1) that is this call's token count, and otherwise a trainer must rescale this loss by
  ``Σ_it m_it / (that normaliser)``;
* constant (dr_grpo): ``L = Σ_it m_it ℓ_it / (N · max_completion_length)`` (``None`` → T, the padded length).

A trainer that splits a step's batch into several calls (micro-batches, processes) and averages their gradients
passes the optional input ``batch_tokens`` [] to the token-mean losses: the completion tokens of the whole step's
batch per call (TRL's ``num_items_in_batch / num_processes × gradient_accumulation_steps``), which replaces the
call's ``Σ m``, so the update does not depend on the split. prefopt's trainer does, and pads every call to
``T = max_new_tokens`` (the constant of dr_grpo), and computes the advantages over the step's batch.

``per_example [N]`` is each completion's share, so ``loss == per_example.mean()``: ``(1/|o_i|) Σ_t m_it ℓ_it``,
``N · Σ_t m_it ℓ_it / Σ m`` or ``Σ_t m_it ℓ_it / max_completion_length``. The value of these surrogates is not a
quantity to monitor; their gradient is the estimator. Metrics use TRL's names: ``kl`` (when ``β > 0``; the masked
token mean of the KL term, importance-weighted as in the loss), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
``clip_ratio/region_mean`` (masked token means of ``r̃ < 1 − ε_low ∧ A < 0``, ``r̃ > 1 + ε_high ∧ A > 0`` and
either; means over sequences for GSPO's per-sequence ratio), ``clip_ratio/low_min`` and ``clip_ratio/high_max``
(min / max over non-empty sequences of their per-sequence rates), and CISPO's ``cispo_clip_ratio``
(``r > ε_high ∧ A > 0``). TRL's ``entropy`` needs the logits and is not computed here.

Padding never reaches the value or the gradient: log-ratios and KL arguments are zeroed where ``m = 0`` before any
``exp`` (TRL multiplies by the mask afterwards, so an ``inf`` there would become NaN; on the completion tokens the
two are the same). ``exp`` of a log-ratio overflows above ~88.7 in float32 (~709.8 in float64), as in TRL.

Not covered (TRL options that need inputs a pure loss does not get): the entropy bonus and ``top_entropy_quantile``
(entropies), ``off_policy_mask_threshold`` and vLLM importance-sampling correction (sampler log-probs), router aux
losses, and the ``luspo`` / ``vespo`` loss types.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from losses._common import HyperParameterError, LossError, LossOutput, MissingInputError
from losses.registry import non_negative, one_of, optional, positive, register, required_if

__all__ = [
    "group_advantages",
    "grpo_loss",
    "bnpo_loss",
    "dr_grpo_loss",
    "dapo_loss",
    "cispo_loss",
    "sapo_loss",
    "gspo_loss",
]

ADVANTAGE_STD_EPS = 1e-4  # TRL 1.16: advantages / (std + 1e-4)
SCALE_REWARDS = ("group", "batch", "none")


# --------------------------------------------------------------------------------------------------------- advantages
def _nanstd(values: Tensor, dim: int | None = None) -> Tensor:
    """Bessel-corrected std ignoring NaNs, as ``trl.trainer.utils.nanstd`` (NaN where fewer than 2 values), except
    that n/(n − 1) is computed in the values' dtype (TRL divides integer counts, i.e. in float32, which puts float32
    rounding, ~1e-8 relative, into a float64 std when n/(n − 1) is not exact in float32, e.g. 12/11; 3/2 is)."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True).to(values.dtype)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    return (variance * correction).sqrt()


def group_advantages(rewards: Tensor, scale_rewards: str = "group") -> Tensor:
    """GRPO's group-relative advantages, exactly as TRL 1.16's ``GRPOTrainer`` computes them (one reward function,
    ``multi_objective_aggregation="sum_then_normalize"``).

    ``rewards [G, K]``: G prompts, K completions each. Returns ``[G·K]`` in row-major order (prompt 0's K
    completions first, TRL's layout) of ``A = (r − mean_group r) / (σ + 1e-4)`` with

    * ``scale_rewards="group"`` (TRL's default; GRPO, Shao et al. 2024): σ the std of the prompt's group;
    * ``"batch"``: σ the std of all G·K rewards (PPO-Lite, arXiv 2508.08221);
    * ``"none"``: ``A = r − mean_group r`` (Dr. GRPO, arXiv 2503.20783: no difficulty bias from σ).

    Standard deviations are Bessel-corrected (``K − 1``); a group of K = 1 (or a batch of one reward) has σ = 0, as in
    TRL. NaN rewards (TRL's "unscorable" completions) are left out of the means and deviations and get advantage 0.
    The baseline is the group mean *including* the completion itself (cf. ``rloo``'s leave-one-out baseline).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise HyperParameterError(f"scale_rewards must be one of {list(SCALE_REWARDS)}, got {scale_rewards!r}")
    if rewards.dim() != 2:
        shape = tuple(rewards.shape)
        raise LossError(f"group_advantages: 'rewards' must be [G, K] (G prompts, K samples), got shape {shape}")
    rewards = rewards.detach()
    centred = rewards - torch.nanmean(rewards, dim=1, keepdim=True)
    if scale_rewards == "group":
        std = _nanstd(rewards, dim=1) if rewards.shape[1] > 1 else torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        std = _nanstd(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    if scale_rewards != "none":
        centred = centred / (std + ADVANTAGE_STD_EPS)
    return torch.nan_to_num(centred, nan=0.0).reshape(-1)


# --------------------------------------------------------------------------------------------------------- the core
Surrogate = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]
Normaliser = Callable[[Tensor, Tensor], Tensor]


def _clipped(epsilon: float, epsilon_high: float | None, delta: float | None) -> Surrogate:
    """PPO's clipped surrogate ``−min(r̃A, clip(r, 1−ε_low, 1+ε_high)A)``, ``r̃ = min(r, delta)`` when delta is set.
    The clip flags use ``r̃``, as TRL's metrics do (the region where the clipped branch is the minimum)."""
    low, high = 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high)

    def surrogate(ratio: Tensor, advantages: Tensor, policy: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        clipped = ratio.clamp(low, high)
        if delta is not None:
            ratio = ratio.clamp(max=delta)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        is_low = (ratio < low) & (advantages < 0)
        is_high = (ratio > high) & (advantages > 0)
        return per_token, {"low": is_low, "high": is_high, "region": is_low | is_high}

    return surrogate


def _cispo(epsilon_high: float) -> Surrogate:
    """CISPO: ``−sg(min(r, ε_high))·A·log π_θ`` — every token keeps a gradient, weighted by its truncated ratio."""

    def surrogate(ratio: Tensor, advantages: Tensor, policy: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        weight = ratio.clamp(max=epsilon_high).detach()
        return -weight * advantages * policy, {"cispo": (ratio > epsilon_high) & (advantages > 0)}

    return surrogate


def _soft_gate(temperature_pos: float, temperature_neg: float) -> Surrogate:
    """SAPO: ``−(4/τ)·σ(τ(r − 1))·A``, τ by the advantage's sign (``A > 0``: positive temperature)."""

    def surrogate(ratio: Tensor, advantages: Tensor, policy: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        tau = torch.where(
            advantages > 0,
            advantages.new_tensor(temperature_pos),
            advantages.new_tensor(temperature_neg),
        )
        return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages, {}

    return surrogate


def _kl_estimate(d: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(π_θ‖π_ref) from ``d = log π_ref − log π_θ`` at tokens sampled from π_θ (Schulman
    2020): ``k3 = e^d − d − 1`` (≥ 0, low variance: TRL's), ``k2 = d²/2``, ``k1 = −d`` (unbiased, signed)."""
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return d.square() / 2
    return torch.expm1(d) - d


def _per_sequence_mean(summed: Tensor, mask: Tensor) -> Tensor:
    """``Σ_t m ℓ / |o_i|``: every completion weighs the same (GRPO's 1/|o_i|; length-biased, Dr. GRPO §3.1)."""
    return summed / mask.sum(-1).clamp(min=1.0)


def _batch_token_mean(batch_tokens: Tensor | float | None) -> Normaliser:
    """``N · Σ_t m ℓ / D``: every token weighs the same; ``D = batch_tokens`` when given (the token count per call
    of the whole step's batch: a trainer's global normaliser), else this call's ``Σ m``."""

    def normalise(summed: Tensor, mask: Tensor) -> Tensor:
        count = mask.sum() if batch_tokens is None else torch.as_tensor(batch_tokens, dtype=summed.dtype)
        return summed * (mask.shape[0] / count.clamp(min=1.0))

    return normalise


def _constant(max_completion_length: int | None) -> Normaliser:
    """``Σ_t m ℓ / L`` with ``L = max_completion_length`` (T, the padded length, when None): Dr. GRPO's constant."""

    def normalise(summed: Tensor, mask: Tensor) -> Tensor:
        return summed / (mask.shape[-1] if max_completion_length is None else max_completion_length)

    return normalise


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """TRL's ``global_masked_mean`` on one process: the masked token mean, or the mean over sequences of a
    per-sequence ``[N, 1]`` value (GSPO)."""
    values = values.to(mask.dtype)
    if values.shape[-1] == 1 and mask.shape[-1] > 1:
        return values.mean()
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _per_sequence_extreme(values: Tensor, mask: Tensor, largest: bool) -> Tensor:
    """TRL's ``nanmin`` / ``nanmax`` over sequences of the per-sequence rate (sequences with no token left out; 0 when
    there is none, where TRL logs NaN)."""
    values = values.to(mask.dtype)
    if values.shape[-1] == 1 and mask.shape[-1] > 1:
        return values.amax() if largest else values.amin()
    counts = mask.sum(-1)
    rates = (values * mask).sum(-1) / counts.clamp(min=1.0)
    extreme = torch.where(counts > 0, rates, rates.new_tensor(float("-inf") if largest else float("inf")))
    extreme = extreme.amax() if largest else extreme.amin()
    return torch.where((counts > 0).any(), extreme, rates.new_zeros(()))


def _check_inputs(
    name: str, policy: Tensor, mask: Tensor, advantages: Tensor, old: Tensor | None, ref: Tensor | None
) -> None:
    if policy.dim() != 2 or policy.numel() == 0:
        raise LossError(
            f"loss '{name}': 'policy_token_logps' must be [N, T] (N >= 1 completions, T >= 1 tokens), "
            f"got shape {tuple(policy.shape)}"
        )
    for key, tensor in (("completion_mask", mask), ("old_token_logps", old), ("ref_token_logps", ref)):
        if tensor is not None and tensor.shape != policy.shape:
            raise LossError(
                f"loss '{name}': '{key}' has shape {tuple(tensor.shape)} but 'policy_token_logps' has "
                f"{tuple(policy.shape)}; every per-token input must be [N, T]"
            )
    if advantages.shape not in (policy.shape[:1], policy.shape):
        raise LossError(
            f"loss '{name}': 'advantages' must be [N] or [N, T] = {tuple(policy.shape[:1])} or {tuple(policy.shape)}, "
            f"got {tuple(advantages.shape)}"
        )


def _policy_loss(
    name: str,
    policy: Tensor,
    mask: Tensor,
    advantages: Tensor,
    old: Tensor | None,
    ref: Tensor | None,
    *,
    sequence_ratio: bool,
    surrogate: Surrogate,
    normalise: Normaliser,
    beta: float,
    use_bias_correction_kl: bool,
    kl_estimator: str = "k3",
) -> LossOutput:
    """The shared body: ratio (per token or per sequence), surrogate, + β·KL̂ per token, normaliser, TRL metrics."""
    _check_inputs(name, policy, mask, advantages, old, ref)
    if beta > 0 and ref is None:
        raise MissingInputError(f"loss '{name}' with beta > 0 needs input(s) ref_token_logps")
    dtype = policy.dtype
    valid = mask != 0
    weights = mask.to(dtype)
    advantages = advantages.detach().to(dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = policy.detach() if old is None else old.detach().to(dtype)
    zero = policy.new_zeros(())

    log_ratio = torch.where(valid, policy - old, zero)  # 0 on padding: ratio 1 there, no gradient
    if sequence_ratio:  # GSPO: the length-normalised sequence log-ratio, one ratio per completion [N, 1]
        log_ratio = (log_ratio * weights).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True).clamp(min=1.0)
    ratio = torch.exp(log_ratio)

    per_token, flags = surrogate(ratio, advantages, torch.where(valid, policy, zero))
    metrics: dict[str, Tensor] = {}
    if beta != 0:
        d = torch.where(valid, ref.detach().to(dtype) - policy, zero)
        kl = _kl_estimate(d, kl_estimator)
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl
        metrics["kl"] = _masked_mean(kl.detach(), weights)

    summed = torch.where(valid, per_token, zero).mul(weights).sum(-1)  # [N, 1] ratios broadcast over the tokens
    per_example = normalise(summed, weights)

    with torch.no_grad():
        for key, flag in flags.items():
            if key == "cispo":
                metrics["cispo_clip_ratio"] = _masked_mean(flag, weights)
            else:
                metrics[f"clip_ratio/{key}_mean"] = _masked_mean(flag, weights)
        if "low" in flags:
            metrics["clip_ratio/low_min"] = _per_sequence_extreme(flags["low"], weights, largest=False)
            metrics["clip_ratio/high_max"] = _per_sequence_extreme(flags["high"], weights, largest=True)
    return LossOutput(per_example.mean(), per_example, metrics)


# ------------------------------------------------------------------------------------------------------ registration
def _positive_int_or_none(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise HyperParameterError(f"{name} must be a positive integer or None, got {value!r}")


_KL_CHECKS = {
    "beta": non_negative,
    "use_bias_correction_kl": one_of(True, False),
    "kl_estimator": one_of("k1", "k2", "k3"),
}
_CLIP_CHECKS = {
    **_KL_CHECKS,
    "epsilon": non_negative,
    "epsilon_high": optional(non_negative),
    "delta": optional(positive),
}
_PAPERS = {
    "grpo": "Shao et al. 2024, arXiv 2402.03300 (DeepSeekMath, GRPO)",
    "dr_grpo": "Liu et al. 2025, arXiv 2503.20783 (Understanding R1-Zero-Like Training: Dr. GRPO)",
    "dapo": "Yu et al. 2025, arXiv 2503.14476 (DAPO)",
    "gspo": "Zheng et al. 2025, arXiv 2507.18071 (Group Sequence Policy Optimization)",
    "cispo": "MiniMax 2025, arXiv 2506.13585 (MiniMax-M1, CISPO); ε_max as in ScaleRL, arXiv 2510.13786",
    "sapo": "Qwen team 2025, arXiv 2511.20347 (Soft Adaptive Policy Optimization)",
    "bnpo": "TRL's loss_type='bnpo' (its docs cite no paper: GRPO's surrogate, token mean over the local batch)",
}
_CLIPPED = "−min(r·A, clip(r, 1−ε, 1+ε_high)·A) + β·KL̂"


def _reference_if_beta() -> Callable:
    """A fresh ``requires`` hook per loss (``required_if`` finds its loss by identity)."""
    return required_if(lambda hparams: hparams["beta"] > 0, ("ref_token_logps",))


@register(
    "grpo",
    kind="token",
    paper=_PAPERS["grpo"],
    summary=f"(1/N) Σ_i (1/|o_i|) Σ_t [{_CLIPPED}], r = π_θ/π_old per token",
    aggregation="per token; mean over each completion's tokens, then over completions",
    checks=_CLIP_CHECKS,
    requires=_reference_if_beta(),
)
def grpo_loss(
    policy_token_logps: Tensor,  # [N, T] log π_θ per token, with grad
    completion_mask: Tensor,  # [N, T] 1 on completion tokens, 0 on padding
    advantages: Tensor,  # [N] or [N, T], e.g. group_advantages(rewards)
    old_token_logps: Tensor | None = None,  # [N, T] log π_old; None = on-policy (policy.detach())
    ref_token_logps: Tensor | None = None,  # [N, T] log π_ref; needed when beta > 0
    *,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    use_bias_correction_kl: bool = True,
    kl_estimator: str = "k3",
) -> LossOutput:
    """GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300), TRL ``loss_type="grpo"``:

    ``L = (1/N) Σ_i (1/|o_i|) Σ_t m_it [−min(r̃_it A_i, clip(r_it, 1 − ε, 1 + ε_high) A_i) + β·KL̂_it]``

    with ``r_it = π_θ/π_old`` per token, ``r̃ = min(r, delta)`` when ``delta`` is set, ``ε_high = epsilon_high``
    (``None`` → ``epsilon``) and ``KL̂`` the k3 estimate of KL(π_θ‖π_ref) per token (× r when
    ``use_bias_correction_kl``). Aggregation: the mean over each completion's tokens, then over completions, which
    weighs a token of a short completion more (the length bias Dr. GRPO removes). Defaults are TRL GRPOConfig's
    (β = 0: no reference needed). See the module docstring for inputs, metrics and padding.
    """
    return _policy_loss(
        "grpo", policy_token_logps, completion_mask, advantages, old_token_logps, ref_token_logps,
        sequence_ratio=False, surrogate=_clipped(epsilon, epsilon_high, delta), normalise=_per_sequence_mean,
        beta=beta, use_bias_correction_kl=use_bias_correction_kl,
        kl_estimator=kl_estimator,
    )  # fmt: skip


@register(
    "bnpo",
    kind="token",
    paper=_PAPERS["bnpo"],
    summary=f"Σ_it m_it [{_CLIPPED}] / Σ_it m_it (token mean over the local batch)",
    aggregation="per token; sum over the batch's completion tokens / their count (local batch)",
    checks=_CLIP_CHECKS,
    requires=_reference_if_beta(),
)
def bnpo_loss(
    policy_token_logps: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    old_token_logps: Tensor | None = None,
    ref_token_logps: Tensor | None = None,
    batch_tokens: Tensor | None = None,  # [] the step's completion tokens per call (trainer)
    *,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    use_bias_correction_kl: bool = True,
    kl_estimator: str = "k3",
) -> LossOutput:
    """BNPO, TRL ``loss_type="bnpo"`` (TRL's docs cite no paper for it; not to be confused with "Beta Normalization
    Policy Optimization", arXiv 2506.02864, which normalises rewards):

    ``L = Σ_it m_it [−min(r̃ A, clip(r, 1 − ε, 1 + ε_high) A) + β·KL̂]_it / Σ_it m_it``

    GRPO's per-token surrogate averaged over every completion token of the *local* batch (this call), so long
    completions weigh in proportion to their length. With one completion per call it equals ``grpo``.
    """
    return _policy_loss(
        "bnpo", policy_token_logps, completion_mask, advantages, old_token_logps, ref_token_logps,
        sequence_ratio=False, surrogate=_clipped(epsilon, epsilon_high, delta),
        normalise=_batch_token_mean(batch_tokens),
        beta=beta, use_bias_correction_kl=use_bias_correction_kl,
        kl_estimator=kl_estimator,
    )  # fmt: skip


@register(
    "dr_grpo",
    kind="token",
    paper=_PAPERS["dr_grpo"],
    summary=f"Σ_it m_it [{_CLIPPED}] / (N · max_completion_length)",
    aggregation="per token; sum over the batch's completion tokens / (N · max_completion_length)",
    checks={**_CLIP_CHECKS, "max_completion_length": _positive_int_or_none},
    requires=_reference_if_beta(),
)
def dr_grpo_loss(
    policy_token_logps: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    old_token_logps: Tensor | None = None,
    ref_token_logps: Tensor | None = None,
    *,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    max_completion_length: int | None = None,
    use_bias_correction_kl: bool = True,
    kl_estimator: str = "k3",
) -> LossOutput:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783), TRL
    ``loss_type="dr_grpo"``:

    ``L = Σ_it m_it [−min(r̃ A, clip(r, 1 − ε, 1 + ε_high) A) + β·KL̂]_it / (N · L_max)``

    ``L_max = max_completion_length`` (TRL's GRPOConfig value, 512 by default there; here ``None`` → T, the padded
    length of this call): a constant, so neither the completion's length nor the batch's token count rescales a
    token's gradient (no length bias). Pair it with unscaled advantages, ``group_advantages(r, "none")``, as the
    paper does (σ-scaling adds a question-difficulty bias).
    """
    return _policy_loss(
        "dr_grpo", policy_token_logps, completion_mask, advantages, old_token_logps, ref_token_logps,
        sequence_ratio=False, surrogate=_clipped(epsilon, epsilon_high, delta),
        normalise=_constant(max_completion_length), beta=beta, use_bias_correction_kl=use_bias_correction_kl,
        kl_estimator=kl_estimator,
    )  # fmt: skip


@register(
    "dapo",
    kind="token",
    paper=_PAPERS["dapo"],
    summary=f"Σ_it m_it [{_CLIPPED}] / Σ_it m_it (token-level mean; clip-higher with ε_high > ε)",
    aggregation="per token; sum over the batch's completion tokens / their count (TRL: of the global batch)",
    checks=_CLIP_CHECKS,
    requires=_reference_if_beta(),
)
def dapo_loss(
    policy_token_logps: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    old_token_logps: Tensor | None = None,
    ref_token_logps: Tensor | None = None,
    batch_tokens: Tensor | None = None,  # [] the step's completion tokens per call (trainer)
    *,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    use_bias_correction_kl: bool = True,
    kl_estimator: str = "k3",
) -> LossOutput:
    """DAPO (Yu et al. 2025, arXiv 2503.14476), TRL ``loss_type="dapo"`` (TRL's default loss):

    ``L = Σ_it m_it [−min(r̃ A, clip(r, 1 − ε, 1 + ε_high) A) + β·KL̂]_it / Σ_it m_it``

    the token-level policy-gradient loss of DAPO (§3.3). Its "clip-higher" is ``epsilon_high`` > ``epsilon`` (the
    paper: ε = 0.2, ε_high = 0.28, β = 0; the default here is TRL's, ε_high = ε). TRL divides by the token count of
    the *global* generation batch, rescaled to one accumulation window (``num_items_in_batch / num_processes ×
    gradient_accumulation_steps / steps_per_generation``); for one call on one process without accumulation that is
    this call's token count, so here ``dapo`` equals ``bnpo``. Dynamic sampling and the overlong reward shaping of
    DAPO are outside the loss.
    """
    return _policy_loss(
        "dapo", policy_token_logps, completion_mask, advantages, old_token_logps, ref_token_logps,
        sequence_ratio=False, surrogate=_clipped(epsilon, epsilon_high, delta),
        normalise=_batch_token_mean(batch_tokens),
        beta=beta, use_bias_correction_kl=use_bias_correction_kl,
        kl_estimator=kl_estimator,
    )  # fmt: skip


@register(
    "cispo",
    kind="token",
    paper=_PAPERS["cispo"],
    summary="Σ_it m_it [−sg(min(r, ε_max))·A·log π_θ + β·KL̂] / Σ_it m_it",
    aggregation="per token; sum over the batch's completion tokens / their count (TRL: of the global batch)",
    checks={**_KL_CHECKS, "epsilon_high": positive},
    requires=_reference_if_beta(),
)
def cispo_loss(
    policy_token_logps: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    old_token_logps: Tensor | None = None,
    ref_token_logps: Tensor | None = None,
    batch_tokens: Tensor | None = None,  # [] the step's completion tokens per call (trainer)
    *,
    beta: float = 0.0,
    epsilon_high: float = 5.0,
    use_bias_correction_kl: bool = True,
    kl_estimator: str = "k3",
) -> LossOutput:
    """CISPO (MiniMax-M1, arXiv 2506.13585), TRL ``loss_type="cispo"``:

    ``L = Σ_it m_it [−sg(min(r_it, ε_max)) · A_i · log π_θ(o_it) + β·KL̂_it] / Σ_it m_it``

    Clipped Importance-Sampling Policy Optimization clips (and detaches, ``sg``) the importance weight instead of
    the surrogate, so no token loses its gradient (PPO/GRPO clipping zeroes the gradient of tokens outside the trust
    region); ``ε_max = epsilon_high`` is an absolute cap on the ratio, as in TRL. The default 5.0 is the value TRL's
    docs recommend for cispo (ScaleRL, arXiv 2510.13786); TRL's GRPOConfig, with ``epsilon_high`` unset, would fall
    back to ``epsilon`` = 0.2 and cap every ratio at 0.2. Normalised like ``dapo`` (see there).
    """
    return _policy_loss(
        "cispo", policy_token_logps, completion_mask, advantages, old_token_logps, ref_token_logps,
        sequence_ratio=False, surrogate=_cispo(epsilon_high), normalise=_batch_token_mean(batch_tokens),
        beta=beta, use_bias_correction_kl=use_bias_correction_kl,
        kl_estimator=kl_estimator,
    )  # fmt: skip


@register(
    "sapo",
    kind="token",
    paper=_PAPERS["sapo"],
    summary="(1/N) Σ_i (1/|o_i|) Σ_t [−(4/τ)σ(τ(r − 1))·A + β·KL̂], τ = τ_pos if A > 0 else τ_neg",
    aggregation="per token; mean over each completion's tokens, then over completions",
    checks={**_KL_CHECKS, "sapo_temperature_pos": positive, "sapo_temperature_neg": positive},
    requires=_reference_if_beta(),
)
def sapo_loss(
    policy_token_logps: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    old_token_logps: Tensor | None = None,
    ref_token_logps: Tensor | None = None,
    *,
    beta: float = 0.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    use_bias_correction_kl: bool = True,
    kl_estimator: str = "k3",
) -> LossOutput:
    """SAPO (Soft Adaptive Policy Optimization, Qwen team 2025, arXiv 2511.20347), TRL ``loss_type="sapo"``:

    ``L = (1/N) Σ_i (1/|o_i|) Σ_t m_it [−(4/τ_it) σ(τ_it (r_it − 1)) A_it + β·KL̂_it]``

    with ``τ = sapo_temperature_pos`` where ``A > 0`` and ``sapo_temperature_neg`` elsewhere. The hard clip is
    replaced by a smooth gate: ``∂ℓ/∂r = −4σ(1 − σ)·A``, which is −A at r = 1 (on-policy: the GRPO gradient) and
    decays smoothly as r leaves 1, faster for the larger (negative-advantage) temperature. Aggregated like ``grpo``.
    TRL builds τ as a float32 tensor, so in float64 its values differ from these by float32 rounding (~1e-8).
    """
    return _policy_loss(
        "sapo", policy_token_logps, completion_mask, advantages, old_token_logps, ref_token_logps,
        sequence_ratio=False, surrogate=_soft_gate(sapo_temperature_pos, sapo_temperature_neg),
        normalise=_per_sequence_mean, beta=beta, use_bias_correction_kl=use_bias_correction_kl,
        kl_estimator=kl_estimator,
    )  # fmt: skip


@register(
    "gspo",
    kind="token",
    paper=_PAPERS["gspo"],
    summary="(1/N) Σ_i [−min(s_i A_i, clip(s_i, 1−ε, 1+ε_high) A_i)] (+ β·KL̂ token mean), s_i = (π_θ/π_old)^{1/|o_i|}",
    aggregation="per sequence: length-normalised sequence ratio; mean over each completion's tokens, then completions",
    checks=_CLIP_CHECKS,
    requires=_reference_if_beta(),
)
def gspo_loss(
    policy_token_logps: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    old_token_logps: Tensor | None = None,
    ref_token_logps: Tensor | None = None,
    *,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    use_bias_correction_kl: bool = True,
    kl_estimator: str = "k3",
) -> LossOutput:
    """GSPO (Group Sequence Policy Optimization, Zheng et al. 2025, arXiv 2507.18071), TRL
    ``importance_sampling_level="sequence"`` with ``loss_type="grpo"`` (the setting TRL's docs give for GSPO):

    ``L = (1/N) Σ_i (1/|o_i|) Σ_t m_it [−min(s̃_i A_i, clip(s_i, 1 − ε, 1 + ε_high) A_i) + β·KL̂_it]``

    with one importance ratio per sequence, the geometric mean of its token ratios,
    ``s_i = exp((1/|o_i|) Σ_t m_it log(π_θ/π_old)_it)``, so a whole completion is clipped or kept
    (``s̃ = min(s, delta)`` when ``delta`` is set). With ``A`` per sequence and β = 0 this is
    ``(1/N) Σ_i −min(s̃_i A_i, clip(s_i) A_i)``. The defaults are TRL's (ε = ε_high = 0.2); the paper's are much
    tighter, ε = 3e-4, ε_high = 4e-4 (TRL's docs), since s is a per-token geometric mean. On-policy s = 1 and the
    gradient is GRPO's. Clip metrics are means over sequences.
    """
    return _policy_loss(
        "gspo", policy_token_logps, completion_mask, advantages, old_token_logps, ref_token_logps,
        sequence_ratio=True, surrogate=_clipped(epsilon, epsilon_high, delta), normalise=_per_sequence_mean,
        beta=beta, use_bias_correction_kl=use_bias_correction_kl,
        kl_estimator=kl_estimator,
    )  # fmt: skip
