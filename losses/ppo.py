"""PPO for language models (Schulman et al. 2017, arXiv 1707.06347; the RLHF form of Ziegler et al. 2019, arXiv
1909.08593, and Ouyang et al. 2022), as TRL 1.16's ``PPOTrainer`` and OpenRLHF compute it, as a token-level loss
(kind ``"token"``).

Inputs, every per-token tensor ``[N, T]`` left-aligned (column 0 = each completion's first token, ``m`` the mask):

* ``policy_token_logps`` log π_θ per token (with grad); ``old_token_logps`` the sampling policy's (absent: the
  detached policy, one on-policy step); ``ref_token_logps`` the reference's (needed when ``beta > 0``);
* ``values`` V_φ per token (with grad: a value head or critic trained by this loss's value term) and ``old_values``
  the values at sampling time (absent: ``values.detach()``);
* rewards: ``rewards`` one scalar per completion (``[N]`` or ``[G, K]``), added on each completion's **last real
  token**, and/or ``token_rewards [N, T]`` a reward per token (ALaRM's token-level aspects, a reward's
  ``token_scores``), already placed on the completion's tokens (a trainer aligns each vector to its own row's last
  real token). At least one of the two; given ``token_rewards``, they are the whole reward (``rewards`` unused: a
  per-token reward sums to the completion's reward, as ALaRM's).

The per-token reward folds in the KL penalty to the reference, as TRL and the papers do:

    ρ_it = −β·KL̂_it + token_rewards_it (+ rewards_i if t is the last token of i)

with ``KL̂ = kl_estimator(d)``, ``d = log π_old − log π_ref``: ``k1 = d``, ``k3 = e^{−d} − 1 + d`` (TRL's two
estimators; ``k2 = d²/2`` too).
Advantages by GAE (Schulman et al. 2016, arXiv 1506.02438) on the old values, without gradient, with ``V = 0`` past
the last token:

    δ_t = ρ_t + γ V_{t+1} − V_t,   A_t = δ_t + γλ A_{t+1},   R_t = A_t + V_t (the value targets)

then whitened over every completion token of the call (``whiten``; TRL's ``masked_whiten``: mean, Bessel-corrected
variance, ``(A − mean)/sqrt(var + 1e-8)``). The loss, both terms masked token means over the call:

    L = mean_m[max(−A·r, −A·clip(r, 1 − ε, 1 + ε_high))] + vf_coef · ½·mean_m[max((V − R)², (V_clip − R)²)]

with ``r = π_θ/π_old`` per token and ``V_clip = V_old + clip(V − V_old, −cliprange_value, cliprange_value)``.
Defaults are TRL 1.16 PPOConfig's (β = kl_coef 0.05, k1, γ = 1, λ = 0.95, ε = 0.2, cliprange_value 0.2,
vf_coef 0.1). Log-probs are per token; nothing is summed before the ratio.

A trainer that splits a step's batch into several calls passes ``advantage_sums`` (the step's ``(Σ m·A, Σ m·A²,
Σ m)`` of the raw advantages, totalled from each call's ``LossOutput.sums``) and ``batch_tokens`` (the step's
completion tokens per call): the whitening moments and the token-mean normaliser are then the whole batch's, so the
update does not depend on the split.

Metrics (TRL's names where it has them): ``kl`` (masked mean of KL̂), ``policy/clipfrac``, ``policy/approxkl``
(½·mean of (log r)²), ``value/loss``, ``value/clipfrac``, ``ppo/return_mean``, ``ppo/advantage_mean`` (before
whitening), ``ppo/reward_mean`` (mean per-completion sum of ρ).

The adaptive KL coefficient of Ziegler et al. 2019 (§2.2) is a trainer's state, not the loss's: with
``kl_target`` set, the trainer starts at ``β`` and after every step multiplies it by
``1 + clip(KL/kl_target − 1, −0.2, 0.2) · n/kl_horizon`` (KL: the step's sampled sequence KL to the reference, n: the
step's sampled completions) and passes it as the input ``kl_coef``; the loss only uses it. ALaRM's setting:
β = 0.2, target 6, horizon 10000. Early stopping of the steps over one draw on policy KL is the trainer's too
(``trainer.online.early_stopping``, ``target_kl``: a step whose ``policy/approxkl`` passes 1.5 × ``target_kl`` ends
its draw, as TRL's PPO).
"""

from __future__ import annotations

import torch
from torch import Tensor

from losses._common import LossError, LossOutput, MissingInputError
from losses.grpo import _masked_mean
from losses.registry import non_negative, one_of, optional, positive, register, required_if

__all__ = ["ppo_loss", "gae", "masked_whiten", "moment_sums"]


