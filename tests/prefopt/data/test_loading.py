"""Reading files of every type through ``datasets``, file-level errors, and skipping bad rows."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from prefopt.data import DataError, load_pairs, load_rows

ROWS = [
    {"prompt": "w1 w2", "chosen": "w3", "rejected": "w4"},
    {"prompt": "w5", "chosen": "w6 w7", "rejected": "w8"},
]
HH = "\n\nHuman: w1\n\nAssistant:"
Write = Callable[..., Path]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv"])
def test_every_file_type_loads(write: Write, suffix: str) -> None:
    pairs, stats = load_pairs(write(ROWS, suffix))
    assert pairs == ROWS
    assert stats == {"rows": 2, "kept": 2, "skipped": 0, "skip_reasons": {}}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_conversational_file_loads(write: Write, suffix: str, tokenizer: Any) -> None:
    row = {
        "prompt": [{"role": "user", "content": "w1"}],
        "chosen": [{"role": "assistant", "content": "w2"}],
        "rejected": [{"role": "assistant", "content": "w3"}],
    }
    pairs, _ = load_pairs(write([row], suffix), tokenizer=tokenizer)
    assert pairs == [{"prompt": "<|user|> w1 <|assistant|> ", "chosen": "w2 ", "rejected": "w3 "}]


def test_mixed_standard_and_hh_rows_load_despite_null_filled_columns(write: Write) -> None:
    # datasets gives the HH row a prompt of None, which reads as "no prompt".
    path = write([ROWS[0], {"chosen": HH + " a", "rejected": HH + " b"}], ".jsonl")
    assert load_rows(path)[1]["prompt"] is None
    pairs, _ = load_pairs(path)
    assert pairs == [ROWS[0], {"prompt": HH, "chosen": " a", "rejected": " b"}]


def test_bad_row_in_a_file_names_the_file_row_and_field(write: Write) -> None:
    path = write([ROWS[0], {"prompt": "p", "chosen": "c"}], ".jsonl")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} row 1: field 'rejected' is missing"):
        load_pairs(path)


def test_int_value_in_a_file_names_the_field(write: Write) -> None:
    path = write([ROWS[0], {"prompt": "p", "chosen": 5, "rejected": "r"}], ".jsonl")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} row 1: field 'chosen' must be a string"):
        load_pairs(path)


def test_source_name_replaces_the_path_in_row_errors(write: Write) -> None:
    path = write([{"prompt": "p", "chosen": "c", "rejected": "c"}], ".jsonl")
    with pytest.raises(DataError, match=r"^train row 0: field 'rejected' equals 'chosen'$"):
        load_pairs(path, source_name="train")


# ------------------------------------------------------------------------------------------------- file-level errors
def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: file not found$"):
        load_rows(path)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}: unknown file type '.xlsx'; use .jsonl, .json, .parquet or .csv$"
    ):
        load_rows(path)


@pytest.mark.parametrize(("name", "content"), [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]")])
def test_file_without_rows(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no rows$"):
        load_rows(path)


def test_csv_with_only_a_header_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match=r": no rows$"):
        load_rows(path)


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("bad.jsonl", '{"prompt": "p", "chosen": "c", "rejected": "r"}\n{not json\n', "cannot be read as json: "),
        ("bad.json", '[{"prompt": "p"},', "cannot be read as json: "),
        ("bad.parquet", "not a parquet file", "cannot be read as parquet: "),
    ],
)
def test_unparseable_file_gives_one_line_with_the_parser_message(
    tmp_path: Path, name: str, content: str, fragment: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_rows(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {fragment}")
    assert "\n" not in message
    assert "An error occurred while generating the dataset" not in message  # the wrapper, not the cause


# ------------------------------------------------------------------------------------------------------- skipping
def test_skip_keeps_good_rows_and_counts_reasons(write: Write, caplog: pytest.LogCaptureFixture) -> None:
    rows = [ROWS[0], {"prompt": "p", "chosen": "c"}, ROWS[1], {"prompt": "p", "chosen": "c"}, {**ROWS[0], "prompt": ""}]
    path = write(rows, ".jsonl")
    with caplog.at_level(logging.DEBUG, logger="prefopt.data"):
        pairs, stats = load_pairs(path, on_bad_row="skip")
    assert pairs == ROWS
    assert stats == {
        "rows": 5,
        "kept": 2,
        "skipped": 3,
        "skip_reasons": {"field 'rejected' is missing (null)": 2, "field 'prompt' is empty": 1},
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{path}: skipped 3 of 5 rows with bad data; most common reason (2 rows): field 'rejected' is missing (null)"
    ]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and r.name == "prefopt.data"]
    assert [line for line in debug if line.startswith("skipping ")] == [
        f"skipping {path} row 1: field 'rejected' is missing (null)",
        f"skipping {path} row 3: field 'rejected' is missing (null)",
        f"skipping {path} row 4: field 'prompt' is empty",
    ]


def test_skip_reasons_keep_the_first_20_distinct(write: Write, tokenizer: Any) -> None:
    bad = [
        {"chosen": [{"role": f"r{i}", "content": "w"}], "rejected": [{"role": "assistant", "content": "w"}]}
        for i in range(25)
    ]
    good = {
        "chosen": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}],
        "rejected": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w3"}],
    }
    pairs, stats = load_pairs(write([*bad, good], ".jsonl"), tokenizer=tokenizer, on_bad_row="skip")
    assert len(pairs) == 1
    assert stats["skipped"] == 25
    assert list(stats["skip_reasons"]) == [
        f"field 'chosen' message 0 has role 'r{i}'; expected one of 'system', 'user', 'assistant'" for i in range(20)
    ]


def test_all_rows_skipped_is_an_error(write: Write) -> None:
    path = write([{"prompt": "p", "chosen": "c"}, {"prompt": "p", "chosen": "c", "rejected": 3}], ".jsonl")
    with pytest.raises(DataError) as err:
        load_pairs(path, on_bad_row="skip")
    assert str(err.value) == f"{path}: all 2 rows were skipped; first reason: row 0: field 'rejected' is missing (null)"


def test_error_mode_raises_the_first_bad_row(write: Write) -> None:
    path = write([ROWS[0], {"prompt": "p", "chosen": 1, "rejected": "r"}, {"prompt": "p"}], ".json")
    with pytest.raises(DataError, match=r" row 1: field 'chosen'"):
        load_pairs(path, on_bad_row="error")


def test_unknown_on_bad_row_is_a_value_error_before_reading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"on_bad_row must be 'error' or 'skip', got 'ignore'") as err:
        load_pairs(tmp_path / "missing.jsonl", on_bad_row="ignore")
    assert not isinstance(err.value, DataError)
