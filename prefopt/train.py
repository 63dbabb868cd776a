"""``prefopt-train`` (also ``python -m prefopt.train``): the Hydra entry point of the trainer.

    prefopt-train                                   # DPO on the embedded default
    prefopt-train loss=ipo loss.beta=0.05
    prefopt-train -m loss=dpo,ipo,mpo,upo loss.beta=0.05,0.1
    prefopt-train data=local data.path=pairs.jsonl

Errors a user can fix (bad data row, unknown loss or hyper-parameter, bad config value, missing file) print one line
and exit with code 2; a traceback means a bug.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from prefopt.config import CONF_DIR, ConfigError, check_overrides, exit_on_user_error
from prefopt.metrics import format_summary
from prefopt.trainer import NonFiniteTraining, train


def objective(summary: dict, metric: str | None) -> float | None:
    """The value a Hydra sweeper optimises (``objective``: a metric of the final evaluation, else of the last train
    step, e.g. ``rewards/accuracies`` or ``reward/mean``); None when not set."""
    if not metric:
        return None
    for split in ("eval", "train"):
        values = summary.get(split) or {}
        for key in (metric, metric.removeprefix("eval/"), f"online/{metric}"):
            if key in values:
                return float(values[key])
    logged = sorted({*(summary.get("eval") or {}), *(summary.get("train") or {})})
    raise ConfigError(f"objective={metric}: the run logged no such metric; it logged {', '.join(logged)}")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    logging.getLogger("prefopt").setLevel(logging.INFO)
    try:
        hydra = HydraConfig.get()
        command = list(hydra.overrides.task)
        summary = exit_on_user_error(
            "prefopt-train", lambda: train(cfg, run_dir=hydra.runtime.output_dir, command=command)
        )
    except NonFiniteTraining as error:
        print(f"prefopt-train: {error}", file=sys.stderr)
        sys.exit(3)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
    return exit_on_user_error("prefopt-train", lambda: objective(summary, cfg.get("objective")))


def _sweep_variants(arguments: list[str]) -> list[list[str]]:
    """Override lists that together touch every value of every sweep (``loss=dpo,ipo`` -> one list per loss), each
    with the first value of the other sweeps; empty for other Hydra flags (--cfg, --info, -c: left to Hydra)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in arguments):
        return []
    parsed = OverridesParser.create().parse_overrides([a for a in arguments if not a.startswith("-")])
    values = [_values(o) for o in parsed]
    first = [options[0] for options in values]
    variants = [first]
    for i, options in enumerate(values):
        variants += [[*first[:i], option, *first[i + 1 :]] for option in options[1:]]
    return variants


def _values(override) -> list[str]:
    """One override line per value of a choice or range sweep; an interval sweep (``interval(a,b)``, which a sweeper
    such as optuna samples) is checked at its lower end."""
    if not override.is_sweep_override():
        return [override.input_line]
    key = override.get_key_element()
    from hydra.core.override_parser.types import IntervalSweep

    sweep = override.value()
    if isinstance(sweep, IntervalSweep):
        return [f"{key}={sweep.start}"]
    return [f"{key}={v}" for v in override.sweep_string_iterator()]


def cli() -> None:
    """Console entry point: config errors Hydra would report with exit code 1 (unknown group option or key, bad
    override syntax) print one line and exit 2, like every other user error; then run the Hydra app."""
    check_overrides("prefopt-train", _sweep_variants(sys.argv[1:]))
    main()


if __name__ == "__main__":
    cli()
