"""UPO — Unified Preference Optimization (Badrinath, Agarwal, Xu; arXiv 2405.17956, v1 titled "Hybrid Preference
Optimization").

Status: **reconstruction, not verified against the paper's text.** Read: the v3 abstract, the first pages of v1 and
a reproducibility page quoting the paper. Verified: the objective is a preference objective (DPO/KTO MLE) plus an
*advantage-weighted auxiliary objective* that maximises arbitrary non-preference "designer" rewards (toxicity,
reading level) by offline RL; the auxiliary term is a plain weighted maximum-likelihood objective (no sampling, no
loss clipping, no importance sampling, no bootstrapping) needing no extra data. Not verified: the exact advantage,
baseline, temperature, clipping and normalisation, and Algorithm 1. Every one of those is a knob here.

Derivation (arXiv 2405.17956). With total reward ``r = r_pref + r_aux``, ``r_aux = Σ_k c_k r_k``, the
KL-regularised optimum is ``π* ∝ π_ref exp((r_pref + r_aux)/β)``. The preference part is fitted by the usual pairwise
MLE on the implicit reward; the auxiliary part by advantage-weighted regression on the same offline completions (an
M-projection onto the policy class, i.e. a weighted NLL):

    L_UPO = L_pref + α · mean_{y ∈ {y_w, y_l}} [ −w(y) · S̄_θ(y) ],
    w = stopgrad(min(exp(A/τ), w_max)),  A = r_aux(y) − b(x),

with ``b`` the pair mean of r_aux (default), the pair's τ_e-expectile, or the batch mean, and ``S̄`` the token-mean
(default) or summed log-prob.

What the knobs do (measured on prefopt's recipes and the exact testbed; README "The losses"):

* **α couples with β.** The preference term's gradient is of order β per pair while the auxiliary NLL pulls on both
  completions, the rejected one included: at α = 1 (with DPO, β = 0.1) the pull towards the data dominates, the
  likelihood of *rejected* texts rises (log-ratio +1.66 against DPO's −5.43) and the gold reward falls from 0.74 to
  0.38 on the sentiment recipe; α = 0.1 keeps the preference term alive (0.70). Default α = 0.1; raise α and β
  together to keep their ratio.
* **The pair-mean baseline doubles the temperature.** With b = (r_w + r_l)/2 the weight of y_w is
  exp((r_w − r_l)/(2τ)): on data drawn from the reference the auxiliary term's fixed point is π_ref·exp(a/(2τ)), not
  π_ref·exp(a/τ). ``pair_expectile`` with τ_e = 0.5 is the same baseline; other τ_e move b towards the better
  (τ_e → 1) or the worse (τ_e → 0) completion of the pair, the per-pair form of the expectile value baseline.
* **Reward scale.** ``aux_weights`` are normalised to sum to 1, so adding a reward does not change the scale of
  r_aux (and so the effective temperature); [1, 1] is [0.5, 0.5].
* **Token-mean S̄** (``aux_length_normalize``, default) weighs each completion's tokens by w/|y|: short completions
  get more weight per token, a length penalty of its own (readability 79 vs 62 and 16 vs 19 tokens against the
  summed form on the multiobjective recipe). ``false`` uses summed log-probs (then α acts ~|y| times stronger).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from losses._common import HyperParameterError, LossError, LossOutput, token_mean
from losses.registry import (
    LENGTH_INPUTS,
    Requirements,
    get,
    in_range,
    non_negative,
    one_of,
    positive,
    register,
    spec,
)

__all__ = ["upo_loss"]

_AUX = ("aux_rewards_chosen", "aux_rewards_rejected")
_VALUE_BASELINES = ("prompt_expectile", "value_head")  # b = aux_values, a value V(x) of the pair's prompt


def _check_base(name: str, value: Any) -> None:
    base = spec(value) if isinstance(value, str) else None
    if base is None or base.kind not in ("pair", "unpaired") or value == "upo":
        raise HyperParameterError(
            f"{name} must name a registered pairwise loss other than 'upo', got {value!r} (or an unpaired one)"
        )


def _base_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The base loss's hyper-parameters: ``base_kwargs``, plus UPO's ``beta`` when the base has a ``beta``."""
    kwargs = dict(hparams["base_kwargs"] or {})
    if "beta" in spec(hparams["base"]).hparams:
        kwargs.setdefault("beta", hparams["beta"])
    return kwargs


