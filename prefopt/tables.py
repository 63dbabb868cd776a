"""Writers shared by every report (``prefopt-compare``, the recipes, the exact testbed): Markdown tables, CSV files
and matplotlib's headless pyplot with one colour and marker per series."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "write_csv", "write_records", "pyplot", "styles", "MARKERS"]

MARKERS = "osD^vP<>Xph*"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], cell: Callable[[Any], str] = str) -> str:
    """A Markdown table; every value goes through ``cell``."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV with the header ``columns``; None is written as a blank cell."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(["" if v is None else v for v in row] for row in rows)


def write_records(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """A CSV of dicts: the columns are every key, in first-seen order; a missing key is a blank cell."""
    columns: list[str] = []
    for record in records:
        columns += [k for k in record if k not in columns]
    write_csv(path, columns, ([record.get(c) for c in columns] for record in records))


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (imported on first use: it costs a second)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def styles(labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A distinct colour (qualitative colormap) and marker per label."""
    plt = pyplot()
    colors = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20").colors
    return {m: {"color": colors[i % len(colors)], "marker": MARKERS[i % len(MARKERS)]} for i, m in enumerate(labels)}
