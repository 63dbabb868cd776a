"""REINFORCE++ (Hu 2025, arXiv 2501.03262; OpenRLHF's ``reinforce`` and ``reinforce_baseline`` advantage estimators) as
a token-level loss (kind ``"token"``).

Inputs: ``policy_token_logps``, ``completion_mask``, ``old_token_logps`` (optional: the detached policy, one on-policy
step), ``ref_token_logps`` [N, T] (required when ``beta > 0``) and ``rewards`` — one scalar per completion, ``[N]``
or ``[G, K]`` (G prompts × K samples, rows in the completions' order).

The advantage is built from the sequence reward with the KL penalty folded *into the reward*, token by token:

    r'_i = r_i − mean_k r_(group of i)                (``baseline="group"``: REINFORCE++-baseline; "none": r'_i = r_i)
    ρ_it = −β·KL̂_it  (+ r'_i on each completion's last token),  KL̂_it = KL estimate of log π_old − log π_ref
    G_it = Σ_{s ≥ t} γ^{s−t} ρ_is                      (return to go over the completion's own tokens)
    A_it = (G_it − mean(G)) / (std(G) + 1e-8)          (mean and std over every completion token of the batch)

and the policy loss is PPO's clipped surrogate on those per-token advantages, averaged over every completion token of
the batch: ``L = Σ_it m_it · −min(r_it A_it, clip(r_it, 1 − ε, 1 + ε_high) A_it) / Σ_it m_it`` with
``r = π_θ/π_old``. The KL estimate (``kl_estimator``): ``k1 = d``, ``k2 = d²/2``, ``k3 = e^{−d} − 1 + d`` with
``d = log π_old − log π_ref`` (Schulman 2020); ``k2`` (≥ 0) is the default here. Everything in A is computed without
gradient: the gradient flows through π_θ in the ratio only. Unlike GRPO there is no per-group std scaling: the
normalisation is global, which is REINFORCE++'s point (robust to prompts whose rewards barely vary).

A trainer that splits a step's batch into several calls passes ``return_sums`` (the step's ``(Σ m·G, Σ m·G², Σ m)``,
totalled from each call's ``LossOutput.sums``) and ``batch_tokens`` (the step's completion tokens per call), so the
whitening and the token mean are the whole batch's, as OpenRLHF's over its replay buffer.

Metrics: ``kl`` (the masked token mean of KL̂, when β > 0), ``clip_ratio/*`` as the GRPO family, and
``reinforce/return_mean``, ``reinforce/return_std`` (of G before normalisation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from losses._common import LossError, LossOutput, MissingInputError
from losses.grpo import _CLIP_CHECKS, _clipped, _masked_mean, _per_sequence_extreme
from losses.ppo import _kl, moment_sums
from losses.registry import non_negative, one_of, register, required_if

__all__ = ["reinforce_pp_loss", "reinforce_pp_advantages"]


@torch.no_grad()
def reinforce_pp_advantages(
    rewards: Tensor,
    completion_mask: Tensor,
    old_token_logps: Tensor,
    ref_token_logps: Tensor | None,
    *,
    beta: float,
    kl_estimator: str = "k2",
    baseline: str = "none",
    gamma: float = 1.0,
    return_sums: Tensor | None = None,
    token_rewards: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-token advantages ``[N, T]`` (module docstring), the returns before normalisation and the per-token KL
    estimate (None when ``beta == 0``). ``return_sums``: ``(Σ m·G, Σ m·G², Σ m)`` of a larger batch this one is part
    of, whose mean and std whiten instead of this call's. ``token_rewards [N, T]``: a reward per token (placed on the
    completion's tokens, each row summing to its completion's reward) instead of ``rewards`` on the last token; with
    ``baseline="group"`` the group's mean of ``rewards`` is still subtracted on the last token."""
    mask = completion_mask.to(old_token_logps.dtype)
    n = mask.shape[0]
    r = rewards.to(mask.dtype)
    if baseline == "group":
        if r.dim() != 2:
            raise LossError("loss 'reinforce_pp' with baseline='group' needs 'rewards' as [G, K] (K samples a prompt)")
        r = r - r.mean(dim=1, keepdim=True) if token_rewards is None else -r.mean(dim=1, keepdim=True).expand_as(r)
    elif token_rewards is not None:
        r = torch.zeros_like(r)  # the whole reward is in token_rewards
    r = r.reshape(-1)
    if r.numel() != n:
        raise LossError(f"loss 'reinforce_pp': 'rewards' has {r.numel()} values for {n} completions")
    per_token = torch.zeros_like(mask)
    kl = None
    if beta > 0:
        kl = _kl((old_token_logps - ref_token_logps.to(mask.dtype)) * mask, kl_estimator) * mask
        per_token = per_token - beta * kl
    lengths = mask.sum(dim=1).long()
    rows = torch.arange(n, device=mask.device)[lengths > 0]
    per_token[rows, lengths[lengths > 0] - 1] += r[lengths > 0]  # the sequence reward on the last real token
    if token_rewards is not None:
        per_token = per_token + token_rewards.to(mask.dtype) * mask
    returns = torch.zeros_like(per_token)
    running = torch.zeros(n, dtype=mask.dtype, device=mask.device)
    for t in range(mask.shape[1] - 1, -1, -1):  # return to go; padding (after the last token) stays 0
        running = per_token[:, t] + gamma * running * mask[:, t]
        returns[:, t] = running * mask[:, t]
    if return_sums is None:
        count = mask.sum().clamp(min=1.0)
        mean = (returns * mask).sum() / count
        var = ((returns - mean).square() * mask).sum() / count
    else:
        total, squares, count = return_sums.to(mask.dtype).unbind()
        count = count.clamp(min=1.0)
        mean = total / count
        var = (squares / count - mean.square()).clamp(min=0.0)
    advantages = (returns - mean) / (var.sqrt() + 1e-8) * mask
    return advantages, returns, kl