def _kl(d: Tensor, estimator: str) -> Tensor:
    """Schulman's estimators of KL(π_old‖π_ref) from ``d = log π_old − log π_ref`` at tokens sampled from π_old:
    k1 = d, k2 = d²/2, k3 = e^{−d} − 1 + d (OpenRLHF's ``compute_approx_kl``, without its ±10 clamp)."""
    if estimator == "k1":
        return d
    if estimator == "k2":
        return d.square() / 2
    return torch.expm1(-d) + d


@torch.no_grad()
def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8, sums: Tensor | None = None) -> Tensor:
    """TRL's ``masked_whiten``: ``(x − mean)/sqrt(var + eps)`` with the masked mean and the Bessel-corrected masked
    variance (``n/(n − 1)``, unchanged when n ≤ 1); 0 on masked positions. ``sums``: ``(Σ m·x, Σ m·x², Σ m)`` of a
    larger batch this one is part of, whose moments are then used."""
    mask = mask.to(values.dtype)
    if sums is None:
        count = mask.sum()
        mean = _masked_mean(values, mask)
        var = _masked_mean((values - mean).square(), mask)
    else:
        total, squares, count = sums.to(values.dtype).unbind()
        count = count.clamp(min=1.0)
        mean = total / count
        var = (squares / count - mean.square()).clamp(min=0.0)
    if count > 1:
        var = var * count / (count - 1)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def moment_sums(values: Tensor, mask: Tensor) -> Tensor:
    """``(Σ m·x, Σ m·x², Σ m)``, detached, float64: what whitening over several calls totals."""
    mask, values = mask.detach().double(), values.detach().double()
    return torch.stack([(values * mask).sum(), (values.square() * mask).sum(), mask.sum()])


@torch.no_grad()
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each row's own tokens (left-aligned ``[N, T]``; positions where
    ``mask`` is 0 come after the row's last token and contribute nothing): ``δ_t = r_t + γV_{t+1} − V_t`` with
    ``V = 0`` past the last token, ``A_t = δ_t + γλA_{t+1}``. Returns ``(advantages, returns = A + V)``, 0 on
    padding."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        next_value, next_advantage = values[:, t], advantage  # both 0 on padding: V = 0 past the last token
    return advantages, (advantages + values) * mask


def _sequence_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """``rewards [N]`` or ``[G, K]`` on each row's last real token of an ``[N, T]`` tensor."""
    n = mask.shape[0]
    flat = rewards.detach().to(mask.dtype).reshape(-1)
    if flat.numel() != n:
        raise LossError(f"loss 'ppo': 'rewards' has {flat.numel()} values for {n} completions")
    placed = torch.zeros_like(mask)
    lengths = mask.sum(dim=1).long()
    rows = torch.arange(n, device=mask.device)[lengths > 0]
    placed[rows, lengths[lengths > 0] - 1] = flat[lengths > 0]
    return placed