def _requires(hparams: Mapping[str, Any]) -> Requirements:
    base = get(hparams["base"], **_base_hparams(hparams)).requirements
    if base.kind == "unpaired":  # per row: its auxiliary rewards, V(x) of its prompt unless the batch mean, |y|
        inputs = [*base.inputs, "aux_rewards"]
        inputs += [] if hparams["baseline"] == "batch_mean" else ["aux_values"]
        inputs += ["lengths"] if hparams["aux_length_normalize"] else []
        optional = tuple(n for n in base.optional_inputs if n not in inputs)
        return Requirements(inputs=tuple(inputs), optional_inputs=optional, kind="unpaired")
    inputs = [*base.inputs, *_AUX]
    if hparams["baseline"] in _VALUE_BASELINES:
        inputs.append("aux_values")
    if hparams["aux_length_normalize"]:
        inputs += [n for n in LENGTH_INPUTS if n not in inputs]
    optional = tuple(n for n in base.optional_inputs if n not in inputs)
    return Requirements(inputs=tuple(inputs), optional_inputs=optional, kind="pair")


def _combined(rewards: Tensor, aux_weights: list[float] | None, name: str) -> Tensor:
    """[B] or [B, K] auxiliary rewards -> [B] ``Σ_k c_k r_k`` with the weights normalised to Σ_k c_k = 1 (equal
    weights when ``aux_weights`` is None)."""
    if rewards.dim() == 1:
        return rewards
    if rewards.dim() != 2:
        raise LossError(f"loss 'upo': '{name}' must be [B] or [B, K], got shape {tuple(rewards.shape)}")
    weights = torch.ones(rewards.shape[1]) if aux_weights is None else torch.as_tensor(list(aux_weights))
    if weights.numel() != rewards.shape[1]:
        raise LossError(f"loss 'upo': aux_weights has {weights.numel()} entries but '{name}' has K={rewards.shape[1]}")
    weights = weights.to(rewards)
    return rewards @ (weights / weights.sum())


def _check_aux_weights(name: str, value: Any) -> None:
    if value is None:
        return
    values = list(value) if isinstance(value, (list, tuple)) else None
    if not values or any(not isinstance(v, (int, float)) or v < 0 for v in values) or not sum(values) > 0:
        raise HyperParameterError(f"{name} must be null or a list of weights >= 0 with a positive sum, got {value!r}")


