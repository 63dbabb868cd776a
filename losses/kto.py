"""KTO and unpaired APO-zero (kind ``"unpaired"``), equal to TRL 1.16's ``KTOTrainer`` loss on the same tensors.

An unpaired loss sees N single completions, each labelled desirable or undesirable, instead of pairs. Inputs
(``losses.registry.UNPAIRED_INPUTS``):

* ``policy_logps [N]`` ``S_θ(x, y)``, the policy's log-prob of each completion **summed** over its tokens (with grad);
* ``ref_logps [N]`` ``S_ref(x, y)``, the reference's;
* ``labels [N]`` True (or 1) where ``y`` is desirable, False (0) where undesirable — TRL's ``label`` column;
* ``policy_kl_logps [M]``, ``ref_kl_logps [M]`` (``kto`` only): the same log-probs of M *mismatched* pairs
  ``(x, y')``. TRL builds them by rotating the completions within each per-device batch, ``(x_1, y_n), (x_2, y_1), …,
  (x_n, y_{n−1})`` (so M = N), and computes the policy's under ``torch.no_grad``.

Notation: ``ρ = S_θ − S_ref`` the log-ratio of a row, ``w_D`` = ``desirable_weight``, ``w_U`` = ``undesirable_weight``,
``z₀`` KTO's reference point

    ``z₀ = max(0, (1/M) Σ_j [S_θ(x_j, y'_j) − S_ref(x_j, y'_j)])``, detached (no gradient),

an estimate of KL(π_θ ‖ π_ref) from the mismatched pairs, clamped at 0 as in the paper and TRL.

Reduction, exactly TRL's: ``L = (1/N) Σ_i ℓ_i`` over *all* N rows, with ``ℓ_i = w_D·(desirable loss)`` or
``w_U·(undesirable loss)`` (the weights are not renormalised). ``per_example [N]`` is ``ℓ`` in row order, so
``loss == per_example.mean()``. A batch without desirable (or without undesirable) rows is the mean over the other
side's rows, as in TRL (it concatenates an empty tensor for the missing side). Metrics have TRL's names: ``kl`` (z₀ as
used; 0 for ``apo_zero_unpaired``, which TRL also logs), ``rewards/chosen`` / ``rewards/rejected`` (the mean of
``β·ρ`` over the desirable / undesirable rows), ``logps/chosen`` / ``logps/rejected`` (the mean ``S_θ``), each only
when that side has rows, and ``rewards/margins`` (their difference) only when both have — TRL leaves them out the
same way. ``rewards/accuracies`` (prefopt's, always present) is the fraction of rows whose ρ lies on their label's
side of the reference point (ρ > z₀ desirable, ρ < z₀ undesirable). TRL's ``entropy``, ``logits/chosen``,
``logits/rejected``, ``num_tokens`` and ``aux_loss`` need the model's outputs and are not computed here.

Differences from TRL (tests/losses/test_kto.py runs TRL's own ``KTOTrainer._compute_loss`` for the rest):

* TRL averages z₀ over processes: each computes the mean over its own mismatched pairs, ``gather_for_metrics`` and
  ``.mean()`` average those means, and the clamp follows. Here z₀ is this call's mean (one process). A distributed
  trainer that wants TRL's value passes the gathered pairs of all processes as the KL inputs (equal to TRL's mean of
  means when every process has the same M, which TRL's fixed per-device batch gives).
* The reward / log-prob metrics are this call's means (TRL: sums gathered over processes / gathered counts).
* An empty batch (N = 0) or no mismatched pairs (M = 0) raises ``LossError`` (TRL returns NaN); a label other than
  True/False/0/1 raises (TRL casts with ``torch.as_tensor(label, dtype=torch.bool)``, so any non-zero is desirable).
* With bf16 / fp16 log-probs and one side empty, TRL's ``torch.cat`` with its float32 empty tensor promotes the loss
  to float32; here the loss keeps the inputs' dtype.
* TRL's ``nanmean`` skips NaN rows; here a non-finite input raises ``NonFiniteError`` (the registry's checks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from losses._common import LossError, LossOutput
from losses.registry import non_negative, positive, register

__all__ = ["kto_loss", "apo_zero_unpaired_loss", "kl_reference_point"]

_CHECKS = {"beta": positive, "desirable_weight": non_negative, "undesirable_weight": non_negative}


# ------------------------------------------------------------------------------------------------------ the pieces
def _rows(name: str, key: str, tensor: Tensor, n: int | None = None) -> int:
    """The row count of a 1-D input; raises naming the input when it is not ``[N]`` (or not ``[n]``) or is empty."""
    if tensor.dim() != 1:
        raise LossError(f"loss '{name}': '{key}' must be 1-D, got shape {tuple(tensor.shape)}")
    if n is not None and tensor.shape[0] != n:
        raise LossError(f"loss '{name}': '{key}' has shape {tuple(tensor.shape)}, expected ({n},)")
    if tensor.shape[0] == 0:
        raise LossError(f"loss '{name}': '{key}' is empty (TRL's loss would be NaN)")
    return tensor.shape[0]


def _bool_labels(name: str, labels: Tensor) -> Tensor:
    """``labels`` as bool; integer or float labels must be 0 or 1 (a reward passed as a label is an error)."""
    if labels.dtype == torch.bool:
        return labels
    if labels.is_complex() or not bool(((labels == 0) | (labels == 1)).all()):
        raise LossError(f"loss '{name}': 'labels' must be bool (True = desirable) or 0/1, got other values")
    return labels.to(torch.bool)


def kl_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point ``z₀ = max(0, mean_j (S_θ − S_ref)(x_j, y'_j))`` over the mismatched pairs, detached.

    TRL 1.16 ``KTOTrainer._compute_loss``: ``(KL_logps − ref_KL_logps).mean().detach()``, then (over processes)
    ``gather_for_metrics(·).mean().clamp(min=0)``; for one process that is this value.
    """
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def _unpaired(
    name: str,
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl: Tensor | None,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    desirable: Callable[[Tensor], Tensor],
    undesirable: Callable[[Tensor], Tensor],
) -> LossOutput:
    """``ℓ_i = w_D·desirable(ρ_i)`` where ``labels``, else ``w_U·undesirable(ρ_i)``; ``L`` = mean over all rows."""
    n = _rows(name, "policy_logps", policy_logps)
    _rows(name, "ref_logps", ref_logps, n)
    _rows(name, "labels", labels, n)
    labels = _bool_labels(name, labels)
    logratios = policy_logps - ref_logps
    per_example = torch.where(
        labels, desirable_weight * desirable(logratios), undesirable_weight * undesirable(logratios)
    )
    if kl is None:  # TRL: torch.zeros(1) when it computes no KL term (apo_zero_unpaired)
        kl = torch.zeros((), dtype=policy_logps.dtype, device=policy_logps.device)
    return LossOutput(per_example.mean(), per_example, _metrics(beta, policy_logps, logratios, labels, kl))


