"""A recipe = methods x beta values x seeds of ``prefopt-train``, then ``prefopt-compare`` over the runs.

A recipe config (``conf/recipe/NAME.yaml``) lists the methods as override lists, the beta grid (which
hyper-parameter beta is for each method, and ``method_betas`` for a method with its own grid in both modes), the
seeds, the overrides common to every run and those of the ``quick`` or full mode. Runs go to
``OUT/METHOD/beta=B/seed=S``; a run whose ``summary.json`` exists is not trained again, so an interrupted recipe
resumes where it stopped. Every run's config records ``recipe.method`` and ``recipe.beta`` for the comparison.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

import prefopt

__all__ = ["run_recipe", "run_overrides", "compare_runs", "cli"]

CONF = str(Path(__file__).resolve().parent.parent / "conf" / "recipe")

log = logging.getLogger("prefopt.recipes")


def run_overrides(cfg: DictConfig, method: str, beta: float, seed: int) -> list[str]:
    """The ``prefopt-train`` overrides of one run."""
    if method not in cfg.methods:
        raise KeyError(f"unknown method {method!r}; the recipe defines {sorted(cfg.methods)}")
    beta_key = (cfg.get("beta_keys") or {}).get(method, "loss.beta")
    mode = cfg.quick_overrides if cfg.quick else cfg.full_overrides
    online = any(o.startswith("trainer=online") for o in [*cfg.common, *cfg.methods[method]])
    mode_extra = list(mode.online if online else mode.offline)
    return [
        *cfg.common,
        *cfg.methods[method],
        *mode_extra,
        f"{beta_key}={beta}",
        f"trainer.seed={seed}",
        f"cache_dir='{cfg.cache_dir}'",
        "trainer.progress_bar=false",
        f"+recipe.name={cfg.name}",
        f"+recipe.method={method}",
        f"+recipe.beta={beta}",
    ]


def run_recipe(cfg: DictConfig) -> dict[str, Any]:
    """Train every (method, beta, seed) not yet done, then compare; returns ``{"runs": [...], "seconds": ...}``."""
    started = time.time()
    out = Path(cfg.out_dir)
    methods = list(cfg.run_methods or cfg.methods)
    default_betas = list(cfg.betas_quick if cfg.quick else cfg.betas)
    seeds = list(cfg.seeds_quick if cfg.quick else cfg.seeds)
    runs, trained = [], 0
    for method in methods:
        for beta in list((cfg.get("method_betas") or {}).get(method) or default_betas):
            for seed in seeds:
                run_dir = out / method / f"beta={beta}" / f"seed={seed}"
                if not (run_dir / "summary.json").exists():
                    log.info("recipe %s: training %s beta=%s seed=%s", cfg.name, method, beta, seed)
                    summary = prefopt.fit(prefopt.compose(run_overrides(cfg, method, beta, seed)), run_dir=run_dir)
                    trained += 1
                    log.info("  %s: eval %s", method, {k: round(v, 4) for k, v in summary["eval"].items()})
                runs.append(str(run_dir))
    seconds = round(time.time() - started, 1)
    record = {"config": OmegaConf.to_container(cfg, resolve=True), "runs": runs, "trained": trained, "seconds": seconds}
    (out / f"recipe-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(record, indent=2))
    return {"runs": runs, "trained": trained, "seconds": seconds, "out_dir": str(out)}


def compare_runs(cfg: DictConfig, result: dict[str, Any]) -> str:
    """``prefopt-compare`` over the recipe's runs into ``OUT/compare`` (table, CSV, frontier and curve plots);
    returns the Markdown table."""
    from prefopt.compare import run_comparison

    c = cfg.compare
    out = Path(result["out_dir"]) / "compare"
    metrics = list(c.metrics) if c.get("metrics") else None
    comparison = run_comparison(
        result["runs"],
        group=[c.group],
        param=c.param,
        metrics=metrics,
        out=out,
        x=c.x,
        y=c.y,
        curve=c.get("curve"),
        depth=0,
    )
    done = f"{len(result['runs'])} runs ({result['trained']} trained now, {result['seconds']}s)"
    return f"{comparison.table}\nrecipe {cfg.name}: {done}; table, CSV and plots in {out}"


def cli(name: str) -> None:
    """``python -m recipes.NAME [overrides]``: the Hydra app of recipe ``conf/recipe/NAME.yaml``."""

    @hydra.main(config_path=CONF, config_name=name, version_base="1.3")
    def main(cfg: DictConfig) -> None:
        logging.getLogger("prefopt").setLevel(logging.INFO)
        print(compare_runs(cfg, run_recipe(cfg)))

    main()
