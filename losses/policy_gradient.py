"""Policy-gradient losses of kind ``"group"``: ``K`` completions sampled from the policy for each of ``G`` prompts.

Inputs are ``[G, K]`` (row = prompt, column = sample): ``policy_logps`` the **summed** completion log-probs under the
policy (with grad), ``ref_logps`` the same under the reference, ``rewards`` one scalar reward per completion,
``lengths`` the completion token counts. The losses are surrogates whose *gradient* is the policy-gradient estimate;
their value is not a quantity to monitor (the ``objective/*`` metrics are).
"""

from __future__ import annotations

from torch import Tensor

from losses._common import LossError, LossOutput, MissingInputError
from losses.registry import non_negative, one_of, register, required_if

__all__ = ["rloo_loss", "kl_estimate", "leave_one_out_advantages"]

_ADVANTAGE_STD_EPS = 1e-8


def kl_estimate(log_ratio: Tensor, estimator: str) -> Tensor:
    """Per-sequence estimate of KL(π‖π_ref) from ``d = S_θ(y) − S_ref(y)`` with ``y ∼ π``.

    ``k1 = d`` (unbiased, can be negative); ``k3 = e^{−d} − 1 + d`` (unbiased and ≥ 0, lower variance when π is
    close to π_ref; J. Schulman, "Approximating KL Divergence", 2020). ``e^{−d}`` overflows for d ≲ −88 in float32.
    """
    if estimator == "k1":
        return log_ratio
    return (-log_ratio).expm1() + log_ratio


def leave_one_out_advantages(rewards: Tensor) -> Tensor:
    """``A_i = r_i − (Σ_{j≠i} r_j)/(K − 1) = K/(K−1)·(r_i − mean r)`` within each row of ``rewards`` [G, K].

    Computed as the mean of the pairwise differences ``(1/(K−1)) Σ_{j≠i} (r_i − r_j)``: exactly 0 when a group's
    rewards are all equal, exactly ±(r_1 − r_2) for K = 2, and free of the cancellation in ``r_i − mean r``.
    """
    k = rewards.shape[-1]
    return (rewards.unsqueeze(-1) - rewards.unsqueeze(-2)).sum(-1) / (k - 1)


def _check_shapes(name: str, policy_logps: Tensor, **others: Tensor | None) -> None:
    if policy_logps.dim() != 2:
        raise LossError(
            f"loss '{name}': 'policy_logps' must be [G, K] (G prompts, K samples each), "
            f"got shape {tuple(policy_logps.shape)}"
        )
    if policy_logps.shape[1] < 2:
        raise LossError(
            f"loss '{name}' needs K >= 2 samples per prompt for its leave-one-out baseline, "
            f"got 'policy_logps' of shape {tuple(policy_logps.shape)} (K = {policy_logps.shape[1]})"
        )
    for key, tensor in others.items():
        if tensor is not None and tensor.shape != policy_logps.shape:
            raise LossError(
                f"loss '{name}': '{key}' has shape {tuple(tensor.shape)} but 'policy_logps' has "
                f"{tuple(policy_logps.shape)}; every group input must be [G, K]"
            )


