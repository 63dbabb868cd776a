"""Alignment via Optimal Transport: the logistic loss on sorted (quantile-matched) margins over the batch."""

from __future__ import annotations

import torch
from torch import Tensor

from losses._common import LossOutput, reference_output, smoothed_logistic
from losses.registry import in_range, positive, register

__all__ = ["aot_loss", "aot_unpaired_loss"]

_CHECKS = {"beta": positive, "label_smoothing": in_range(0.0, 0.5, high_open=True)}


@register(
    "aot",
    optimum="quantile matching of the margins (sorted over the batch), not a per-pair optimum",
    paper="Melnyk et al. 2024, arXiv 2406.05882 (AOT), paired",
    summary="d = sort(S_θw − S_θl) − sort(S_rw − S_rl); −(1−ε) log σ(βd) − ε log σ(−βd)",
    checks=_CHECKS,
    batch_dependent=True,
)
def aot_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """AOT (paired): sort the policy log-odds ``S_θ(y_w) − S_θ(y_l)`` and the reference log-odds **independently over
    the batch**, ``d = sort(policy) − sort(reference)``, then ``L = −(1−ε) log σ(βd) − ε log σ(−βd)``.

    Distributional Preference Alignment of LLMs via Optimal Transport, Melnyk et al. 2024 (arXiv 2406.05882);
    summed log-probs. ``per_example`` is per *rank*, not per input row, and the value depends on the whole batch
    (and so on the per-device batch size). TRL ``aot``.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    policy_sorted, _ = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0)
    ref_sorted, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
    return reference_output(smoothed_logistic(beta * (policy_sorted - ref_sorted), label_smoothing), beta, logps)


@register(
    "aot_unpaired",
    optimum="quantile matching of ρ_w against ρ_l (each sorted over the batch): spreading the ratios apart "
    "keeps lowering it",
    paper="Melnyk et al. 2024, arXiv 2406.05882 (AOT), unpaired",
    summary="d = sort(ρ_w) − sort(ρ_l); −(1−ε) log σ(βd) − ε log σ(−βd)",
    checks=_CHECKS,
    batch_dependent=True,
)
def aot_unpaired_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """AOT (unpaired): ``d = sort(ρ_w) − sort(ρ_l)`` over the batch (first-order stochastic dominance of chosen
    rewards over rejected ones), ``L = −(1−ε) log σ(βd) − ε log σ(−βd)``; summed log-probs; per rank; TRL
    ``aot_unpaired``.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen_sorted, _ = torch.sort(policy_chosen_logps - ref_chosen_logps, dim=0)
    rejected_sorted, _ = torch.sort(policy_rejected_logps - ref_rejected_logps, dim=0)
    return reference_output(smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing), beta, logps)