@register(
    "upo",
    optimum="with zero auxiliary rewards every weight is 1, so + α·NLL(both completions) pulls toward the "
    "pair marginal ∝ μ(y)(1 − μ(y))",
    paper="Badrinath, Agarwal, Xu 2024, arXiv 2405.17956 (UPO/HPO; auxiliary term reconstructed, UNVERIFIED)",
    summary="L_base + α·mean(−w·S̄), w = min(exp((r_aux − b)/τ), w_max), detached",
    aggregation="base loss's; token-mean S̄ for the auxiliary term (aux_length_normalize)",
    checks={
        "base": _check_base,
        "beta": positive,
        "alpha": non_negative,
        "temperature": positive,
        "weight_clip": positive,
        "baseline": one_of("pair_mean", "pair_expectile", *_VALUE_BASELINES, "batch_mean"),
        "expectile": in_range(0.0, 1.0, low_open=True, high_open=True),
        "aux_weights": _check_aux_weights,
    },
    requires=_requires,
)
def upo_loss(
    policy_chosen_logps: Tensor | None = None,  # [B] (a pairwise base; required then, see _requires)
    policy_rejected_logps: Tensor | None = None,  # [B]
    aux_rewards_chosen: Tensor | None = None,  # [B] or [B, K] auxiliary (designer) rewards of y_w, computed once
    aux_rewards_rejected: Tensor | None = None,  # [B] or [B, K] of y_l
    *,
    base: str = "dpo",
    beta: float = 0.1,
    base_kwargs: Mapping[str, Any] | None = None,
    alpha: float = 0.1,
    temperature: float = 1.0,
    weight_clip: float = 20.0,
    baseline: str = "pair_mean",
    expectile: float = 0.5,
    aux_weights: list[float] | None = None,
    aux_length_normalize: bool = True,
    self_normalize: bool = False,
    **inputs: Tensor,
) -> LossOutput:
    """UPO (auxiliary term reconstructed, UNVERIFIED): ``L = L_base + α · mean_{y∈{y_w,y_l}} [−w(y) S̄_θ(y)]``,
    ``w = stopgrad(min(exp((r_aux(y) − b)/τ), w_max))``, ``r_aux = Σ_k c_k r_k``.

    Unified Preference Optimization, Badrinath et al. (arXiv 2405.17956); derivation and status in the module
    docstring. ``base`` is any registered pairwise loss, or an unpaired one (``kto``, ``apo_zero_unpaired``: the
    auxiliary term per row, see ``_upo_unpaired``) (``dpo`` by default; ``beta`` is passed to it, other
    hyper-parameters through ``base_kwargs``); the remaining ``inputs`` (reference log-probs, lengths, its extras)
    go to it too, so UPO over a reference-free base needs no reference.

    * ``alpha`` α (0.1): the auxiliary weight; it couples with the base's β (module docstring);
    * baselines ``b``: ``pair_mean`` (mean r_aux of the pair, default), ``pair_expectile`` (the pair's ``expectile``
      τ_e: τ_e·max + (1 − τ_e)·min; 0.5 = ``pair_mean``), ``value_head`` and ``prompt_expectile`` (``aux_values``
      [B]: a value V(x) of the pair's prompt fit by expectile regression at τ_e on the training completions — the
      paper's value-network option; the trainer's provider fits a small head on the initial policy's prompt
      features (``value_head``) or the exact per-prompt expectile (``prompt_expectile``, for prompts that recur)),
      or ``batch_mean`` (over all 2B completions); the pair baselines double the effective temperature (module
      docstring);
    * ``aux_weights`` c_k, normalised to sum to 1 (null: equal);
    * ``temperature`` τ (1.0; spec suggests τ = β, which with z-scored rewards clips most weights at w_max),
      ``weight_clip`` w_max (20), ``self_normalize`` divides the weights by their batch mean;
    * ``S̄`` is the token-mean log-prob when ``aux_length_normalize`` (default), else the summed one.

    Metrics: the base's, plus ``loss/preference``, ``aux/weighted_nll``, ``aux/reward_{chosen,rejected}_mean``,
    ``aux/<k>/mean`` per component, ``aux/advantage_{mean,std}``, ``aux/weight_{mean,max}``, ``aux/weight_ess``
    ((Σw)²/Σw² over the 2B completions), ``aux/frac_clipped``.
    """
    aux_values = inputs.pop("aux_values", None)  # [B] V(x): prompt_expectile's value estimate, not the base's input
    hparams = {"base": base, "beta": beta, "base_kwargs": base_kwargs}
    if spec(base).kind == "unpaired":
        return _upo_unpaired(
            hparams, inputs, aux_values, alpha=alpha, temperature=temperature, weight_clip=weight_clip,
            baseline=baseline, aux_weights=aux_weights, aux_length_normalize=aux_length_normalize,
            self_normalize=self_normalize,
        )  # fmt: skip
    base_out = get(base, **_base_hparams(hparams))(
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps, **inputs
    )
    dtype = policy_chosen_logps.dtype
    rewards = torch.stack(
        [
            _combined(aux_rewards_chosen.to(dtype), aux_weights, "aux_rewards_chosen"),
            _combined(aux_rewards_rejected.to(dtype), aux_weights, "aux_rewards_rejected"),
        ]
    )  # [2, B]: row 0 chosen, row 1 rejected
    with torch.no_grad():
        if baseline == "pair_mean":
            centre = rewards.mean(dim=0, keepdim=True)
        elif baseline == "pair_expectile":  # τ_e-expectile of the pair {r_w, r_l}: τ_e·max + (1 − τ_e)·min
            high, low = rewards.max(dim=0, keepdim=True).values, rewards.min(dim=0, keepdim=True).values
            centre = expectile * high + (1 - expectile) * low
        elif baseline in _VALUE_BASELINES:  # a value V(x) fit by expectile regression, supplied per pair
            if aux_values is None:
                raise LossError(f"loss 'upo' with baseline={baseline!r} needs input aux_values")
            centre = aux_values.to(dtype).reshape(1, -1)
        else:
            centre = rewards.mean()
        advantages = rewards - centre
        log_weights = advantages / temperature
        clipped = log_weights > math.log(weight_clip)
        weights = torch.exp(log_weights.clamp(max=math.log(weight_clip)))
        if self_normalize:
            weights = weights / weights.mean()
    logps = torch.stack([policy_chosen_logps, policy_rejected_logps])  # [2, B]
    if aux_length_normalize:
        logps = token_mean(logps, torch.stack([inputs["chosen_lengths"], inputs["rejected_lengths"]]))
    aux_per_pair = -(weights * logps).mean(dim=0)  # [B] mean over the pair's two completions
    per_example = base_out.per_example + alpha * aux_per_pair

    metrics = dict(base_out.metrics)
    metrics["loss/preference"] = base_out.loss.detach()
    metrics["aux/weighted_nll"] = aux_per_pair.detach().mean()
    metrics["aux/reward_chosen_mean"] = rewards[0].mean()
    metrics["aux/reward_rejected_mean"] = rewards[1].mean()
    if aux_rewards_chosen.dim() == 2:
        components = torch.cat([aux_rewards_chosen, aux_rewards_rejected]).to(dtype).mean(dim=0)
        metrics.update({f"aux/{k}/mean": value for k, value in enumerate(components)})
    metrics.update(_weight_metrics(advantages, weights, clipped, dtype))
    return LossOutput(per_example.mean(), per_example, metrics)


