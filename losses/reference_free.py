"""Reference-free losses: SimPO, CPO, ORPO and the SFT term. None of them takes reference log-probs, so a trainer
holds no reference model for them. Their ``rewards/*`` metrics are β × the policy's own (summed or averaged)
log-probs, as TRL logs them; they are not comparable to DPO's implicit rewards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from losses._common import LossOutput, pair_metrics, smoothed_logistic, token_mean
from losses.registry import in_range, non_negative, positive, register

__all__ = ["simpo_loss", "cpo_loss", "orpo_loss", "sft_loss", "chosen_nll", "log1mexp"]

_EPS_HALF = in_range(0.0, 0.5, high_open=True)


def chosen_nll(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """TRL's SFT/NLL term, the token-mean cross-entropy over all chosen tokens of the batch ``−Σ S_w / Σ |y_w|``,
    returned per row as that row's share ``−S_w,i · B / Σ|y_w|`` (so its mean is the batch value exactly)."""
    total_tokens = chosen_lengths.to(policy_chosen_logps.dtype).sum().clamp(min=1)
    return -policy_chosen_logps * (policy_chosen_logps.shape[0] / total_tokens)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − e^x)`` for ``x < 0``, stable at both ends; each branch sees only its own range so the
    unused one cannot put a NaN into the gradient."""
    split = -math.log(2.0)
    near_zero = torch.log(-torch.expm1(x.clamp(min=split)))
    far = torch.log1p(-torch.exp(x.clamp(max=split)))
    return torch.where(x > split, near_zero, far)


def _policy_output(
    per_example: Tensor,
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    beta: float,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
) -> LossOutput:
    metrics = pair_metrics(
        beta * chosen_scores.detach(),
        beta * rejected_scores.detach(),
        policy_chosen_logps.detach(),
        policy_rejected_logps.detach(),
    )
    return LossOutput(per_example.mean(), per_example, metrics)


@register(
    "simpo",
    optimum="reference-free with target margin γ: π_ref does not enter",
    paper="Meng et al. 2024, arXiv 2405.14734 (SimPO)",
    summary="−log σ(β(A_w − A_l) − γ), A = S_θ/|y|",
    aggregation="mean",
    checks={"beta": positive, "gamma": non_negative, "label_smoothing": _EPS_HALF},
)
def simpo_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    chosen_lengths: Tensor,  # [B]
    rejected_lengths: Tensor,  # [B]
    *,
    beta: float = 2.5,
    gamma: float = 1.375,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SimPO: ``L = −log σ(β (A_w − A_l) − γ)`` with **averaged** log-probs ``A = S_θ/|y|``; no reference model.

    Simple Preference Optimization with a Reference-Free Reward, Meng et al. 2024 (arXiv 2405.14734). Equals TRL's
    ``CPOTrainer(loss_type="simpo", cpo_alpha=0)`` (γ = ``simpo_gamma``); ε smooths the label as there. Defaults
    are the paper's setting β = 2.5, γ = 1.375 (TRL's defaults are β = 0.1, γ = 0.5). Add an SFT term with
    ``combo`` (CPO-SimPO).
    """
    chosen = token_mean(policy_chosen_logps, chosen_lengths)
    rejected = token_mean(policy_rejected_logps, rejected_lengths)
    per_example = smoothed_logistic(beta * (chosen - rejected) - gamma, label_smoothing)
    return _policy_output(per_example, chosen, rejected, beta, policy_chosen_logps, policy_rejected_logps)


