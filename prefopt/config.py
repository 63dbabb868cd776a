"""What the command-line tools share: the conf dir, composing a config as the CLI would, turning a config into plain
Python containers, and the errors a user can fix (one line on stderr, exit code 2).

Library modules never import a command-line module; they import this one for :class:`ConfigError` and
:func:`plain`. Only :mod:`prefopt.build` reads a composed Hydra config; everything below it takes typed settings.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import losses
from prefopt.data.errors import DataError

__all__ = [
    "CONF_DIR",
    "ConfigError",
    "USER_ERRORS",
    "compose_config",
    "plain",
    "exit_on_user_error",
    "check_overrides",
    "to_yaml",
]

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


class ConfigError(ValueError):
    """A config value that cannot work (names the key)."""


USER_ERRORS = (DataError, ConfigError, losses.LossError, FileNotFoundError)


def plain(cfg: Any, *, missing: str = "none") -> Any:
    """``cfg`` as plain dicts and lists, interpolations resolved (OmegaConf containers and other mappings alike).
    A mandatory value left unset (``???``) becomes None (``missing="none"``: the code that needs it says which key
    to set) or raises (``missing="raise"``)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=missing == "raise")
    if isinstance(cfg, Mapping):
        return {str(k): plain(v, missing=missing) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [plain(v, missing=missing) for v in cfg]
    return None if cfg == "???" else cfg


def to_yaml(resolved: Mapping[str, Any]) -> str:
    """A plain config as YAML (the run dir's ``config.yaml``)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(dict(resolved)))


def compose_config(overrides: list[str], config_name: str = "config") -> Any:
    """The config ``prefopt-train OVERRIDES`` would run (Hydra's compose API), for notebooks and tests."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    running = get_gh_backup()  # inside a Hydra app (a recipe driver): set its state aside, then restore it
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    finally:
        restore_gh_from_backup(running)


def exit_on_user_error(prog: str, run: Callable[[], Any]) -> Any:
    """``run()``; a user error prints ``PROG: error: MESSAGE`` in one line and exits 2."""
    try:
        return run()
    except USER_ERRORS as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)


def check_overrides(prog: str, variants: list[list[str]], config_name: str = "config") -> None:
    """Compose every override list: what Hydra would report with exit code 1 (unknown group option or key, bad
    override syntax) prints one line and exits 2 instead, like every other user error."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        for overrides in variants:
            compose_config(overrides, config_name=config_name)
    except (HydraException, OmegaConfBaseException) as error:
        message = " ".join(str(error).split("Config search path")[0].split())
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
