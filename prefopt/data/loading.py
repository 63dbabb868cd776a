"""Read preference data (local files through ``datasets``, or a hub dataset) and convert it to standard rows.

Bad rows either stop the load (``on_bad_row="error"``, the default) or are skipped and counted (``"skip"``); skips
are logged on the ``prefopt.data`` logger: one warning with the count, and a debug line per skipped row.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import DataError, first_line
from .formats import to_standard
from .unpaired import is_unpaired, to_unpaired

__all__ = ["load_rows", "load_pairs", "load_hub_pairs", "MAX_SKIP_REASONS"]

logger = logging.getLogger("prefopt.data")

MAX_SKIP_REASONS = 20
_ON_BAD_ROW = ("error", "skip")
_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".csv.gz": "csv",
}


def _datasets():
    """``datasets`` is imported when a file or hub dataset is read (1.2 s of imports; the embedded default never reads
    one)."""
    import datasets

    return datasets


# datasets' message when a file parses to zero rows (a blank line, ``[]``, a CSV header alone).
_NO_DATA = "corresponds to no data"


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a local ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` file (JSON and CSV may be gzipped).

    ``datasets`` unifies the columns, so a key missing from a row comes back as None. A missing, unreadable or
    empty file, or an unknown extension, raises a one-line :class:`DataError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    builder = _builder(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: no rows")
    try:
        with _no_download_counts():
            dataset = _datasets().load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets surfaces pyarrow, pandas and json errors of many types
        if _NO_DATA in str(exc):
            raise DataError(f"{path}: no rows") from exc
        raise DataError(f"{path}: cannot be read as {builder}: {first_line(_root_cause(exc))}") from exc
    return dataset.to_list()


@contextlib.contextmanager
def _no_download_counts():
    """A local file needs no network, but ``datasets`` pings the hub to count a download of its packaged builder
    (a HEAD request that can stall for seconds offline); switch that off while loading."""
    datasets = _datasets()
    saved = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = saved


def load_pairs(
    path: str | Path, *, tokenizer: Any = None, on_bad_row: str = "error", source_name: str | None = None
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Read a local file and convert each row with :func:`~prefopt.data.formats.to_standard` (pairs) or
    :func:`~prefopt.data.unpaired.to_unpaired` (an unpaired file: ``prompt``, ``completion``, ``label``).

    Returns ``(pairs, stats)``; ``stats`` is ``{"rows", "kept", "skipped", "skip_reasons"}``, ``skip_reasons``
    mapping each of the first 20 distinct problems (the message without its ``"{source} row {i}: "`` location) to
    its row count. ``source_name`` (default: the path) names the data in row messages and logs; file-level errors
    always name the path. ``tokenizer`` (with a chat template) is needed for conversational rows.
    """
    _check_on_bad_row(on_bad_row)
    rows = load_rows(path)
    return _convert_rows(rows, source=source_name or str(path), tokenizer=tokenizer, on_bad_row=on_bad_row)


def load_hub_pairs(
    name: str, split: str, *, tokenizer: Any = None, on_bad_row: str = "error", **load_kwargs: Any
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """:func:`load_pairs` for ``datasets.load_dataset(name, split=split, **load_kwargs)``, named ``name[split]``.

    Not covered by the offline tests: it needs the network (or a local dataset script/directory as ``name``).
    """
    _check_on_bad_row(on_bad_row)
    source = f"{name}[{split}]"
    rows = _datasets().load_dataset(name, split=split, **load_kwargs).to_list()
    if not rows:
        raise DataError(f"{source}: no rows")
    return _convert_rows(rows, source=source, tokenizer=tokenizer, on_bad_row=on_bad_row)


def _builder(path: Path) -> str:
    """The ``datasets`` builder for the file's extension."""
    name = path.name.lower()
    for extension, builder in _BUILDERS.items():
        if name.endswith(extension):
            return builder
    kind = repr(path.suffix) if path.suffix else "(none)"
    raise DataError(f"{path}: unknown file type {kind}; use .jsonl, .json, .parquet or .csv")


def _root_cause(exc: BaseException) -> BaseException:
    """Look through datasets' generic "An error occurred while generating the dataset" to the parser's error."""
    from datasets.exceptions import DatasetGenerationError

    while isinstance(exc, DatasetGenerationError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in _ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")


def _convert_rows(
    rows: list[Any], *, source: str, tokenizer: Any, on_bad_row: str
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Convert every row (as unpaired rows when the source is unpaired, :func:`~prefopt.data.unpaired.is_unpaired`);
    with ``on_bad_row="skip"`` count bad rows by reason instead of raising."""
    convert = to_unpaired if is_unpaired(rows) else to_standard
    pairs: list[dict[str, str]] = []
    reasons: Counter[str] = Counter()
    first_skip: DataError | None = None
    for index, row in enumerate(rows):
        try:
            pairs.append(convert(row, source=source, index=index, tokenizer=tokenizer))
        except DataError as err:
            if on_bad_row == "error":
                raise
            logger.debug("skipping %s", err)
            first_skip = first_skip or err
            reasons[err.reason] += 1
    if first_skip is not None:
        _report_skips(source, len(rows), len(pairs), reasons, first_skip)
    stats = {
        "rows": len(rows),
        "kept": len(pairs),
        "skipped": len(rows) - len(pairs),
        "skip_reasons": dict(list(reasons.items())[:MAX_SKIP_REASONS]),
    }
    return pairs, stats


def _report_skips(source: str, n_rows: int, n_kept: int, reasons: Counter[str], first: DataError) -> None:
    """Raise when nothing is left, else log one warning line with the count and the most common reason."""
    if n_kept == 0:
        first_reason = str(first).removeprefix(f"{source} ")  # "row 3: field 'chosen' is missing"
        raise DataError(f"{source}: all {n_rows} rows were skipped; first reason: {first_reason}")
    reason, count = reasons.most_common(1)[0]
    logger.warning(
        "%s: skipped %d of %d rows with bad data; most common reason (%d rows): %s",
        source,
        n_rows - n_kept,
        n_rows,
        count,
        reason,
    )