@torch.no_grad()
def _metrics(beta: float, policy_logps: Tensor, logratios: Tensor, labels: Tensor, kl: Tensor) -> dict[str, Tensor]:
    """TRL's names: ``kl``; ``rewards/{chosen,rejected}`` = mean β·ρ and ``logps/{chosen,rejected}`` = mean S_θ over
    the desirable / undesirable rows (only for a side with rows); ``rewards/margins`` only when both sides have. And
    prefopt's ``rewards/accuracies`` (not TRL's): the fraction of rows on their label's side of the reference point,
    ρ > z₀ if desirable, ρ < z₀ if not (z₀ = 0 for ``apo_zero_unpaired``); a coin flip at the start, where every
    ρ = z₀ = 0 up to rounding."""
    rewards = beta * logratios.detach()
    policy_logps = policy_logps.detach()
    metrics = {"kl": kl.detach()}
    right_side = torch.where(labels, logratios.detach() > kl, logratios.detach() < kl)
    metrics["rewards/accuracies"] = right_side.to(rewards.dtype).mean()
    for side, rows in (("chosen", labels), ("rejected", ~labels)):
        if bool(rows.any()):
            metrics[f"rewards/{side}"] = rewards[rows].mean()
            metrics[f"logps/{side}"] = policy_logps[rows].mean()
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


