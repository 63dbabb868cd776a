"""Process memory, without heavy imports (the benchmark's TRL and bare-loop workers use it too): peak and current
resident set size from Linux ``/proc/self/status``, ``ru_maxrss`` elsewhere."""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

__all__ = ["peak_rss_mib", "current_rss_mib"]


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _maxrss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def peak_rss_mib() -> float:
    """Peak RSS of this process: ``VmHWM`` (resettable through ``/proc/self/clear_refs``) where available, else
    ``ru_maxrss`` (since the process started)."""
    hwm = _status_kib("VmHWM")
    return hwm / 1024 if hwm is not None else _maxrss_mib()


def current_rss_mib() -> float:
    rss = _status_kib("VmRSS")
    return rss / 1024 if rss is not None else _maxrss_mib()
