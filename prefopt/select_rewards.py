"""``prefopt-select-rewards``: ALaRM's consistency-based aspect selection (``prefopt.selection``), as a Hydra command.

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
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from prefopt.build import build_policy, read_settings
from prefopt.config import CONF_DIR, ConfigError, check_overrides, exit_on_user_error, to_yaml
from prefopt.scoring import AlarmScorer, build_scorer
from prefopt.selection import format_table, select
from prefopt.sources import OnlineSource, unique_prompts

__all__ = ["run", "main", "cli"]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build the reference policy (as ``prefopt-train`` builds its starting policy), prompts and scorer from
    ``cfg``; select; write ``OUT/reward/alarm_selected.yaml`` and ``OUT/selection.json``. Returns the result with
    the written paths."""
    from accelerate.utils import set_seed

    settings = read_settings(cfg)
    scorer = build_scorer(settings.reward)
    if not isinstance(scorer, AlarmScorer):
        raise ConfigError("prefopt-select-rewards selects among the aspects of reward=alarm (needs a holistic reward)")
    set_seed(settings.trainer.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not settings.trainer.cpu else "cpu")
    start = build_policy(settings, device)
    source = OnlineSource(
        unique_prompts(start.data.train),
        [],
        tokenizer=start.tokenizer,
        scorer=scorer.to(device),
        reference=None,
        kind="pair",
        settings=settings.trainer.online,
        batch_size=1,
        micro_batch_size=1,
        rank=0,
        world=1,
        seed=settings.trainer.seed,
        device=device,
    )
    result = select(settings.reward, source, start.model, scorer)
    out_dir = Path(cfg.out_dir)
    (out_dir / "reward").mkdir(parents=True, exist_ok=True)
    selected_cfg = dict(settings.reward)
    selected_cfg.update(weights=result["weights"], select="none")
    selected_path = out_dir / "reward" / "alarm_selected.yaml"
    header = f"# prefopt-select-rewards: kept {result['selected']}; disagreement rates {result['rates']}\n"
    selected_path.write_text(header + to_yaml(selected_cfg))
    (out_dir / "selection.json").write_text(json.dumps(result, indent=2))
    return {**result, "config": str(selected_path), "out_dir": str(out_dir)}


@hydra.main(config_path=CONF_DIR, config_name="select_rewards", version_base="1.3")
def main(cfg: DictConfig) -> None:
    result = exit_on_user_error("prefopt-select-rewards", lambda: run(cfg))
    print(format_table(result))
    print(f"selected aspects written to {result['config']}; train with:")
    print(f"  prefopt-train trainer=online --config-dir {Path(result['out_dir']).resolve()} reward=alarm_selected")


def cli() -> None:
    """Console entry point; config errors print one line and exit 2."""
    overrides = [a for a in sys.argv[1:] if not a.startswith("-")]
    check_overrides("prefopt-select-rewards", [overrides], config_name="select_rewards")
    main()


if __name__ == "__main__":
    cli()
