"""``combo``: a weighted sum of registered losses — TRL's ``loss_type=[...]`` + ``loss_weights`` and InternVL's Mixed
Preference Optimization (``parts={"dpo": 0.8, "bco_pair": 0.2, "sft": 1.0}``, arXiv 2411.10442). Not ``mpo``, which
in this registry is Jiang et al.'s Maximum Preference Optimization.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from losses._common import HyperParameterError, LossOutput
from losses.registry import BoundLoss, Requirements, get, optional, positive, register, spec

__all__ = ["combo_loss", "combo_parts"]


def combo_parts(parts: Mapping[str, Any], beta: float | None = None) -> list[tuple[float, BoundLoss]]:
    """``parts`` -> [(weight, bound loss)].

    Each value is a weight, or a mapping with ``weight`` and that part's hyper-parameters. ``beta``, when given, is
    passed to every part that has a ``beta`` and does not set its own (TRL shares one β across loss types).
    """
    if not isinstance(parts, Mapping) or not parts:
        raise HyperParameterError(f"combo.parts must be a non-empty mapping name -> weight, got {parts!r}")
    bound = []
    for name, value in parts.items():
        if name == "combo":
            raise HyperParameterError("combo.parts cannot contain 'combo'")
        kwargs = dict(value) if isinstance(value, Mapping) else {"weight": value}
        weight = kwargs.pop("weight", None)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            raise HyperParameterError(f"combo.parts.{name}: weight must be a finite number >= 0, got {weight!r}")
        part_spec = spec(name)
        if part_spec.kind != "pair":
            raise HyperParameterError(f"combo.parts.{name}: only pairwise losses combine, '{name}' is {part_spec.kind}")
        if beta is not None and "beta" in part_spec.hparams:
            kwargs.setdefault("beta", beta)
        bound.append((float(weight), get(name, **kwargs)))
    return bound


def _check_parts(name: str, value: Any) -> None:
    combo_parts(value)


def _requires(hparams: Mapping[str, Any]) -> Requirements:
    inputs: list[str] = []
    optional: list[str] = []
    for _, part in combo_parts(hparams["parts"], hparams["beta"]):
        inputs += [n for n in part.requirements.inputs if n not in inputs]
        optional += [n for n in part.requirements.optional_inputs if n not in optional]
    return Requirements(
        inputs=tuple(inputs), optional_inputs=tuple(n for n in optional if n not in inputs), kind="pair"
    )


@register(
    "combo",
    optimum="Mixed PO: the SFT part pulls toward the chosen marginal μ·P(y≻μ)",
    paper="TRL loss_weights; Wang et al. 2024, arXiv 2411.10442 (InternVL Mixed Preference Optimization)",
    summary="Σ_k w_k · L_k",
    aggregation="each part's own",
    checks={"parts": _check_parts, "beta": optional(positive)},
    requires=_requires,
)
def combo_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    *,
    parts: Mapping[str, Any],
    beta: float | None = 0.1,
    **inputs: Tensor,
) -> LossOutput:
    """Weighted sum of losses: ``L = Σ_k w_k · mean(L_k)``; ``per_example = Σ_k w_k · per_example_k``.

    ``parts`` maps loss names to weights (or to ``{"weight": w, **hparams}``); ``beta`` is shared by every part that
    has one unless the part sets its own. Each part receives the inputs it declared. Metrics: ``loss/<part>``
    (unweighted), every part's metrics as ``<part>/<metric>``, and, unprefixed, the metrics of the first part that
    reports ``rewards/chosen`` (so dashboards keyed on ``rewards/*`` keep working).
    """
    per_example = None
    metrics: dict[str, Tensor] = {}
    headline: dict[str, Tensor] | None = None
    for weight, part in combo_parts(parts, beta):
        out = part(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps, **inputs)
        per_example = weight * out.per_example if per_example is None else per_example + weight * out.per_example
        metrics[f"loss/{part.name}"] = out.loss.detach()
        metrics.update({f"{part.name}/{key}": value for key, value in out.metrics.items()})
        if headline is None and "rewards/chosen" in out.metrics:
            headline = out.metrics
    metrics.update(headline or {})
    return LossOutput(per_example.mean(), per_example, metrics)
