"""Pairwise losses that treat the two responses' log-ratios ``ρ_w``, ``ρ_l`` separately or as a distribution.

EXO, NCA, BCO and APO, all on summed log-probs and equal to TRL 1.16 ``DPOTrainer`` (tests/losses/test_trl_parity.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from losses._common import LossOutput, reference_output
from losses.registry import in_range, positive, register

__all__ = ["exo_pair_loss", "nca_pair_loss", "bco_pair_loss", "apo_zero_loss", "apo_down_loss"]


def _logratios(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor):
    return policy_chosen - ref_chosen, policy_rejected - ref_rejected


@register(
    "exo_pair",
    margin_only=True,
    optimum="reverse-KL fit to the smoothed hard label: βΔ = (2p−1)·log((1−ε)/ε), not additive in r",
    paper="Ji et al. 2024, arXiv 2402.00856 (EXO), Eq. 16",
    summary="σ(βΔ)[log σ(βΔ) − log(1−ε)] + σ(−βΔ)[log σ(−βΔ) − log ε]",
    checks={"beta": positive, "label_smoothing": in_range(0.0, 1.0, low_open=True, high_open=True)},
)
def exo_pair_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
) -> LossOutput:
    """EXO (pairwise): ``KL(p_θ ‖ p_label)`` with ``p_θ = softmax(β·[ρ_w, ρ_l])`` and ``p_label = [1−ε, ε]``:
    ``L = σ(βΔ)[log σ(βΔ) − log(1−ε)] + σ(−βΔ)[log σ(−βΔ) − log ε]``.

    Towards Efficient Exact Optimization of LM Alignment, Ji et al. 2024 (arXiv 2402.00856), Eq. 16; summed
    log-probs. ε must lie in (0, 1); paper ε = 1e-3 (TRL 1.16 raises for ε = 0, as here).
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen, rejected = _logratios(*logps)
    logits = beta * (chosen - rejected)
    per_example = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-label_smoothing)) + torch.sigmoid(
        -logits
    ) * (F.logsigmoid(-logits) - math.log(label_smoothing))
    return reference_output(per_example, beta, logps)


@register(
    "nca_pair",
    optimum="acts on each log-ratio, not only the margin; normalisation couples them",
    paper="Chen et al. 2024, arXiv 2402.05369 (NCA)",
    summary="−log σ(βρ_w) − ½ log σ(−βρ_w) − ½ log σ(−βρ_l)",
    checks={"beta": positive},
)
def nca_pair_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
) -> LossOutput:
    """NCA (pairwise): ``L = −log σ(βρ_w) − ½ log σ(−βρ_w) − ½ log σ(−βρ_l)`` on summed log-probs.

    Noise Contrastive Alignment, Chen et al. 2024 (arXiv 2402.05369). Unlike DPO it anchors each response's
    absolute log-ratio, so the chosen likelihood is not pushed down with the rejected one. TRL ``nca_pair``.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen, rejected = _logratios(*logps)
    chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    per_example = (
        -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
    )
    return reference_output(per_example, beta, logps)


@register(
    "bco_pair",
    optimum="per-response logistic regression of βρ (chosen vs rejected); δ = 0 does not normalise",
    paper="Jung et al. 2024, arXiv 2404.04656 (BCO)",
    summary="−log σ(βρ_w) − log σ(−βρ_l)",
    checks={"beta": positive},
)
def bco_pair_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
) -> LossOutput:
    """BCO (pairwise): ``L = −log σ(βρ_w) − log σ(−βρ_l)`` — a binary classifier on each response's reward.

    Binary Classifier Optimization, Jung et al. 2024 (arXiv 2404.04656); summed log-probs. Equals TRL ≥ 0.29
    (1.16) ``bco_pair``, which has no reward shift δ; TRL ≤ 0.28 subtracted a running mean δ of all rewards (state
    across steps, so not a pure function of the batch; not reproduced here).
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen, rejected = _logratios(*logps)
    per_example = -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)
    return reference_output(per_example, beta, logps)


@register(
    "apo_zero",
    optimum="= Σ_y (W⁻(y) − W⁺(y))·σ(βρ(y)) + const (W± = weight as chosen/rejected): linear in σ(βρ), so "
    "responses rejected more often than chosen are pushed to π(y) → 0",
    paper="D'Oosterlinck et al. 2024, arXiv 2408.06266 (APO), Eq. 7",
    summary="(1 − σ(βρ_w)) + σ(βρ_l)",
    checks={"beta": positive},
)
def apo_zero_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
) -> LossOutput:
    """APO-zero: ``L = (1 − σ(βρ_w)) + σ(βρ_l)`` (summed log-probs): raise the chosen, lower the rejected likelihood.

    Anchored Preference Optimization, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 7; use when the chosen
    answers are better than the model's own. TRL ``apo_zero``.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen, rejected = _logratios(*logps)
    per_example = (1 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)
    return reference_output(per_example, beta, logps)


@register(
    "apo_down",
    optimum="σ(βρ_w) lowers every chosen ratio while 1 − σ(βΔ) rewards margins: no interior minimum",
    paper="D'Oosterlinck et al. 2024, arXiv 2408.06266 (APO), Eq. 8",
    summary="σ(βρ_w) + (1 − σ(βΔ))",
    checks={"beta": positive},
)
def apo_down_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
) -> LossOutput:
    """APO-down: ``L = σ(βρ_w) + (1 − σ(βΔ))`` (summed log-probs): lower both, the rejected more.

    Anchored Preference Optimization (arXiv 2408.06266), Eq. 8; use when the chosen answers are worse than the
    model's own. TRL ``apo_down``.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen, rejected = _logratios(*logps)
    per_example = torch.sigmoid(beta * chosen) + (1 - torch.sigmoid(beta * (chosen - rejected)))
    return reference_output(per_example, beta, logps)
