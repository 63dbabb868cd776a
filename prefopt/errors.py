"""Errors a user can fix by changing the config or the data: the CLI prints them in one line and exits 2."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config value that cannot work (names the key)."""
