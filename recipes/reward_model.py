"""``python -m recipes.reward_model [quick=false] [out_dir=...]``: pairs -> reward model -> online training on it,
judged by the gold reward (``conf/recipe/reward_model.yaml``).

Per seed S, under ``OUT``: ``reward_model/seed=S`` (``trainer=reward``), ``learned/seed=S`` (online DPO rewarded by
that reward model through ``reward=classifier reward.model=.../final``) and ``gold/seed=S`` (the same online run
rewarded by the gold reward). Then every policy — the SFT start and both trained ones — is sampled on the eval prompts
(the online evaluation: fixed seed, KL to the SFT policy) and scored by the gold reward and by the learned one. A run
whose ``summary.json`` exists is not trained again. Writes ``OUT/reward_model.md`` and ``.csv`` (mean ± std over the
seeds) and prints the table.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

import prefopt
from prefopt.tables import markdown_table, write_records
from recipes.sweep import CONF

__all__ = ["run_chain", "evaluate_policy", "cli"]

log = logging.getLogger("prefopt.recipes")

METRICS = ("gold/reward/mean", "learned/reward/mean", "kl", "response_length")


def _overrides(cfg: DictConfig, stage: str, seed: int) -> list[str]:
    mode = cfg.quick_overrides if cfg.quick else cfg.full_overrides
    return [*cfg.common, *cfg[stage], *mode[stage], f"trainer.seed={seed}", f"cache_dir='{cfg.cache_dir}'"]


def _train(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    if (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text())
    log.info("training %s: %s", run_dir, " ".join(overrides))
    return prefopt.fit(prefopt.compose(overrides), run_dir=run_dir)


def evaluate_policy(overrides: list[str], weights: Path | None, work_dir: Path) -> dict[str, float]:
    """The online evaluation of ``prefopt-train OVERRIDES`` (its reward, its eval prompts and sampling seed, KL to
    its starting policy) applied to the policy in ``weights`` (a ``final/`` dir; None: the starting policy itself)."""
    from prefopt.build import build

    run = build(prefopt.compose([*overrides, "trainer.max_steps=1"]), work_dir)
    if weights is not None:
        run.accelerator.unwrap_model(run.policy).load_state_dict(load_file(str(weights / "model.safetensors")))
    metrics = run.evaluate(run.policy, 0)
    run.accelerator.end_training()
    return metrics


def run_chain(cfg: DictConfig) -> dict[str, Any]:
    started, out = time.time(), Path(cfg.out_dir)
    rows: list[dict[str, Any]] = []
    for seed in list(cfg.seeds_quick if cfg.quick else cfg.seeds):
        rm = _train(_overrides(cfg, "reward_model", seed), out / "reward_model" / f"seed={seed}")
        learned_reward = ["reward=classifier", f"reward.model='{rm['model_dir']}'"]
        policy = _overrides(cfg, "policy", seed)
        runs = {
            "learned": _train([*policy, *learned_reward], out / "learned" / f"seed={seed}"),
            "gold": _train([*policy, *cfg.gold_reward], out / "gold" / f"seed={seed}"),
        }
        rm_eval = [json.loads(x) for x in Path(rm["metrics"]).read_text().splitlines() if "eval/accuracy" in x]
        for name, weights in (("sft", None), *((n, Path(s["model_dir"])) for n, s in runs.items())):
            row = {"policy": name, "seed": seed, "rm_eval_accuracy_start": rm_eval[0]["eval/accuracy"]}
            row["rm_eval_accuracy_end"] = rm_eval[-1]["eval/accuracy"]
            for judge, reward in (("gold", list(cfg.gold_reward)), ("learned", learned_reward)):
                metrics = evaluate_policy([*policy, *reward], weights, out / "eval" / f"{name}-{judge}-seed={seed}")
                row[f"{judge}/reward/mean"] = metrics["reward/mean"]
                row["kl"], row["response_length"] = metrics["kl"], metrics["response_length"]
            log.info("%s seed %s: %s", name, seed, row)
            rows.append(row)
    write_records(out / "reward_model.csv", rows)
    table = _table(rows)
    (out / "reward_model.md").write_text(table + "\n")
    seconds = round(time.time() - started)
    record = {"config": OmegaConf.to_container(cfg, resolve=True), "rows": rows, "seconds": seconds}
    (out / f"recipe-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(record, indent=2))
    return {"table": table, "seconds": record["seconds"], "out_dir": str(out)}


def _table(rows: list[dict[str, Any]]) -> str:
    """Mean ± std over the seeds of each policy's metrics."""

    def cell(values: list[float]) -> str:
        mean = statistics.fmean(values)
        return f"{mean:.4g}" if len(values) == 1 else f"{mean:.4g} ± {statistics.stdev(values):.2g}"

    names = list(dict.fromkeys(row["policy"] for row in rows))
    labels = {"sft": "SFT start", "learned": "online DPO, learned reward", "gold": "online DPO, gold reward"}
    body = []
    for name in names:
        mine = [row for row in rows if row["policy"] == name]
        body.append([labels[name], len(mine), *(cell([row[m] for row in mine]) for m in METRICS)])
    header = ["policy", "seeds", "gold reward", "learned reward", "KL to SFT", "response length"]
    rm = [(row["rm_eval_accuracy_start"], row["rm_eval_accuracy_end"]) for row in rows if row["policy"] == "sft"]
    accuracy = ", ".join(f"{a:.3f} -> {b:.3f}" for a, b in rm)
    return f"{markdown_table(header, body)}\n\nreward model eval accuracy (start -> end, per seed): {accuracy}"


def cli() -> None:
    @hydra.main(config_path=CONF, config_name="reward_model", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        logging.getLogger("prefopt").setLevel(logging.INFO)
        result = run_chain(cfg)
        print(f"{result['table']}\nrecipe reward_model: {result['seconds']} s; table and CSV in {result['out_dir']}")

    main()


if __name__ == "__main__":
    cli()