@register(
    "ppo",
    kind="token",
    paper="Schulman et al. 2017, arXiv 1707.06347 (PPO); Ziegler et al. 2019, arXiv 1909.08593 (RLHF); "
    "GAE: Schulman et al. 2016, arXiv 1506.02438",
    summary="mean_m max(−A·r, −A·clip(r)) + vf_coef·½·mean_m max((V − R)², (V_clip − R)²), A = whitened GAE of "
    "(reward − β·KL̂) per token",
    aggregation="per token; token means over the call's completion tokens (policy and value terms)",
    checks={
        "beta": non_negative,
        "kl_estimator": one_of("k1", "k2", "k3"),
        "gamma": non_negative,
        "lam": non_negative,
        "epsilon": non_negative,
        "epsilon_high": optional(non_negative),
        "cliprange_value": positive,
        "vf_coef": non_negative,
        "whiten": one_of(True, False),
        "kl_target": optional(positive),
        "kl_horizon": positive,
    },
    requires=required_if(lambda hparams: hparams["beta"] > 0, ("ref_token_logps",)),
    step_sums=("advantage_sums",),
)
def ppo_loss(
    policy_token_logps: Tensor,  # [N, T] log π_θ per token, with grad
    completion_mask: Tensor,  # [N, T]
    values: Tensor,  # [N, T] V_φ per token, with grad
    old_token_logps: Tensor | None = None,  # [N, T] the sampling policy's (absent: the detached policy)
    ref_token_logps: Tensor | None = None,  # [N, T] the reference's (needed when beta > 0)
    old_values: Tensor | None = None,  # [N, T] values at sampling time (absent: values.detach())
    rewards: Tensor | None = None,  # [N] or [G, K] one reward per completion, on its last token
    token_rewards: Tensor | None = None,  # [N, T] rewards per token, placed on the completion's tokens
    kl_coef: Tensor | None = None,  # [] the KL coefficient of this step (an adaptive controller's), instead of beta
    advantage_sums: Tensor | None = None,  # [3] the step's (Σ m·A, Σ m·A², Σ m) of the raw advantages (trainer)
    batch_tokens: Tensor | None = None,  # [] the step's completion tokens per call (trainer)
    *,
    beta: float = 0.05,
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    whiten: bool = True,
    kl_target: float | None = None,
    kl_horizon: int = 10000,
) -> LossOutput:
    """PPO with a KL-penalised per-token reward and GAE (module docstring). ``kl_target`` / ``kl_horizon`` configure
    the trainer's adaptive controller (module docstring), which passes its coefficient as ``kl_coef``; the loss
    itself uses ``kl_coef`` when given, else ``beta``."""
    shape = tuple(policy_token_logps.shape)
    if policy_token_logps.dim() != 2:
        raise LossError(f"loss 'ppo': 'policy_token_logps' must be [N, T], got shape {shape}")
    named = {
        "completion_mask": completion_mask,
        "values": values,
        "old_token_logps": old_token_logps,
        "ref_token_logps": ref_token_logps,
        "old_values": old_values,
        "token_rewards": token_rewards,
    }
    for key, tensor in named.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise LossError(f"loss 'ppo': '{key}' has shape {tuple(tensor.shape)} but 'policy_token_logps' has {shape}")
    if rewards is None and token_rewards is None:
        raise MissingInputError("loss 'ppo' needs input(s) rewards or token_rewards")
    if beta > 0 and ref_token_logps is None:
        raise MissingInputError("loss 'ppo' with beta > 0 needs input(s) ref_token_logps")
    dtype = policy_token_logps.dtype
    mask = completion_mask.to(dtype)
    valid = completion_mask != 0
    zero = policy_token_logps.new_zeros(())
    old = policy_token_logps.detach() if old_token_logps is None else old_token_logps.detach().to(dtype)
    old_v = values.detach() if old_values is None else old_values.detach().to(dtype)

    with torch.no_grad():
        per_token = torch.zeros_like(mask)
        kl = None
        coef = beta if kl_coef is None else kl_coef.detach().to(dtype)
        if beta > 0:
            kl = _kl(torch.where(valid, old - ref_token_logps.detach().to(dtype), zero), kl_estimator) * mask
            per_token = per_token - coef * kl
        if token_rewards is not None:  # the whole reward, per token
            per_token = per_token + token_rewards.detach().to(dtype) * mask
        else:
            per_token = per_token + _sequence_rewards(rewards, mask)
        raw, returns = gae(per_token, old_v, mask, gamma=gamma, lam=lam)
        advantages = masked_whiten(raw, mask, sums=advantage_sums) if whiten else raw

    log_ratio = torch.where(valid, policy_token_logps - old, zero)
    ratio = torch.exp(log_ratio)
    high = epsilon if epsilon_high is None else epsilon_high
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1 - epsilon, 1 + high)
    policy_term = torch.maximum(unclipped, clipped)
    v = values.to(dtype)
    v_clipped = old_v + torch.clamp(v - old_v, -cliprange_value, cliprange_value)
    value_term = 0.5 * torch.maximum((v - returns).square(), (v_clipped - returns).square())
    per_token_loss = torch.where(valid, policy_term + vf_coef * value_term, zero) * mask
    count = mask.sum() if batch_tokens is None else torch.as_tensor(batch_tokens, dtype=dtype)
    per_example = per_token_loss.sum(-1) * (mask.shape[0] / count.clamp(min=1.0))

    metrics: dict[str, Tensor] = {}
    with torch.no_grad():
        if kl is not None:
            metrics["kl"] = _masked_mean(kl, mask)
        metrics["policy/clipfrac"] = _masked_mean((clipped > unclipped).to(dtype), mask)
        metrics["policy/approxkl"] = 0.5 * _masked_mean(log_ratio.square(), mask)
        metrics["value/loss"] = _masked_mean(value_term, mask)
        metrics["value/clipfrac"] = _masked_mean(
            ((v_clipped - returns).square() > (v - returns).square()).to(dtype), mask
        )
        metrics["ppo/return_mean"] = _masked_mean(returns, mask)
        metrics["ppo/advantage_mean"] = _masked_mean(raw, mask)
        metrics["ppo/reward_mean"] = (per_token * mask).sum(-1).mean()
        if kl_coef is not None:
            metrics["ppo/kl_coef"] = torch.as_tensor(coef, dtype=dtype)
    return LossOutput(per_example.mean(), per_example, metrics, {"advantage_sums": moment_sums(raw, mask)})