@register(
    "reinforce_pp",
    kind="token",
    paper="Hu 2025, arXiv 2501.03262 (REINFORCE++); OpenRLHF advantage_estimator reinforce / reinforce_baseline",
    summary="Σ m·−min(r·A, clip(r, 1−ε, 1+ε_high)·A) / Σ m, A = whitened return-to-go of (r' on the last token − β·KL̂)",
    aggregation="per token; token mean over the batch; advantages whitened over every completion token",
    checks={
        **_CLIP_CHECKS,
        "kl_estimator": one_of("k1", "k2", "k3"),
        "baseline": one_of("none", "group"),
        "gamma": non_negative,
    },
    requires=required_if(lambda hparams: hparams["beta"] > 0, ("ref_token_logps",)),
    step_sums=("return_sums",),
)
def reinforce_pp_loss(
    policy_token_logps: Tensor,  # [N, T] log π_θ per token, with grad
    completion_mask: Tensor,  # [N, T]
    rewards: Tensor,  # [N] or [G, K] one scalar reward per completion
    old_token_logps: Tensor | None = None,  # [N, T] the sampling policy's (absent: the detached policy)
    ref_token_logps: Tensor | None = None,  # [N, T] the reference's (needed when beta > 0)
    return_sums: Tensor | None = None,  # [3] the step's (Σ m·G, Σ m·G², Σ m) of the returns (trainer)
    batch_tokens: Tensor | None = None,  # [] the step's completion tokens per call (trainer)
    token_rewards: Tensor | None = None,  # [N, T] rewards per token (ALaRM's vector), instead of rewards on the last
    *,
    beta: float = 0.01,
    kl_estimator: str = "k2",
    baseline: str = "none",
    gamma: float = 1.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    use_bias_correction_kl: bool = True,
) -> LossOutput:
    """REINFORCE++ (module docstring): PPO's clipped surrogate on globally whitened per-token returns of the
    sequence reward with the per-token KL penalty folded in. ``baseline="group"`` subtracts each prompt's mean reward
    first (REINFORCE++-baseline). ``use_bias_correction_kl`` is accepted for a common interface with the GRPO family
    and has no effect (the KL is in the reward, not the loss)."""
    if policy_token_logps.dim() != 2 or completion_mask.shape != policy_token_logps.shape:
        raise LossError(
            "loss 'reinforce_pp': 'policy_token_logps' and 'completion_mask' must both be [N, T], got "
            f"{tuple(policy_token_logps.shape)} and {tuple(completion_mask.shape)}"
        )
    if beta > 0 and ref_token_logps is None:
        raise MissingInputError("loss 'reinforce_pp' with beta > 0 needs input(s) ref_token_logps")
    dtype = policy_token_logps.dtype
    mask = completion_mask.to(dtype)
    valid = completion_mask != 0
    old = policy_token_logps.detach() if old_token_logps is None else old_token_logps.detach().to(dtype)
    ref = None if ref_token_logps is None else ref_token_logps.detach().to(dtype)
    advantages, returns, kl = reinforce_pp_advantages(
        rewards.detach(), mask, old, ref, beta=beta, kl_estimator=kl_estimator, baseline=baseline, gamma=gamma,
        return_sums=return_sums, token_rewards=None if token_rewards is None else token_rewards.detach(),
    )  # fmt: skip
    zero = policy_token_logps.new_zeros(())
    ratio = torch.exp(torch.where(valid, policy_token_logps - old, zero))
    per_token, flags = _clipped(epsilon, epsilon_high, delta)(ratio, advantages, policy_token_logps)
    summed = torch.where(valid, per_token, zero).mul(mask).sum(-1)
    count = mask.sum() if batch_tokens is None else torch.as_tensor(batch_tokens, dtype=dtype)
    per_example = summed * (mask.shape[0] / count.clamp(min=1.0))
    metrics: dict[str, Tensor] = {}
    with torch.no_grad():
        if kl is not None:
            metrics["kl"] = _masked_mean(kl, mask)
        for key, flag in flags.items():
            metrics[f"clip_ratio/{key}_mean"] = _masked_mean(flag, mask)
        metrics["clip_ratio/low_min"] = _per_sequence_extreme(flags["low"], mask, largest=False)
        metrics["clip_ratio/high_max"] = _per_sequence_extreme(flags["high"], mask, largest=True)
        metrics["reinforce/return_mean"] = _masked_mean(returns, mask)
        metrics["reinforce/return_std"] = (
            ((returns - metrics["reinforce/return_mean"]).square() * mask).sum() / mask.sum().clamp(min=1.0)
        ).sqrt()
    return LossOutput(per_example.mean(), per_example, metrics, {"return_sums": moment_sums(returns, mask)})