@register(
    "rloo",
    kind="group",
    paper="Ahmadian et al. 2024, arXiv 2402.14740 (RLOO); Kool, van Hoof, Welling 2019 (leave-one-out baseline)",
    summary="−A·S_θ(y) / Σ|y|, A = r' − mean_{j≠i} r'_j, r' = r − β·KL̂ (k samples per prompt, on-policy)",
    aggregation="sum (S_θ in the REINFORCE term); token-mean over the batch (default) or per-sequence mean",
    checks={
        "kl_coef": non_negative,
        "kl_estimator": one_of("k1", "k3"),
        "aggregation": one_of("token", "sequence"),
    },
    requires=required_if(lambda hparams: hparams["kl_coef"] > 0, ("ref_logps",)),
)
def rloo_loss(
    policy_logps: Tensor,  # [G, K] S_θ(y), summed over completion tokens, with grad
    rewards: Tensor,  # [G, K] scalar reward per completion (no gradient flows through it)
    lengths: Tensor,  # [G, K] completion token counts (clamped to >= 1)
    ref_logps: Tensor | None = None,  # [G, K] S_ref(y); needed when kl_coef > 0
    *,
    kl_coef: float = 0.05,
    kl_estimator: str = "k1",
    aggregation: str = "token",
    normalize_advantages: bool = False,
) -> LossOutput:
    """RLOO (REINFORCE Leave-One-Out): ``L = −Σ_{g,i} A_gi · S_θ(y_gi) / Σ_{g,i} |y_gi|`` with

    * ``d = stopgrad(S_θ(y) − S_ref(y))``, the sequence log-ratio, and its KL estimate ``KL̂ = d`` (``k1``) or
      ``e^{−d} − 1 + d`` (``k3``, ≥ 0); both are unbiased for KL(π‖π_ref) under samples from π;
    * the shaped reward ``r' = r − β·KL̂`` (β = ``kl_coef``; no gradient flows through the reward);
    * the leave-one-out baseline ``b_i = (Σ_j r'_j − r'_i)/(K − 1)`` within each prompt's group, and the advantage
      ``A = r' − b = K/(K−1)·(r' − mean_group r')``; with ``normalize_advantages`` A is divided by its (unbiased)
      std over the batch (+1e-8), off by default.

    Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs, Ahmadian et
    al. 2024 (arXiv 2402.14740; the whole completion is one action); the baseline is Kool, van Hoof, Welling
    2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!". Every tensor is ``[G, K]``: G prompts, K ≥ 2
    completions sampled from the current policy for each, ``S`` **summed** completion log-probs.

    **On-policy**: one gradient step per sampled batch, so the importance ratio π_θ/π_old is 1 and there is no
    clipping; ``∇L = −Σ A ∇S_θ / Σ|y|``. With ``k1`` (the paper's and TRL's choice) the expected gradient is that of
    −(E_π[r] − β·KL(π‖π_ref)). ``k3``, though unbiased for the KL's *value*, is not for its gradient when used as a
    detached reward penalty: its expected gradient is that of −(E_π[r] − β·[KL(π‖π_ref) − KL(π_ref‖π)])
    (checked exactly in tests/losses/test_tabular.py).

    ``aggregation``: ``token`` (default) divides by the batch's total completion tokens (one token mean over the
    batch); ``sequence`` averages ``−A·S_θ/|y|`` over all G·K sequences. ``per_example`` is ``[G]``, each prompt's
    share, so ``loss == per_example.mean()``.

    Metrics (TRL names): ``objective/scores`` (mean raw reward), ``objective/kl`` (mean KL̂; 0 with no reference),
    ``objective/non_score_reward`` (mean −β·KL̂), ``objective/rlhf_reward`` (mean r'), ``advantages/mean``,
    ``advantages/std``, ``logps/policy``, ``response_length``, ``frac_reward_zero_std`` (fraction of groups whose
    raw rewards are all equal: no learning signal there without the KL term).
    """
    _check_shapes("rloo", policy_logps, rewards=rewards, lengths=lengths, ref_logps=ref_logps)
    if kl_coef > 0 and ref_logps is None:
        raise MissingInputError("loss 'rloo' with kl_coef > 0 needs input(s) ref_logps")
    dtype = policy_logps.dtype
    groups = policy_logps.shape[0]
    raw = rewards.detach().to(dtype)
    token_counts = lengths.to(dtype).clamp(min=1)

    if ref_logps is None:  # kl_coef == 0: no KL term and nothing to estimate it from
        kl = raw.new_zeros(raw.shape)
    else:
        kl = kl_estimate(policy_logps.detach() - ref_logps.detach().to(dtype), kl_estimator)
    non_score = -kl_coef * kl if kl_coef else kl.new_zeros(kl.shape)  # 0·KL̂ would be NaN where k3 overflows
    shaped = raw + non_score
    advantages = leave_one_out_advantages(shaped)
    if normalize_advantages:
        advantages = advantages / (advantages.std() + _ADVANTAGE_STD_EPS)

    if aggregation == "token":  # prompt g's share of −Σ A·S / Σ|y|, so the mean over prompts is the batch value
        per_example = -(advantages * policy_logps).sum(dim=1) * (groups / token_counts.sum())
    else:
        per_example = (-advantages * policy_logps / token_counts).mean(dim=1)

    metrics = {
        "objective/scores": raw.mean(),
        "objective/kl": kl.mean(),
        "objective/non_score_reward": non_score.mean(),
        "objective/rlhf_reward": shaped.mean(),
        "advantages/mean": advantages.mean(),
        "advantages/std": advantages.std(),
        "logps/policy": policy_logps.detach().mean(),
        "response_length": lengths.to(dtype).mean(),
        "frac_reward_zero_std": (raw.amax(dim=1) == raw.amin(dim=1)).to(dtype).mean(),
    }
    return LossOutput(per_example.mean(), per_example, metrics)
