"""``prefopt-select-rewards``: ALaRM's consistency-based aspect selection (spec §6.5), as a Hydra command.

Samples two completions per prompt from the reference policy (the model of ``model=``, warm-started as configured),
scores both with the holistic reward and every candidate aspect of ``reward=alarm``, and computes each aspect's
disagreement rate with the holistic reward (``losses.alarm.disagreement_rates``). The most consistent aspects are kept
(``reward.select_top_k`` / ``reward.select_threshold``); the table is printed and the selected configuration written to
``OUT/reward/alarm_selected.yaml``, which ``prefopt-train`` uses directly:

    prefopt-select-rewards out_dir=outputs/selection
    prefopt-train trainer=online --config-dir outputs/selection reward=alarm_selected

``reward.select=auto`` runs the same selection inside ``prefopt-train`` before training.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from losses.alarm import disagreement_rates, select_aspects
from prefopt.train import CONF_DIR, USER_ERRORS, compose_config

__all__ = ["select", "format_table", "main", "cli"]

log = logging.getLogger("prefopt")


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
    eligible = {name: rate for name, rate in rates.items() if tied[name] <= max_tied}
    top_k, threshold = reward_cfg.get("select_top_k"), reward_cfg.get("select_threshold")
    selected = select_aspects(eligible, threshold=threshold, top_k=None if top_k is None else int(top_k))
    configured = {str(k): float(v) for k, v in (reward_cfg.get("weights") or {}).items()}
    weights = {name: (configured.get(name) or 1.0) if name in selected else 0.0 for name in scorer.aspects}
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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build the reference policy, prompts and scorer from ``cfg``; select; write ``OUT/reward/alarm_selected.yaml``
    and ``OUT/selection.json``. Returns the result with the written paths."""
    from accelerate.utils import set_seed

    from prefopt import models, synthetic
    from prefopt.dataset import prepare_data
    from prefopt.errors import ConfigError
    from prefopt.scoring import AlarmScorer, build_scorer
    from prefopt.sources import OnlineSource, unique_prompts
    from prefopt.warm_start import warm_start

    scorer = build_scorer(cfg.reward)
    if not isinstance(scorer, AlarmScorer):
        raise ConfigError("prefopt-select-rewards selects among the aspects of reward=alarm (needs a holistic reward)")
    set_seed(cfg.trainer.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.trainer.cpu else "cpu")
    cache_dir = Path(cfg.cache_dir).expanduser()
    tokenizer = models.build_tokenizer(cfg.model, cache_dir, corpus=synthetic.default_corpus)
    reference = models.build_model(cfg.model, tokenizer).to(device)
    fingerprint = models.model_fingerprint(cfg.model, reference)
    warm_start(reference, tokenizer, cfg.model.get("sft"), fingerprint=fingerprint, cache_dir=cache_dir, device=device)
    data = prepare_data(cfg.data, tokenizer)
    source = OnlineSource(
        unique_prompts(data.train),
        [],
        tokenizer=tokenizer,
        scorer=scorer.to(device),
        reference=None,
        kind="pair",
        carry_reference=False,
        cfg=cfg.trainer.online,
        batch_size=1,
        micro=1,
        rank=0,
        world=1,
        seed=cfg.trainer.seed,
        device=device,
    )
    result = select(cfg.reward, source, reference, scorer)
    out_dir = Path(cfg.out_dir)
    (out_dir / "reward").mkdir(parents=True, exist_ok=True)
    selected_cfg = OmegaConf.to_container(cfg.reward, resolve=True)
    selected_cfg.update(weights=result["weights"], select="none")
    selected_path = out_dir / "reward" / "alarm_selected.yaml"
    header = f"# prefopt-select-rewards: kept {result['selected']}; disagreement rates {result['rates']}\n"
    selected_path.write_text(header + OmegaConf.to_yaml(OmegaConf.create(selected_cfg)))
    (out_dir / "selection.json").write_text(json.dumps(result, indent=2))
    return {**result, "config": str(selected_path), "out_dir": str(out_dir)}


@hydra.main(config_path=CONF_DIR, config_name="select_rewards", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        result = run(cfg)
    except USER_ERRORS as error:
        print(f"prefopt-select-rewards: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(format_table(result))
    print(f"selected aspects written to {result['config']}; train with:")
    print(f"  prefopt-train trainer=online --config-dir {Path(result['out_dir']).resolve()} reward=alarm_selected")


def cli() -> None:
    """Console entry point; config errors print one line and exit 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        compose_config([a for a in sys.argv[1:] if not a.startswith("-")], config_name="select_rewards")
    except (HydraException, OmegaConfBaseException) as error:
        message = " ".join(str(error).split("Config search path")[0].split())
        print(f"prefopt-select-rewards: error: {message}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