@register(
    "cpo",
    optimum="reference-free DPO (uniform reference) + α·NLL(chosen): pulled toward the SFT closed form",
    paper="Xu et al. 2024, arXiv 2401.08417 (CPO), Eq. 3 + NLL",
    summary="−log σ(β(S_w − S_l)) + α·NLL(y_w)",
    aggregation="sum (preference), token-mean (NLL)",
    checks={"beta": positive, "alpha": non_negative, "label_smoothing": _EPS_HALF},
)
def cpo_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    chosen_lengths: Tensor,  # [B]
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """CPO: ``L = −(1−ε) log σ(β(S_w − S_l)) − ε log σ(−β(S_w − S_l)) + α · NLL(y_w)`` on **summed** log-probs;
    ``NLL`` is the token-mean cross-entropy over the batch's chosen tokens (TRL); no reference model.

    Contrastive Preference Optimization, Xu et al. 2024 (arXiv 2401.08417), Eq. 3 plus the behaviour-cloning term.
    Equals TRL ``CPOTrainer(loss_type="sigmoid")``; defaults β = 0.1, α = ``cpo_alpha`` = 1.0.
    """
    preference = smoothed_logistic(beta * (policy_chosen_logps - policy_rejected_logps), label_smoothing)
    nll = chosen_nll(policy_chosen_logps, chosen_lengths)
    out = _policy_output(
        preference + alpha * nll,
        policy_chosen_logps,
        policy_rejected_logps,
        beta,
        policy_chosen_logps,
        policy_rejected_logps,
    )
    out.metrics["nll_loss"] = nll.detach().mean()
    out.metrics["cpo/preference_loss"] = preference.detach().mean()
    return out


@register(
    "orpo",
    optimum="NLL(chosen) + λ·odds ratio (β passed as λ): near the SFT closed form",
    paper="Hong et al. 2024, arXiv 2403.07691 (ORPO), Eqs. 4-7",
    summary="NLL(y_w) − λ log σ(log odds(A_w) − log odds(A_l))",
    aggregation="mean",
    checks={"beta": positive},
)
def orpo_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    chosen_lengths: Tensor,  # [B]
    rejected_lengths: Tensor,  # [B]
    *,
    beta: float = 0.1,
) -> LossOutput:
    """ORPO: ``L = NLL(y_w) − λ log σ(lo)``, ``lo = (A_w − A_l) − [log(1 − e^{A_w}) − log(1 − e^{A_l})]`` with
    **averaged** log-probs ``A = S_θ/|y|``; λ = ``beta`` (paper 0.1); ``NLL`` = token-mean over the batch's chosen
    tokens. No reference model.

    ORPO: Monolithic Preference Optimization without Reference Model, Hong et al. 2024 (arXiv 2403.07691).
    Equals TRL ``ORPOTrainer``; logs ``log_odds_ratio`` (mean log σ(lo)) and ``log_odds_chosen`` (mean lo).
    """
    chosen = token_mean(policy_chosen_logps, chosen_lengths)
    rejected = token_mean(policy_rejected_logps, rejected_lengths)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    log_ratio = F.logsigmoid(log_odds)
    nll = chosen_nll(policy_chosen_logps, chosen_lengths)
    out = _policy_output(nll - beta * log_ratio, chosen, rejected, beta, policy_chosen_logps, policy_rejected_logps)
    out.metrics.update(
        nll_loss=nll.detach().mean(), log_odds_ratio=log_ratio.detach().mean(), log_odds_chosen=log_odds.detach().mean()
    )
    return out


@register(
    "sft",
    optimum="closed form: the chosen marginal μ(y)·Σ μ(y')p(y≻y')",
    paper="supervised fine-tuning on the chosen completion (TRL loss_type='sft', RPO/Mixed-PO ingredient)",
    summary="−Σ S_θ(y_w) / Σ |y_w| (token-mean NLL of the chosen completions)",
    aggregation="mean",
)
def sft_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B] unused; kept so every pairwise loss takes the same batch
    chosen_lengths: Tensor,  # [B]
) -> LossOutput:
    """SFT term: token-mean cross-entropy of the chosen completions over the batch, ``−Σ_i S_θ(y_w,i) / Σ_i |y_w,i|``.

    Equals TRL 1.16 ``loss_type="sft"`` (a batch token mean, not a mean of per-row means); ``per_example`` holds
    each row's share of it. No reference model. Combine with a preference loss through ``combo``.
    """
    per_example = chosen_nll(policy_chosen_logps, chosen_lengths)
    chosen_mean = token_mean(policy_chosen_logps.detach(), chosen_lengths)
    metrics = {
        "nll_loss": per_example.detach().mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
        "sft/chosen_token_logp": chosen_mean.mean(),
    }
    return LossOutput(per_example.mean(), per_example, metrics)