def _weights(advantages: Tensor, temperature: float, weight_clip: float, self_normalize: bool) -> tuple[Tensor, Tensor]:
    """``(w, clipped)``: ``w = min(exp(A/τ), w_max)`` (divided by its mean when ``self_normalize``), no gradient."""
    log_weights = advantages / temperature
    clipped = log_weights > math.log(weight_clip)
    weights = torch.exp(log_weights.clamp(max=math.log(weight_clip)))
    return (weights / weights.mean() if self_normalize else weights), clipped


def _upo_unpaired(
    hparams: Mapping[str, Any],
    inputs: dict[str, Tensor],
    aux_values: Tensor | None,
    *,
    alpha: float,
    temperature: float,
    weight_clip: float,
    baseline: str,
    aux_weights: list[float] | None,
    aux_length_normalize: bool,
    self_normalize: bool,
) -> LossOutput:
    """UPO over an unpaired base (``kto``, ``apo_zero_unpaired``; the paper's v1 pairs its auxiliary term with DPO or
    KTO): ``L = L_base + α · mean_i [−w_i S̄_θ(x_i, y_i)]`` over the N rows, ``w_i = min(exp((r_aux(y_i) − b_i)/τ),
    w_max)``, detached. Inputs: the base's (``policy_logps [N]``, ``ref_logps``, ``labels``, KTO's KL pairs ...),
    ``aux_rewards [N]`` or ``[N, K]``, ``lengths [N]`` (token-mean S̄) and ``aux_values [N]``, the value V(x) of
    each row's prompt.

    The rows of a pair are not together in an unpaired batch, so the baselines are per prompt: ``pair_mean`` is the
    mean auxiliary reward of the prompt's training completions, ``pair_expectile``, ``prompt_expectile`` and
    ``value_head`` its ``expectile`` τ_e (the trainer's provider fits them; on pairs split by ``data.unpair`` and a
    prompt with one pair they equal the pairwise baselines: the τ_e-expectile of two values is τ_e·max + (1−τ_e)·min);
    ``batch_mean`` is the mean over the call's rows."""
    aux_rewards = inputs.pop("aux_rewards")
    base_out = get(hparams["base"], **_base_hparams(hparams))(**inputs)
    policy_logps, labels = inputs["policy_logps"], inputs["labels"].to(torch.bool)
    dtype = policy_logps.dtype
    rewards = _combined(aux_rewards.to(dtype), aux_weights, "aux_rewards")  # [N]
    with torch.no_grad():
        if baseline == "batch_mean":
            centre = rewards.mean()
        elif aux_values is None:
            raise LossError(f"loss 'upo' with baseline={baseline!r} over an unpaired base needs input aux_values")
        else:
            centre = aux_values.to(dtype)
        advantages = rewards - centre
        weights, clipped = _weights(advantages, temperature, weight_clip, self_normalize)
    logps = token_mean(policy_logps, inputs["lengths"]) if aux_length_normalize else policy_logps
    aux_per_row = -(weights * logps)  # [N]
    per_example = base_out.per_example + alpha * aux_per_row

    metrics = dict(base_out.metrics)
    metrics["loss/preference"] = base_out.loss.detach()
    metrics["aux/weighted_nll"] = aux_per_row.detach().mean()
    for side, rows in (("chosen", labels), ("rejected", ~labels)):  # desirable / undesirable rows, when present
        if bool(rows.any()):
            metrics[f"aux/reward_{side}_mean"] = rewards[rows].mean()
    if aux_rewards.dim() == 2:
        metrics.update({f"aux/{k}/mean": value for k, value in enumerate(aux_rewards.to(dtype).mean(dim=0))})
    metrics.update(_weight_metrics(advantages, weights, clipped, dtype))
    return LossOutput(per_example.mean(), per_example, metrics)


def _weight_metrics(advantages: Tensor, weights: Tensor, clipped: Tensor, dtype) -> dict[str, Tensor]:
    """The advantage weights' statistics, paired and unpaired alike: advantage mean / std, weight mean / max, the
    weights' effective sample size (Σw)²/Σw² and the fraction clipped."""
    return {
        "aux/advantage_mean": advantages.mean(),
        "aux/advantage_std": advantages.std(unbiased=False),
        "aux/weight_mean": weights.mean(),
        "aux/weight_max": weights.max(),
        "aux/weight_ess": weights.sum() ** 2 / (weights**2).sum(),
        "aux/frac_clipped": clipped.to(dtype).mean(),
    }
