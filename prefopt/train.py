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
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import losses
from prefopt.data import DataError
from prefopt.errors import ConfigError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
USER_ERRORS = (DataError, ConfigError, losses.LossError, FileNotFoundError)


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``prefopt-train OVERRIDES`` would run (Hydra's compose API), for notebooks and tests."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from prefopt.trainer import format_summary, train

    logging.getLogger("prefopt").setLevel(logging.INFO)
    try:
        summary = train(cfg, run_dir=HydraConfig.get().runtime.output_dir)
    except USER_ERRORS as error:
        print(f"prefopt-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))


if __name__ == "__main__":
    main()
