"""``python -m recipes.exact [overrides]``: the exact testbed's tables (see :mod:`recipes.exact`)."""

from __future__ import annotations

import sys
import time

import hydra
from omegaconf import DictConfig

import losses
from recipes.exact.report import CONF_DIR, render, run


@hydra.main(config_path=CONF_DIR, config_name="exact", version_base="1.3")
def main(cfg: DictConfig) -> None:
    started = time.perf_counter()
    try:
        results = run(cfg)
    except (losses.LossError, ValueError) as error:
        print(f"recipes.exact: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(render(results))
    print(f"\nwrote {', '.join(results.files.values())} in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
