"""ALaRM's consistency-based aspect selection (Lai et al. 2024, arXiv 2403.06754; README "Rewards and ALaRM").

Two completions per prompt are sampled from the reference policy and scored with the holistic reward and every
candidate aspect; each aspect's disagreement rate with the holistic reward (``losses.alarm.disagreement_rates``)
decides which aspects are kept (``reward.select_top_k`` / ``reward.select_threshold``). Used by
``prefopt-select-rewards`` and by ``reward.select=auto`` inside ``prefopt-train``.
"""

from __future__ import annotations

import logging
from typing import Any

from losses.alarm import disagreement_rates, select_aspects

log = logging.getLogger("prefopt")

__all__ = ["select", "format_table"]


def select(reward_cfg, source, reference, scorer) -> dict[str, Any]:
    """Disagreement rate of every candidate aspect with the holistic reward on pairs of reference samples, and the
    aspects kept. ``source`` supplies the prompts and the sampler (an ``OnlineSource``); ``scorer`` an
    ``AlarmScorer``."""
    prompts = source.prompts[: int(reward_cfg.get("select_prompts", 64))]
    per_prompt = int(reward_cfg.get("select_pairs_per_prompt", 1))
    generated = source.generate(reference, prompts, 2 * per_prompt, seed=f"{source.seed}/select")
    texts, prompt_texts = generated["texts"], generated["prompts"]
    holistic = scorer.holistic(prompt_texts, texts)
    aspects = {name: reward(prompt_texts, texts) for name, reward in scorer.aspects.items()}
    lower = [name for name, reward in scorer.aspects.items() if not getattr(reward, "higher_is_better", True)]
    rates = disagreement_rates(
        holistic[0::2],
        holistic[1::2],
        {name: values[0::2] for name, values in aspects.items()},
        {name: values[1::2] for name, values in aspects.items()},
        lower_is_better=lower,
    )
    decided = holistic[0::2] != holistic[1::2]
    n_decided = decided.sum().clamp(min=1)
    tied = {name: float((decided & (v[0::2] == v[1::2])).sum() / n_decided) for name, v in aspects.items()}
    max_tied = float(reward_cfg.get("select_max_tied", 1.0))
    configured = {str(k): float(v) for k, v in (reward_cfg.get("weights") or {}).items()}
    switched_off = {name for name, weight in configured.items() if weight == 0}  # never brought back by selection
    eligible = {name: rate for name, rate in rates.items() if tied[name] <= max_tied and name not in switched_off}
    top_k, threshold = reward_cfg.get("select_top_k"), reward_cfg.get("select_threshold")
    selected = select_aspects(eligible, threshold=threshold, top_k=None if top_k is None else int(top_k))
    weights = {name: configured.get(name, 1.0) if name in selected else 0.0 for name in scorer.aspects}
    if not selected:
        log.warning(
            "reward selection kept no aspect (%s): training on the holistic reward alone",
            "none is eligible: each is switched off or tied on more than select_max_tied of the decided pairs"
            if not eligible
            else "none passes select_threshold",
        )
    return {
        "rates": rates,
        "tied": tied,
        "selected": selected,
        "weights": weights,
        "pairs": len(prompts) * per_prompt,
        "decided_pairs": int(decided.sum()),
    }


def format_table(result: dict[str, Any]) -> str:
    """The disagreement table, most consistent aspect first."""
    lines = [
        f"aspect consistency with the holistic reward ({result['decided_pairs']} of {result['pairs']} pairs decided)",
        f"{'aspect':<16}{'disagreement %':>16}{'aspect tied %':>15}  selected",
    ]
    for name in sorted(result["rates"], key=lambda n: (result["rates"][n], n)):
        rate, tied = 100 * result["rates"][name], 100 * result["tied"][name]
        lines.append(f"{name:<16}{rate:>16.1f}{tied:>15.1f}  {'yes' if name in result['selected'] else 'no'}")
    return "\n".join(lines)
