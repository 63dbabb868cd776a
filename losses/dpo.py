"""The logistic / hinge family on the DPO margin ``Δ = ρ_w − ρ_l`` (summed log-probs unless stated).

Every function here equals TRL 1.16 ``DPOTrainer`` for the same ``beta``/``label_smoothing``
(tests/losses/test_trl_parity.py), except
``cdpo``, which TRL ≥ 0.29 no longer has (it equals TRL ≤ 0.28 ``sigmoid`` with ``label_smoothing``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from losses._common import LossOutput, reference_output, smoothed_logistic, token_mean
from losses.registry import in_range, positive, register

__all__ = ["dpo_loss", "cdpo_loss", "robust_loss", "hinge_loss", "sigmoid_norm_loss", "discopop_loss"]

_EPS_HALF = in_range(0.0, 0.5, high_open=True)


@register(
    "dpo",
    margin_only=True,
    optimum="closed form π_ref·exp(r/β): BT's logit p = r − r' is additive over pairs",
    paper="Rafailov et al. 2023, arXiv 2305.18290",
    summary="−log σ(βΔ)",
    checks={"beta": positive},
)
def dpo_loss(
    policy_chosen_logps: Tensor,  # [B] S_θ(y_w), summed over completion tokens
    policy_rejected_logps: Tensor,  # [B] S_θ(y_l)
    ref_chosen_logps: Tensor,  # [B] S_ref(y_w)
    ref_rejected_logps: Tensor,  # [B] S_ref(y_l)
    *,
    beta: float = 0.1,
) -> LossOutput:
    """DPO: ``L = −log σ(β Δ)``, ``Δ = [S_θ(y_w) − S_ref(y_w)] − [S_θ(y_l) − S_ref(y_l)]`` on **summed** log-probs.

    Direct Preference Optimization, Rafailov et al. 2023 (arXiv 2305.18290), Eq. 7. TRL ``loss_type="sigmoid"``.
    Implicit reward ``βρ``; at Δ = 0 the loss is ln 2. Paper default β = 0.1.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return reference_output(-F.logsigmoid(beta * margin), beta, logps)


@register(
    "cdpo",
    margin_only=True,
    optimum="label smoothing fits σ(βΔ) to (1−2ε)p+ε, not p: margins shrink toward π_ref",
    paper="Mitchell 2023, 'A note on DPO with noisy preferences' (cDPO); TRL ≤ 0.28 sigmoid + label_smoothing",
    summary="−(1−ε) log σ(βΔ) − ε log σ(−βΔ)",
    checks={"beta": positive, "label_smoothing": _EPS_HALF},
)
def cdpo_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> LossOutput:
    """Conservative DPO: ``L = −(1−ε) log σ(βΔ) − ε log σ(−βΔ)`` (summed log-probs).

    Labels are assumed flipped with probability ε ∈ [0, 0.5). Equals TRL ≤ 0.28 ``sigmoid`` with
    ``label_smoothing=ε`` (TRL ≥ 0.29 dropped smoothing from ``sigmoid``). Default ε = 0.1 (ε = 0 is plain DPO).
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return reference_output(smoothed_logistic(beta * margin, label_smoothing), beta, logps)


@register(
    "robust",
    margin_only=True,
    optimum="fits σ(βΔ) to the de-noised label (p−ε)/(1−2ε): sharper than π*_DPO on clean labels; unbounded "
    "below where some pair has p < ε",
    paper="Chowdhury et al. 2024, arXiv 2403.00409 (rDPO)",
    summary="[−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1−2ε)",
    checks={"beta": positive, "label_smoothing": _EPS_HALF},
)
def robust_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> LossOutput:
    """Robust DPO: ``L = [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)`` (summed log-probs).

    Provably Robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409): an unbiased estimate of the clean-label loss
    under label-flip rate ε ∈ [0, 0.5). TRL ``loss_type="robust"``. Paper setting ε = 0.1 (TRL default 0).
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    margin = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    eps = label_smoothing
    per_example = (-(1 - eps) * F.logsigmoid(margin) + eps * F.logsigmoid(-margin)) / (1 - 2 * eps)
    return reference_output(per_example, beta, logps)


@register(
    "hinge",
    margin_only=True,
    optimum="piecewise linear: the minimiser is an LP vertex, β·log-ratios on integer levels, not exp(r/β)",
    piecewise_linear=True,
    paper="Zhao et al. 2023, arXiv 2305.10425 (SLiC-HF); Liu et al. 2023, arXiv 2309.06657 (RSO)",
    summary="max(0, 1 − βΔ)",
    checks={"beta": positive},
)
def hinge_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
) -> LossOutput:
    """SLiC / RSO hinge: ``L = max(0, 1 − βΔ)`` (summed log-probs; margin 1/β). TRL ``loss_type="hinge"``."""
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return reference_output(torch.relu(1 - beta * margin), beta, logps)


@register(
    "sigmoid_norm",
    margin_only=True,
    optimum="= DPO at length 1 (per-token normalisation is the identity)",
    paper="Lambert et al. 2024, arXiv 2411.15124 (Tülu 3 'DPO-norm')",
    summary="−log σ(β(ρ_w/|y_w| − ρ_l/|y_l|))",
    aggregation="mean",
    checks={"beta": positive},
)
def sigmoid_norm_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    chosen_lengths: Tensor,  # [B] completion token counts
    rejected_lengths: Tensor,  # [B]
    *,
    beta: float = 0.1,
) -> LossOutput:
    """Length-normalised DPO: ``L = −log σ(β (ρ_w/|y_w| − ρ_l/|y_l|))`` — log-ratios **averaged** per token.

    Tülu 3's DPO-norm (arXiv 2411.15124). TRL ``loss_type="sigmoid_norm"``; lengths clamped to ≥ 1.
    Logged rewards stay ``β × summed`` log-ratios, as in TRL.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen_avg = token_mean(policy_chosen_logps - ref_chosen_logps, chosen_lengths)
    rejected_avg = token_mean(policy_rejected_logps - ref_rejected_logps, rejected_lengths)
    return reference_output(-F.logsigmoid(beta * (chosen_avg - rejected_avg)), beta, logps)


@register(
    "discopop",
    margin_only=True,
    optimum="non-monotone per-pair loss (logistic below 0, exponential above, switch width τ): no exp(r/β) tilt",
    paper="Chris Lu et al. 2024, arXiv 2406.08414 (DiscoPOP / LRML), Eq. 5",
    summary="(1−m)(−log σ(βΔ)) + m·exp(−βΔ), m = σ(βΔ/τ)",
    checks={"beta": positive, "tau": positive},
)
def discopop_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
    tau: float = 0.05,
) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss): ``z = βΔ``, ``m = σ(z/τ)``, ``L = (1−m)(−log σ(z)) + m e^{−z}``.

    Discovering Preference Optimization Algorithms, Lu et al. 2024 (arXiv 2406.08414), Eq. 5; summed log-probs.
    TRL ``loss_type="discopop"`` with ``discopop_tau`` = τ (paper 0.05). ``e^{−z}`` overflows for z ≲ −88 in
    float32 (the policy strongly prefers the loser); like TRL this does not clamp, and the non-finite check
    reports it.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    mix = torch.sigmoid(logits / tau)
    per_example = (1 - mix) * -F.logsigmoid(logits) + mix * torch.exp(-logits)
    return reference_output(per_example, beta, logps)