# -------------------------------------------------------------------------------------------------------- the losses
@register(
    "kto",
    kind="unpaired",
    paper="Ethayarajh et al. 2024, arXiv 2402.01306 (KTO), Eq. 7",
    summary="w_D·(1 − σ(β(ρ − z₀))) if desirable, w_U·(1 − σ(β(z₀ − ρ))) if not; z₀ = max(0, mean ρ(x, y')), no grad",
    checks=_CHECKS,
)
def kto_loss(
    policy_logps: Tensor,  # [N] S_θ(x, y), summed over completion tokens
    ref_logps: Tensor,  # [N] S_ref(x, y)
    labels: Tensor,  # [N] bool, True = desirable
    policy_kl_logps: Tensor,  # [M] S_θ(x, y') of mismatched pairs
    ref_kl_logps: Tensor,  # [M] S_ref(x, y')
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO: ``ℓ = w_D·(1 − σ(β(ρ − z₀)))`` for a desirable completion, ``ℓ = w_U·(1 − σ(β(z₀ − ρ)))`` for an
    undesirable one, ``L = (1/N) Σ_i ℓ_i``; ``ρ = S_θ(x, y) − S_ref(x, y)`` on **summed** log-probs.

    Kahneman-Tversky Optimization, Ethayarajh et al. 2024 (arXiv 2402.01306), Eq. 7: the value of a completion is
    its implied reward ``ρ`` relative to the reference point ``z₀ = max(0, (1/M) Σ_j [S_θ − S_ref](x_j, y'_j))``, a
    detached, clamped estimate of KL(π_θ ‖ π_ref) from M mismatched (prompt, completion) pairs (the KL inputs, see the
    module docstring), so the loss rewards a desirable completion only for beating the policy's drift from the
    reference. TRL ``KTOTrainer``, ``loss_type="kto"``; TRL's defaults β = 0.1, ``desirable_weight`` =
    ``undesirable_weight`` = 1 (the paper, Eq. 8, suggests ``w_D·n_D / (w_U·n_U)`` in [1, 4/3] for imbalanced
    data). Each row's loss lies in [0, w]; z₀ is a batch-level constant, so rows do not otherwise depend on each
    other.
    """
    _rows("kto", "policy_kl_logps", policy_kl_logps)
    _rows("kto", "ref_kl_logps", ref_kl_logps, policy_kl_logps.shape[0])
    kl = kl_reference_point(policy_kl_logps, ref_kl_logps)
    return _unpaired(
        "kto", policy_logps, ref_logps, labels, kl,
        beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        desirable=lambda rho: 1 - torch.sigmoid(beta * (rho - kl)),
        undesirable=lambda rho: 1 - torch.sigmoid(beta * (kl - rho)),
    )  # fmt: skip


@register(
    "apo_zero_unpaired",
    kind="unpaired",
    paper="D'Oosterlinck et al. 2024, arXiv 2408.06266 (APO-zero, unpaired variant of Eq. 7)",
    summary="w_D·(1 − σ(βρ)) if desirable, w_U·σ(βρ) if not",
    checks=_CHECKS,
)
def apo_zero_unpaired_loss(
    policy_logps: Tensor,  # [N] S_θ(x, y), summed over completion tokens
    ref_logps: Tensor,  # [N] S_ref(x, y)
    labels: Tensor,  # [N] bool, True = desirable
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """Unpaired APO-zero: ``ℓ = w_D·(1 − σ(βρ))`` for a desirable completion, ``ℓ = w_U·σ(βρ)`` for an undesirable
    one, ``L = (1/N) Σ_i ℓ_i``; ``ρ = S_θ(x, y) − S_ref(x, y)`` on **summed** log-probs.

    Anchored Preference Optimization, D'Oosterlinck et al. 2024 (arXiv 2408.06266): APO-zero (Eq. 7) raises the
    likelihood of desirable and lowers that of undesirable completions, each absolutely (anchored at ρ = 0, no KL
    reference point); use it when the desirable outputs are better than the model's own. TRL ``KTOTrainer``,
    ``loss_type="apo_zero_unpaired"``, which computes no KL term (this loss takes no KL inputs; the ``kl`` metric is
    TRL's constant 0). On a batch of the N chosen and N rejected completions of N pairs, with unit weights, the loss is
    half the pairwise ``apo_zero``'s; it equals ``kto`` wherever KTO's reference point is 0. Rows lie in [0, w].
    """
    return _unpaired(
        "apo_zero_unpaired", policy_logps, ref_logps, labels, None,
        beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        desirable=lambda rho: 1 - torch.sigmoid(beta * rho),
        undesirable=lambda rho: torch.sigmoid(beta * rho),
    )  # fmt: skip
