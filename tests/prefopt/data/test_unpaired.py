"""Unpaired rows (prompt, completion, label): every file type, conversational rows, bad rows with one-line errors
naming the row and the field, skipping, tokenization, unpairing pairs and preparing a run's data."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from prefopt.config import ConfigError
from prefopt.data import DataError, load_pairs
from prefopt.data.prepare import prepare_data
from prefopt.data.tokenize import tokenize_pairs
from prefopt.data.unpaired import is_unpaired, to_unpaired, tokenize_unpaired, unpair
from prefopt.settings import DataSettings

from ._helpers import BOS, EOS, word_ids

ROWS = [
    {"prompt": "w1 w2", "completion": "w3", "label": True},
    {"prompt": "w5", "completion": "w6 w7", "label": False},
]
Write = Callable[..., Path]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv"])
def test_every_file_type_loads(write: Write, suffix: str) -> None:
    rows, stats = load_pairs(write(ROWS, suffix))
    assert rows == ROWS
    assert stats == {"rows": 2, "kept": 2, "skipped": 0, "skip_reasons": {}}


@pytest.mark.parametrize("label", [1, 0, "true", "False", 1.0])
def test_integer_and_text_labels_are_accepted(label: Any) -> None:
    row = to_unpaired({"prompt": "w1", "completion": "w2", "label": label}, source="f", index=0)
    assert row["label"] is (str(label).lower() in ("1", "true", "1.0"))


def test_conversational_rows_are_rendered(write: Write, tokenizer: Any) -> None:
    rows = [
        {"prompt": [{"role": "user", "content": "w1"}], "completion": [{"role": "assistant", "content": "w2"}]},
        {"prompt": "w3", "completion": [{"role": "assistant", "content": "w4"}]},  # a string prompt: one user turn
    ]
    rows = [{**rows[0], "label": True}, {**rows[1], "label": False}]
    loaded, _ = load_pairs(write(rows, ".jsonl"), tokenizer=tokenizer)
    assert loaded == [
        {"prompt": "<|user|> w1 <|assistant|> ", "completion": "w2 ", "label": True},
        {"prompt": "<|user|> w3 <|assistant|> ", "completion": "w4 ", "label": False},
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "w1", "completion": "w2"}, "row 1: field 'label' is missing (null)"),  # datasets: absent = null
        ({"prompt": "w1", "completion": "w2", "label": None}, "row 1: field 'label' is missing (null)"),
        ({"prompt": "w1", "completion": "w2", "label": "yes"}, "row 1: field 'label' must be true (desirable)"),
        ({"prompt": "w1", "completion": "w2", "label": 2}, "row 1: field 'label' must be true (desirable)"),
        ({"prompt": "w1", "completion": None, "label": True}, "row 1: field 'completion' is missing (null)"),
        ({"prompt": "w1", "completion": "  ", "label": True}, "row 1: field 'completion' is empty"),
        ({"completion": "w2", "label": True}, "row 1: field 'prompt' is missing"),
        ({"prompt": "w1", "completion": 3, "label": True}, "row 1: field 'completion' must be a string or a list"),
        (
            {"prompt": [{"role": "user", "content": "w1"}], "completion": [{"role": "user", "content": "w2"}],
             "label": True},
            "row 1: field 'completion' message 0 has role 'user'; completion messages must be 'assistant'",
        ),
        (
            {"prompt": [{"role": "user", "content": "w1"}], "completion": "w2", "label": True},
            "row 1: field 'completion' must be a list of messages, like the row's prompt, got str",
        ),
    ],
)  # fmt: skip
def test_bad_rows_are_one_line_naming_row_and_field(tmp_path: Path, tokenizer: Any, row: dict, message: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as error:
        load_pairs(path, tokenizer=tokenizer)
    assert str(error.value).startswith(f"{path} {message}")
    assert "\n" not in str(error.value)


def test_bad_rows_can_be_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    bad = {"prompt": "w1", "completion": "w2", "label": "maybe"}
    path.write_text("".join(json.dumps(r) + "\n" for r in [*ROWS, bad]))
    rows, stats = load_pairs(path, on_bad_row="skip")
    assert rows == ROWS and stats["skipped"] == 1
    assert list(stats["skip_reasons"]) == ["field 'label' must be true (desirable) or false (undesirable), got 'maybe'"]


def test_a_missing_label_key_is_named() -> None:
    with pytest.raises(
        DataError, match=r"^f row 0: field 'label' is missing \(true = desirable, false = undesirable\)$"
    ):
        to_unpaired({"prompt": "w1", "completion": "w2"}, source="f", index=0)


def test_a_file_is_unpaired_by_its_columns() -> None:
    assert is_unpaired(ROWS)
    assert is_unpaired([{"prompt": "p", "completion": "c", "label": None, "chosen": None, "rejected": None}])
    assert not is_unpaired([{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert not is_unpaired([{"prompt": "p", "chosen": "a", "rejected": "b", "completion": None, "label": None}])


def test_tokenization_follows_the_pair_rules(tokenizer: Any) -> None:
    """BOS on the prompt, EOS on the completion, prompt cut from the left, completion from the right; a completion
    with no tokens is dropped."""
    rows = [*ROWS, {"prompt": "w1", "completion": "", "label": True}]
    kept, stats = tokenize_unpaired(rows, tokenizer, max_length=4, max_prompt_length=2)
    assert stats == {"rows": 3, "kept": 2, "dropped_empty_completion": 1, "truncated": 2}
    assert kept[0]["prompt_ids"] == [BOS, word_ids("w2")[0]] and kept[0]["completion_ids"] == [*word_ids("w3"), EOS]
    assert kept[1]["prompt_ids"] == [BOS, *word_ids("w5")] and kept[1]["completion_ids"] == word_ids("w6 w7")
    assert kept[1]["truncated"] and kept[1]["label"] is False


def test_unpair_gives_a_desirable_then_an_undesirable_row_per_pair(tokenizer: Any) -> None:
    pairs = [{"prompt": "w1", "chosen": "w2", "rejected": "w3"}, {"prompt": "w4", "chosen": "w5", "rejected": "w6"}]
    tokenized, _ = tokenize_pairs(pairs, tokenizer, max_length=16, max_prompt_length=8)
    rows = unpair(tokenized)
    assert [(r["prompt"], r["completion"], r["label"], r["pair"]) for r in rows] == [
        ("w1", "w2", True, 0), ("w1", "w3", False, 0), ("w4", "w5", True, 1), ("w4", "w6", False, 1),
    ]  # fmt: skip
    assert (
        rows[1]["completion_ids"] == tokenized[0]["rejected_ids"]
        and rows[1]["prompt_ids"] == tokenized[0]["prompt_ids"]
    )


def test_prepare_unpairs_the_synthetic_data_on_request(tmp_path: Path, tokenizer: Any) -> None:
    common = {"n_train": 12, "n_eval": 4, "max_length": 40, "max_prompt_length": 12}
    pairs = prepare_data(DataSettings(**common), tokenizer, cache_dir=tmp_path)
    rows = prepare_data(DataSettings(**common, unpair=True), tokenizer, cache_dir=tmp_path)
    cached = prepare_data(DataSettings(**common, unpair=True), tokenizer, cache_dir=tmp_path)
    assert pairs.kind == "pair" and rows.kind == "unpaired" and cached.kind == "unpaired"
    assert len(rows.train) == 2 * len(pairs.train) and len(rows.eval) == 2 * len(pairs.eval)
    assert rows.fingerprint != pairs.fingerprint and cached.fingerprint == rows.fingerprint
    assert cached.train == rows.train
    assert [r["label"] for r in rows.train[:4]] == [True, False, True, False]


def test_unpaired_train_with_a_paired_eval_file_needs_unpair(tmp_path: Path, write: Write, tokenizer: Any) -> None:
    train = write(ROWS * 4, ".jsonl")
    evaluation = write([{"prompt": "w1", "chosen": "w2", "rejected": "w3"}], ".jsonl", name="eval")
    local = {"source": "local", "path": str(train), "eval_path": str(evaluation), "max_length": 16}
    local["max_prompt_length"] = 8
    with pytest.raises(ConfigError, match="mix pairs and unpaired rows; set data.unpair=true"):
        prepare_data(DataSettings(**local), tokenizer)
    data = prepare_data(DataSettings(**local, unpair=True), tokenizer)
    assert data.kind == "unpaired" and [r["label"] for r in data.eval] == [True, False]
