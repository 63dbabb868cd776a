"""MPO — Maximum Preference Optimization with importance sampling (Jiang, Huang, Wei; arXiv 2312.16430).

Status: **reconstruction, not verified against the paper's text.** Only the abstracts (v1, v2, v5) could be read.
What they establish: the objective is "preference as reward" (maximise the expected preference of the policy's
answers, minus a KL penalty to the reference), derived with importance sampling so it can be optimised off-policy on
preference pairs; an *off-policy KL term* is evaluated on regularisation data generated from the reference policy
beforehand, so neither a reward model nor a reference model is held in memory while optimising. The exact loss, its
scaling constants and defaults were not seen; every knob below is exposed so the paper's form can be dialled in.

Derivation (arXiv 2312.16430, §3). Objective, with μ the unknown distribution that produced the pairs:

    J(π) = E_x [ E_{y∼π} P(y ≻ μ | x) ] − β KL(π ‖ π_ref)

Preference term by importance sampling: E_{y∼π} P(y ≻ μ) = E_{y,y'∼μ}[(π(y)/μ(y)) 1{y ≻ y'}]. Normalising the
weights inside each labelled pair (self-normalised IS over {y_w, y_l}; the loser's indicator is 0) gives the bounded
per-pair reward w(y_w) = (π/μ)(y_w) / ((π/μ)(y_w) + (π/μ)(y_l)). Two choices of μ (``pair_center``):

* ``reference`` (default): the pairs were sampled from the reference policy (μ = π_ref, the usual setting: pairs
  drawn from the SFT model and labelled). Then (π/μ)(y) = exp(ρ(y)), ρ = S_θ − S_ref, and

      R_pair(θ) = σ(ρ_w − ρ_l) = σ((S_θ(y_w) − S_ref(y_w)) − (S_θ(y_l) − S_ref(y_l))),

  centred at the reference: at θ = θ_ref every pair gets σ(0) = ½ and the gradient weight σ′ = ¼ whatever the
  lengths. Needs the reference log-probs of the pairs, which are precomputed once before training (no reference
  *model* is held while optimising, as the abstract asks).
* ``none``: μ(y_w) ≈ μ(y_l) assumed, so they cancel: R_pair = σ(S_θ(y_w) − S_θ(y_l)). On summed log-probs the gap
  at initialisation is set by the completions' lengths (a median of 14 nats on the sentiment recipe's pairs): most
  pairs start saturated (σ′ < 0.025 for 86% of them) and learn almost nothing, and which pairs learn is decided by
  their length difference.

Both saturate, so deterministic preferences cannot drive the margin to infinity by themselves (unlike DPO's −log σ).
Off-policy KL: the reverse KL needs on-policy samples; on samples y ∼ π_ref drawn in advance its off-policy
counterpart is the forward KL E_{y∼π_ref}[S_ref(y) − S_θ(y)], whose θ-dependent part is the NLL of the
regularisation data. Hence the loss

    L_MPO = − mean_pairs σ(z / T)  +  β · NLL(D_reg)  +  γ_ptx · NLL(D_sft),   z = ρ_w − ρ_l  (or S_θ(y_w) − S_θ(y_l)),

with NLL a token mean (``nll_token_mean``: then β weighs the KL *per token*, about β/|y| per sequence) or a
per-sequence mean. β is the KL weight of the objective (the same role as DPO's β: larger = closer to the reference).
The regularisation samples must be many: a small pool reused at every step is memorised by the NLL term, which then
pulls the policy *away* from the reference (``mpo/kl_fwd_est`` < 0); the trainer sizes the pool from the data and the
schedule (README "The losses").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from losses._common import LossError, LossOutput, pair_metrics, require_lengths, token_mean
from losses.registry import LENGTH_INPUTS, REFERENCE_INPUTS, Requirements, non_negative, one_of, positive, register

__all__ = ["mpo_loss"]

_PAIR = ("policy_chosen_logps", "policy_rejected_logps")
_REG = ("reg_logps", "reg_lengths")
_SFT = ("sft_logps", "sft_lengths")


def _requires(hparams: Mapping[str, Any]) -> Requirements:
    inputs = list(_PAIR)
    inputs += list(REFERENCE_INPUTS) if hparams["pair_center"] == "reference" else []
    inputs += list(_REG) if hparams["beta"] > 0 else []
    inputs += list(LENGTH_INPUTS) if hparams["length_normalize"] else []
    inputs += list(_SFT) if hparams["ptx_weight"] > 0 else []
    optional = [n for n in (*LENGTH_INPUTS, *REFERENCE_INPUTS, *_REG, "reg_ref_logps", *_SFT) if n not in inputs]
    return Requirements(inputs=tuple(inputs), optional_inputs=tuple(optional), kind="pair")


def _nll(logps: Tensor, lengths: Tensor, token_mean_: bool, name: str) -> Tensor:
    """Negative log-likelihood of a batch of sequences: token mean ``−ΣS/Σ|y|`` or per-sequence mean ``−mean S``."""
    if logps.numel() == 0:
        raise LossError(f"loss 'mpo': '{name}' is empty; pass at least one sequence or set its weight to 0")
    if token_mean_:
        return -logps.sum() / lengths.to(logps.dtype).sum().clamp(min=1)
    return -logps.mean()


@register(
    "mpo",
    optimum="targets IPO's objective E_π P(y≻μ) − β·KL; σ(S_w − S_l) and forward KL only approximate it",
    paper="Jiang, Huang, Wei 2023, arXiv 2312.16430 (MPO; loss reconstructed, UNVERIFIED — see module docstring)",
    summary="−σ((ρ_w − ρ_l)/T) + β·NLL(reg ∼ π_ref) + γ·NLL(sft); pair_center=none: σ((S_w − S_l)/T)",
    aggregation="sum (preference; mean with length_normalize), token-mean (NLL terms)",
    checks={
        "beta": non_negative,
        "temperature": positive,
        "ptx_weight": non_negative,
        "pair_center": one_of("reference", "none"),
    },
    requires=_requires,
)
def mpo_loss(
    policy_chosen_logps: Tensor,  # [B] S_θ(y_w)
    policy_rejected_logps: Tensor,  # [B] S_θ(y_l)
    reg_logps: Tensor | None = None,  # [R] S_θ(y) on regularisation samples y ∼ π_ref, generated before training
    reg_lengths: Tensor | None = None,  # [R] their token counts
    chosen_lengths: Tensor | None = None,  # [B] needed when length_normalize
    rejected_lengths: Tensor | None = None,  # [B]
    reg_ref_logps: Tensor | None = None,  # [R] S_ref(y) stored with the samples: enables mpo/kl_fwd_est
    ref_chosen_logps: Tensor | None = None,  # [B] S_ref(y_w), precomputed: needed when pair_center="reference"
    ref_rejected_logps: Tensor | None = None,  # [B] S_ref(y_l)
    sft_logps: Tensor | None = None,  # [M] S_θ on a second regularisation set (SFT / unrelated tasks)
    sft_lengths: Tensor | None = None,  # [M]
    *,
    beta: float = 0.1,
    temperature: float = 1.0,
    ptx_weight: float = 0.0,
    nll_token_mean: bool = True,
    length_normalize: bool = False,
    pair_center: str = "reference",
) -> LossOutput:
    """MPO (reconstruction, UNVERIFIED): ``L = −mean σ(z/T) + β·NLL(reg) + γ_ptx·NLL(sft)``, ``z = ρ_w − ρ_l``.

    Maximum Preference Optimization with Importance Sampling, Jiang et al. (arXiv 2312.16430); derivation and
    verification status in this module's docstring. Holds **no reference model**: the KL term is the NLL of
    samples pre-generated from the reference policy (``reg_logps`` is the *policy's* log-prob of them), and the
    centred pair term uses the pairs' reference log-probs, precomputed once.

    * preference term: ``pair_center="reference"`` (default) z = ρ_w − ρ_l, the importance weights of pairs drawn
      from π_ref; ``"none"``: z = S_θ(y_w) − S_θ(y_l) (assumes μ(y_w) ≈ μ(y_l)); summed log-probs, or token
      averages ``S/|y|`` with ``length_normalize=True``.
    * ``beta`` (KL weight, default 0.1; spec suggests sweeping 0.01/0.1/1), ``temperature`` T (1.0),
      ``ptx_weight`` γ (0 = off), ``nll_token_mean`` (token mean, else per-sequence sum averaged over sequences).
    * batch-level NLL terms are spread evenly over ``per_example``.

    Metrics: ``mpo/pref_reward`` (mean σ), ``mpo/pair_accuracy``, ``mpo/logp_gap`` (mean z), ``mpo/sigma_prime_mean``
    (mean σ′(z/T): how much the pairs still learn; ¼ at the reference when centred), ``mpo/ess`` (mean effective
    sample size of the pair's self-normalised weights (σ, 1 − σ), 1/(σ² + (1−σ)²) ∈ [1, 2]), ``mpo/reg_nll``,
    ``mpo/kl_fwd_est`` = mean(S_ref − S_θ) on the regularisation batch (when ``reg_ref_logps`` is given),
    ``mpo/ptx_nll``; ``rewards/*`` are the tempered scores S/T (no reference: not DPO's implicit reward).
    """
    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    if pair_center == "reference":
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise LossError("loss 'mpo' with pair_center='reference' needs ref_chosen_logps and ref_rejected_logps")
        chosen, rejected = chosen - ref_chosen_logps, rejected - ref_rejected_logps
    if length_normalize:
        require_lengths(
            "mpo", "length_normalize=true", chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths
        )
        chosen, rejected = token_mean(chosen, chosen_lengths), token_mean(rejected, rejected_lengths)
    pref_reward = torch.sigmoid((chosen - rejected) / temperature)
    per_example = -pref_reward
    metrics = pair_metrics(
        chosen.detach() / temperature,
        rejected.detach() / temperature,
        policy_chosen_logps.detach(),
        policy_rejected_logps.detach(),
    )
    metrics["mpo/pref_reward"] = pref_reward.detach().mean()
    metrics["mpo/pair_accuracy"] = (chosen > rejected).to(chosen.dtype).mean().detach()
    metrics["mpo/logp_gap"] = (chosen - rejected).detach().mean()
    weight = pref_reward.detach()
    metrics["mpo/sigma_prime_mean"] = (weight * (1 - weight)).mean()
    metrics["mpo/ess"] = (1 / (weight.square() + (1 - weight).square())).mean()
    if beta > 0:
        if reg_logps is None or reg_lengths is None:
            raise LossError("loss 'mpo' with beta > 0 needs inputs reg_logps and reg_lengths")
        reg_nll = _nll(reg_logps, reg_lengths, nll_token_mean, "reg_logps")
        per_example = per_example + beta * reg_nll
        metrics["mpo/reg_nll"] = reg_nll.detach()
        if reg_ref_logps is not None:
            metrics["mpo/kl_fwd_est"] = (reg_ref_logps - reg_logps).detach().mean()
    if ptx_weight > 0:
        if sft_logps is None or sft_lengths is None:
            raise LossError("loss 'mpo' with ptx_weight > 0 needs inputs sft_logps and sft_lengths")
        ptx_nll = _nll(sft_logps, sft_lengths, nll_token_mean, "sft_logps")
        per_example = per_example + ptx_weight * ptx_nll
        metrics["mpo/ptx_nll"] = ptx_nll.detach()
    return LossOutput(per_example.mean(), per_example, metrics)
