"""ALaRM hierarchical rewards and consistency-based reward selection (Lai et al. 2024, arXiv 2403.06754).

The reward arithmetic and the selection statistic equal the authors' released code (halfrot/ALaRM @ f5b3cf8d:
long-form-QA/train_ppo.py, MT/train_ppo.py, eval/eval_compare.py). That is the reward, not the training signal behind
the paper's numbers: their PPO trainer left-pads each response's token rewards while responses are right-padded, so
for responses shorter than the batch's longest the aspect rewards land on the wrong tokens and the last-token
holistic term on padding. Here every response's values stay aligned to its own tokens (its last real token carries
the holistic term). Pure tensor functions; the online trainer composes them with reward models.

Hierarchical reward of one response with T tokens (token-level vector R, returned as R and its sum):

    z = (h − μ_h) / σ_h                                   # holistic score, z-normalised with fixed statistics
    too short:   R_t = 0 (t < T),   R_T = W_h · (−10)
    z < θ:       R_t = 0 (t < T),   R_T = W_h · z         # level 1: holistic only
    z ≥ θ:       R_t = a_t,          R_T = a_T + W_h · z  # level 2: holistic + aspects

``a_t = Σ_k w_k · shape(a^k_t)`` over positions where aspect k *assigned* a value (sentence ends, error spans, the
last token...); with sigmoid shaping ``shape(v) = σ(v)``, so every assigned aspect value becomes positive and a
response that passed the gate can only gain from the aspect layer. Unassigned positions stay exactly 0 (an assigned
raw 0 becomes σ(0) = 0.5), hence the separate ``assigned`` masks. Baseline modes from the same code:
``holistic_only`` (always level 1), ``aspect_only`` (R = a), ``weighted_sum`` (always level 2, no gate). The
threshold compares the z-score *before* the holistic weight. Code defaults: QA θ = 0.6, W_h = 5,
μ_h = −4.896130742253484, σ_h = 3.0595760500526468; MT θ = 0.5, W_h = 3, μ_h = −2.34417221913525,
σ_h = 2.946283030347152; sigmoid shaping on in the README runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from losses._common import HyperParameterError, LossError

__all__ = ["MODES", "AlarmReward", "alarm_reward", "shaped_aspects", "disagreement_rates", "select_aspects"]

MODES = ("hierarchical", "holistic_only", "aspect_only", "weighted_sum")


@dataclass
class AlarmReward:
    token_rewards: Tensor  # [B, T] R_t, zero past each response's length
    sequence_rewards: Tensor  # [B] Σ_t R_t (the return with no KL term)
    holistic_z: Tensor  # [B]
    passed_gate: Tensor  # [B] bool: the aspect layer was added
    metrics: dict[str, Tensor] = field(default_factory=dict)


def shaped_aspects(
    aspects: Mapping[str, Tensor],  # name -> [B, T] raw aspect values
    assigned: Mapping[str, Tensor],  # name -> [B, T] bool: where that aspect assigned a value
    weights: Mapping[str, float],  # name -> w_k; aspects absent here or with weight 0 contribute nothing
    *,
    sigmoid_shaping: bool = True,
) -> Tensor:
    """``a_t = Σ_k w_k · shape(a^k_t)`` on assigned positions, 0 elsewhere; [B, T]."""
    unknown = sorted(set(weights) - set(aspects))
    if unknown:
        raise LossError(f"alarm: aspect weight(s) for {', '.join(unknown)} but no such aspect values were given")
    total = None
    for name, weight in weights.items():
        values, mask = aspects[name], assigned[name].bool()
        if values.shape != mask.shape:
            raise LossError(f"alarm: aspect '{name}' values {tuple(values.shape)} and mask {tuple(mask.shape)} differ")
        shaped = torch.sigmoid(values) if sigmoid_shaping else values
        term = weight * torch.where(mask, shaped, torch.zeros_like(shaped))
        total = term if total is None else total + term
    if total is None:
        raise LossError("alarm: no aspect weights given")
    return total


def alarm_reward(
    holistic: Tensor,  # [B] raw holistic reward h(x, y)
    aspects: Mapping[str, Tensor],  # name -> [B, T] raw aspect values, responses left-aligned
    assigned: Mapping[str, Tensor],  # name -> [B, T] bool
    response_lengths: Tensor,  # [B] tokens per response (>= 1); the last token is at length − 1
    *,
    aspect_weights: Mapping[str, float],
    holistic_mean: float,
    holistic_std: float,
    threshold: float,
    holistic_weight: float,
    sigmoid_shaping: bool = True,
    mode: str = "hierarchical",
    too_short: Tensor | None = None,  # [B] bool
    too_short_value: float = -10.0,
) -> AlarmReward:
    """The hierarchical reward of the module docstring, batched: token-level ``R`` [B, T] and its sum [B].

    A too-short response scores ``W_h · too_short_value`` on its last token in every mode (QA: 5·(−10) = −50;
    MT: 3·(−10) = −30). Metrics: ``alarm/holistic_z_mean``, ``alarm/frac_above_threshold`` (z ≥ θ, whatever the
    mode), ``alarm/return_mean``, ``alarm/too_short_frac``, ``alarm/response_length_mean`` and
    ``alarm/aspect/<name>`` (mean raw assigned value: a factuality rate, an error rate ...).
    """
    if mode not in MODES:
        raise HyperParameterError(f"alarm.mode must be one of {list(MODES)}, got {mode!r}")
    if not holistic_std > 0:
        raise HyperParameterError(f"alarm.holistic_std must be > 0, got {holistic_std!r}")
    aspect = shaped_aspects(aspects, assigned, aspect_weights, sigmoid_shaping=sigmoid_shaping)
    batch, length = aspect.shape
    lengths = response_lengths.to(device=aspect.device, dtype=torch.long)
    if lengths.shape != (batch,) or bool((lengths < 1).any()) or bool((lengths > length).any()):
        raise LossError(f"alarm: response_lengths must be [B] in [1, {length}], got {response_lengths.tolist()}")
    inside = torch.arange(length, device=aspect.device) < lengths[:, None]  # [B, T]
    z = (holistic.to(aspect.dtype) - holistic_mean) / holistic_std
    above = z >= threshold
    passed = {"hierarchical": above, "holistic_only": torch.zeros_like(above)}.get(mode, torch.ones_like(above))
    rewards = torch.where(passed[:, None] & inside, aspect, torch.zeros_like(aspect))
    last = torch.nn.functional.one_hot(lengths - 1, length).to(aspect.dtype)  # [B, T]
    holistic_term = torch.zeros_like(z) if mode == "aspect_only" else holistic_weight * z
    rewards = rewards + last * holistic_term[:, None]
    if too_short is not None:
        short = too_short.to(device=aspect.device, dtype=torch.bool)
        rewards = torch.where(short[:, None], last * (holistic_weight * too_short_value), rewards)
        passed = passed & ~short
    returns = rewards.sum(dim=1)

    metrics = {
        "alarm/holistic_z_mean": z.mean(),
        "alarm/frac_above_threshold": above.to(z.dtype).mean(),
        "alarm/return_mean": returns.mean(),
        "alarm/too_short_frac": (too_short.to(z.dtype).mean() if too_short is not None else z.new_zeros(())),
        "alarm/response_length_mean": lengths.to(z.dtype).mean(),
    }
    for name in aspect_weights:
        mask = assigned[name].bool() & inside
        count = mask.sum()
        values = aspects[name].to(z.dtype)
        metrics[f"alarm/aspect/{name}"] = (values * mask).sum() / count.clamp(min=1)
    return AlarmReward(rewards, returns, z, passed, metrics)


def disagreement_rates(
    holistic_a: Tensor,  # [N] holistic reward of system A's output per prompt
    holistic_b: Tensor,  # [N] of system B's output for the same prompts
    aspects_a: Mapping[str, Tensor],  # name -> [N] aspect metric of A's outputs
    aspects_b: Mapping[str, Tensor],  # name -> [N]
    *,
    lower_is_better: Iterable[str] = (),
    tie_tolerance: float = 0.0,
) -> dict[str, float]:
    """Each aspect's disagreement rate with the holistic reward over paired outputs (ALaRM eval_compare.py):

        rate(k) = #{i : holistic not tied, aspect not tied, sign(Δaspect_i) ≠ sign(Δholistic_i)}
                  / #{i : holistic not tied}

    with ``Δ = A − B`` and the aspect's sign flipped when lower is better (error counts). A difference with
    ``|Δ| <= tie_tolerance`` is a tie. Returned as a fraction (the released script prints it ×100).
    """
    holistic_diff = (holistic_a - holistic_b).double()
    decided = holistic_diff.abs() > tie_tolerance
    if not bool(decided.any()):
        raise LossError("alarm: every holistic comparison is tied; no disagreement rate can be computed")
    flipped = set(lower_is_better)
    unknown = sorted(flipped - set(aspects_a))
    if unknown:
        raise LossError(f"alarm: lower_is_better names unknown aspect(s) {', '.join(unknown)}")
    rates = {}
    for name in aspects_a:
        diff = (aspects_a[name] - aspects_b[name]).double()
        diff = -diff if name in flipped else diff
        disagree = decided & (diff.abs() > tie_tolerance) & (torch.sign(diff) != torch.sign(holistic_diff))
        rates[name] = int(disagree.sum()) / int(decided.sum())
    return rates


def select_aspects(
    rates: Mapping[str, float], *, threshold: float | None = None, top_k: int | None = None
) -> list[str]:
    """Keep the aspects most consistent with the holistic reward: those with ``rate < threshold``, and/or the
    ``top_k`` lowest rates (ties broken by name). Ordered from most to least consistent."""
    if threshold is None and top_k is None:
        raise HyperParameterError("select_aspects needs a threshold, a top_k, or both")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise HyperParameterError(f"select_aspects top_k must be a positive integer, got {top_k!r}")
    ranked = sorted(rates, key=lambda name: (rates[name], name))
    if threshold is not None:
        ranked = [name for name in ranked if rates[name] < threshold]
    return ranked[:top_k] if top_k is not None else ranked
