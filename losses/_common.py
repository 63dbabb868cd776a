"""Shared pieces of every loss: the output type, errors, hyper-parameter checks and metric helpers.

Notation (README "The losses"): ``S`` is a summed completion log-prob, ``|y|`` a completion token count,
``ρ = S_θ − S_ref`` the policy/reference log-ratio, ``Δ = ρ_w − ρ_l`` the pair margin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LossOutput",
    "LossError",
    "UnknownLossError",
    "HyperParameterError",
    "MissingInputError",
    "NonFiniteError",
    "pair_metrics",
    "reference_metrics",
    "reference_output",
    "token_mean",
    "require_lengths",
    "smoothed_logistic",
    "expectile",
]


class LossError(ValueError):
    """Base class of every error the loss package raises for bad input."""


class UnknownLossError(LossError, KeyError):
    """An unregistered loss name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class HyperParameterError(LossError):
    """An unknown hyper-parameter, or a value outside its valid range."""


class MissingInputError(LossError):
    """A tensor input the loss declared it needs was not passed."""


class NonFiniteError(LossError, FloatingPointError):
    """A NaN or infinity in a loss input or output; names the tensor and the rows."""


@dataclass
class LossOutput:
    """What every loss returns.

    loss:        scalar; equals ``per_example.mean()`` (for a combination, the weighted sum of its parts' means,
                 which is again the mean of the weighted per-example sum).
    per_example: [B] per pair (or per prompt for group losses). Batch-level terms (a regularisation NLL on a
                 separate batch, TRL's token-mean SFT term) are spread evenly over the rows so the mean is exact.
    metrics:     name -> detached scalar tensor, TRL names (``rewards/chosen`` ...) plus the method's own.
    sums:        name -> detached partial sums over this call's rows of a statistic the loss normalises by (a loss
                 that whitens its advantages over the batch). A loss registered with ``step_sums`` takes each back
                 as the optional input of the same name, totalled by a trainer over every call of the step (all
                 micro-batches and processes), so its update does not depend on how the step was split.
    """

    loss: Tensor
    per_example: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    sums: dict[str, Tensor] = field(default_factory=dict)


def token_mean(summed_logps: Tensor, lengths: Tensor) -> Tensor:
    """``S / |y|`` with ``|y|`` clamped to >= 1. Keeps the dtype of ``summed_logps``."""
    return summed_logps / lengths.to(summed_logps.dtype).clamp(min=1)


def require_lengths(loss_name: str, reason: str, **lengths: Tensor | None) -> None:
    """Raise ``MissingInputError`` when a length input a hyper-parameter setting needs was not passed."""
    missing = [k for k, v in lengths.items() if v is None]
    if missing:
        raise MissingInputError(f"loss '{loss_name}' with {reason} needs input(s) {', '.join(missing)}")


def smoothed_logistic(logits: Tensor, label_smoothing: float) -> Tensor:
    """``−(1−ε) log σ(z) − ε log σ(−z)``: the logistic loss with labels flipped with probability ε."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


@torch.no_grad()
def pair_metrics(
    chosen_rewards: Tensor,  # [B]
    rejected_rewards: Tensor,  # [B]
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
) -> dict[str, Tensor]:
    """TRL's metric names for a pairwise loss: rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}.

    ``rewards/accuracies`` is the strict ``chosen > rejected`` rate, as in TRL.
    """
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "logps/chosen": policy_chosen_logps.mean(),
        "logps/rejected": policy_rejected_logps.mean(),
    }


def reference_metrics(
    beta: float,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> dict[str, Tensor]:
    """Metrics of a loss with a reference: implicit rewards ``βρ`` (TRL names) and the mean log-ratios
    ``logratio/{chosen,rejected}`` = mean log π_θ(y)/π_ref(y) over the pairs' completions (not a KL: negative when the
    policy moves mass away from the data)."""
    chosen_logratios = (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_logratios = (policy_rejected_logps - ref_rejected_logps).detach()
    metrics = pair_metrics(
        beta * chosen_logratios, beta * rejected_logratios, policy_chosen_logps.detach(), policy_rejected_logps.detach()
    )
    metrics["logratio/chosen"] = chosen_logratios.mean()
    metrics["logratio/rejected"] = rejected_logratios.mean()
    return metrics


def reference_output(per_example: Tensor, beta: float, logps: tuple[Tensor, Tensor, Tensor, Tensor]) -> LossOutput:
    """The output of a pairwise loss with a reference; ``logps`` = (policy chosen, policy rejected, ref chosen,
    ref rejected), each [B] summed."""
    return LossOutput(per_example.mean(), per_example, reference_metrics(beta, *logps))


def expectile(values: Tensor, tau: float, iterations: int = 100) -> Tensor:
    """The τ-expectile of ``values`` (1-D): the m minimising Σ |τ − 1{x < m}|·(x − m)², i.e. τ·Σ_{x>m}(x − m) =
    (1 − τ)·Σ_{x<m}(m − x); τ = 0.5 is the mean. Iteratively reweighted means, exact once the sides stop changing."""
    if values.numel() == 0:
        raise LossError("expectile of an empty set")
    m = values.mean()
    for _ in range(iterations):
        weights = torch.where(
            values > m, torch.as_tensor(tau, dtype=values.dtype), torch.as_tensor(1 - tau, dtype=values.dtype)
        )
        new = (weights * values).sum() / weights.sum()
        if bool(new == m):
            break
        m = new
    return m
