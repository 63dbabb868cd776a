"""A generated table of malformed preference datasets, checked through ``prefopt.data.load_pairs`` (error and skip
modes), ``prefopt.data.tokenize_pairs`` (100k-character and odd-Unicode rows), and a few runs of the real command
line (exit code 2 with one line naming the file, the row and the field; ``data.on_bad_row=skip`` trains).

Each row case sits at row 2 of a file between three good rows: ``on_bad_row="error"`` must raise a one-line
``DataError`` "{file} row 2: field '{field}' ..." and ``on_bad_row="skip"`` must keep exactly the good rows. Cases
that must load, load (in both modes). File-level problems raise in both modes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pytest

from prefopt import models
from prefopt.data import DataError, load_pairs, to_standard, tokenize_pairs

from .data._helpers import make_tokenizer, write_rows
from .test_trainer import TINY_MODEL

FIELDS = ("prompt", "chosen", "rejected")
BAD_INDEX = 2  # where the malformed row sits among the good ones
ROW = {"prompt": "w1 w2", "chosen": "w3 w4", "rejected": "w5"}
GOOD = (
    {"prompt": "w10 w11", "chosen": "w12", "rejected": "w13 w14"},
    {"prompt": "w20", "chosen": "w21 w22", "rejected": "w23"},
    {"prompt": "w30 w31 w32", "chosen": "w33", "rejected": "w34"},
)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


GOOD_CHAT = tuple(
    {
        "chosen": [user(row["prompt"]), assistant(row["chosen"])],
        "rejected": [user(row["prompt"]), assistant(row["rejected"])],
    }
    for row in GOOD
)
LONG = " ".join(f"w{i % 200}" for i in range(25_000))[:100_000]  # 100k characters of vocabulary words
assert len(LONG) == 100_000
ODD_UNICODE = {  # odd but valid text: must load unchanged (no normalisation) and tokenize
    "zwj-emoji": "👨\u200d👩\u200d👧\u200d👦 w1 🏳\ufe0f\u200d🌈",
    "rtl-marks": "\u200fשלום\u200e w2 \u202bمرحبا\u202c \u2067abc\u2069",
    "combining": "e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353\u0354",
    "astral": "𝕏 \U0001f600 \U00010348 \U0001d11e \U00020000",
    "invisible": "\ufeffw1\u00a0w2\u200bw3\u2060",
}
NON_STRINGS = {"int": 7, "float": 2.5, "dict": {"text": "w1"}}
WHITESPACE = " \t\n\u3000\u2028 "  # str.strip() removes all of it


@dataclass(frozen=True)
class Case:
    """One malformed (or odd but valid) dataset.

    ``level``: "row" — ``bad``, written at ``BAD_INDEX`` among ``good``, is rejected naming ``field``; "load" — it
    loads unchanged; "file" — the file as a whole (raw ``content``) cannot be used; "column" — every row lacks
    ``field`` (a row-0 error in error mode, nothing left to keep in skip mode). ``fragment``: part of the message.
    """

    id: str
    level: str
    bad: Any = None
    field: str | None = None
    fragment: str = ""
    suffix: str = ".jsonl"
    good: tuple = GOOD
    content: str | None = None
    utf8: bool = False  # write JSON lines as raw UTF-8 instead of \\u escapes


def _without(field: str) -> dict[str, str]:
    return {k: v for k, v in ROW.items() if k != field}


def _jsonl(rows, *, ensure_ascii: bool = True) -> str:
    return "".join(json.dumps(row, ensure_ascii=ensure_ascii) + "\n" for row in rows)


def _cases() -> list[Case]:
    cases = [Case(f"missing-{f}", "row", _without(f), f, "is missing") for f in FIELDS]
    cases += [Case(f"null-{f}", "row", {**ROW, f: None}, f, "is missing") for f in FIELDS]
    cases += [
        Case(f"{kind}-{f}", "row", {**ROW, f: value}, f, f"must be a string or a list of messages, got {kind}")
        for kind, value in NON_STRINGS.items()
        for f in FIELDS
    ]
    cases += [Case(f"empty-{f}", "row", {**ROW, f: ""}, f, "is empty") for f in FIELDS]
    cases += [Case(f"whitespace-{f}", "row", {**ROW, f: WHITESPACE}, f, "is empty") for f in FIELDS]
    cases += [
        Case("chosen-equals-rejected", "row", {**ROW, "rejected": ROW["chosen"]}, "rejected", "equals 'chosen'"),
        Case("extra-fields", "load", {**ROW, "score": 0.5, "id": 7, "meta": {"source": "x"}, "tags": ["a", "b"]}),
    ]
    cases += [Case(f"100k-{f}", "load", {**ROW, f: LONG}) for f in FIELDS]
    cases += [
        Case(f"unicode-{name}", "load", {"prompt": text, "chosen": f"{text} w1", "rejected": f"w2 {text}"})
        for name, text in ODD_UNICODE.items()
    ]
    everything = " ".join(ODD_UNICODE.values())
    unicode_row = {"prompt": everything, "chosen": f"{everything} w1", "rejected": f"w2 {everything}"}
    cases += [
        Case("unicode-raw-utf8", "load", unicode_row, utf8=True),
        Case("unicode-csv", "load", unicode_row, suffix=".csv"),
        Case("unicode-parquet", "load", unicode_row, suffix=".parquet"),
    ]
    prompt = user("w1")
    cases += [
        Case(
            f"chat-role-{role}",
            "row",
            {"chosen": [prompt, {"role": role, "content": "w2"}], "rejected": [prompt, assistant("w3")]},
            "chosen",
            f"message 1 has role '{role}'; expected one of 'system', 'user', 'assistant'",
            good=GOOD_CHAT,
        )
        for role in ("tool", "bot")
    ]
    cases += [
        Case(
            "chat-role-missing",
            "row",
            {"chosen": [prompt, assistant("w2")], "rejected": [{"content": "w1"}, assistant("w3")]},
            "rejected",
            "message 0 has role None",
            good=GOOD_CHAT,
        ),
        Case(
            "chat-completion-from-user",
            "row",
            {"chosen": [prompt, assistant("w2")], "rejected": [prompt, user("w3")]},
            "rejected",
            "message 1 has role 'user'; completion messages must be 'assistant'",
            good=GOOD_CHAT,
        ),
        Case(
            "chat-prompt-and-completion-from-user",
            "row",
            {"prompt": [prompt], "chosen": [user("w2")], "rejected": [assistant("w3")]},
            "chosen",
            "completion messages must be 'assistant'",
            good=GOOD_CHAT,
        ),
        Case(
            "chat-identical-conversations",
            "row",
            {"chosen": [prompt, assistant("w2")], "rejected": [prompt, assistant("w2")]},
            "rejected",
            "equals 'chosen'",
            good=GOOD_CHAT,
        ),
        Case("csv-empty-cell", "row", {**ROW, "chosen": ""}, "chosen", "is missing (null)", suffix=".csv"),
        Case("parquet-null", "row", {**ROW, "rejected": None}, "rejected", "is missing (null)", suffix=".parquet"),
        Case(
            "csv-missing-column",
            "column",
            field="rejected",
            fragment="is missing",
            suffix=".csv",
            content=pd.DataFrame([_without("rejected") for _ in range(4)]).to_csv(index=False),
        ),
        Case("empty-file", "file", fragment="no rows", content=""),
        Case("blank-lines", "file", fragment="no rows", content="\n\n\n"),
        Case("empty-json-array", "file", fragment="no rows", suffix=".json", content="[]"),
        Case("csv-header-only", "file", fragment="no rows", suffix=".csv", content="prompt,chosen,rejected\n"),
        Case(
            "unknown-type-xlsx",
            "file",
            fragment="unknown file type '.xlsx'; use .jsonl, .json, .parquet or .csv",
            suffix=".xlsx",
            content=_jsonl([*GOOD, ROW]),
        ),
        Case("no-extension", "file", fragment="unknown file type (none)", suffix="", content=_jsonl([*GOOD, ROW])),
        Case(
            "invalid-json-line",
            "file",
            fragment="cannot be read as json: ",
            content=_jsonl(GOOD[:2]) + '{"prompt": "w1", "chosen": \n' + _jsonl(GOOD[2:]),
        ),
        Case(
            "truncated-json-array",
            "file",
            fragment="cannot be read as json: ",
            suffix=".json",
            content=json.dumps(list(GOOD))[:-1] + ",",
        ),
        Case("not-parquet", "file", fragment="cannot be read as parquet: ", suffix=".parquet", content=_jsonl(GOOD)),
    ]
    return cases


CASES = _cases()
ROW_CASES = [c for c in CASES if c.level == "row"]


# ----------------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The offline word-level tokenizer of the data tests, with a chat template for conversational rows."""
    return make_tokenizer()


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the arrow files ``datasets`` writes out of the user's cache, and stop ``load_dataset`` from sending its
    download-count request to the hub for every local file (offline it can stall for seconds)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)


def _mixed_rows(case: Case) -> list[Any]:
    return [*case.good[:BAD_INDEX], case.bad, *case.good[BAD_INDEX:]]


def _write(directory: Path, case: Case, rows: list[Any] | None = None) -> Path:
    """The case's file: its raw ``content``, or ``rows`` (default: the bad row among the good ones)."""
    rows = _mixed_rows(case) if rows is None else rows
    if case.content is not None:
        path = directory / f"data{case.suffix}"
        path.write_text(case.content, encoding="utf-8")
        return path
    if case.utf8:
        path = directory / f"data{case.suffix}"
        path.write_text(_jsonl(rows, ensure_ascii=False), encoding="utf-8")
        return path
    return write_rows(directory, rows, case.suffix, name="data")


def _standard(rows, tokenizer: Any) -> list[dict[str, str]]:
    return [to_standard(row, source="expected", index=i, tokenizer=tokenizer) for i, row in enumerate(rows)]


def _expected_pairs(case: Case, tokenizer: Any) -> list[dict[str, str]]:
    """What a "load" case's file must give: the good rows, and the odd row's three fields unchanged (extras dropped)."""
    expected = _standard(case.good, tokenizer)
    expected.insert(BAD_INDEX, {f: case.bad[f] for f in FIELDS})
    return expected


def _check_one_line(message: str, path: Path) -> None:
    assert "\n" not in message and "\r" not in message, repr(message)
    assert str(path) in message, message


def _check_row_error(err: DataError, path: Path, index: int, case: Case) -> None:
    message = str(err)
    _check_one_line(message, path)
    location = f"{path} row {index}: "
    assert message.startswith(f"{location}field '{case.field}' "), message
    assert case.fragment in message, message
    assert err.reason == message.removeprefix(location)


# ------------------------------------------------------------------------------------------------- load_pairs table
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_error_mode(tmp_path: Path, tokenizer: Any, case: Case) -> None:
    """``on_bad_row="error"``: the valid cases load unchanged; every other one raises a single-line ``DataError``
    naming the file and, for a row problem, ``row N`` and ``field '...'``."""
    path = _write(tmp_path, case)
    if case.level == "load":
        pairs, stats = load_pairs(path, tokenizer=tokenizer, on_bad_row="error")
        assert pairs == _expected_pairs(case, tokenizer)
        assert stats == {"rows": 4, "kept": 4, "skipped": 0, "skip_reasons": {}}
        return
    with pytest.raises(DataError) as caught:
        load_pairs(path, tokenizer=tokenizer, on_bad_row="error")
    if case.level == "row":
        _check_row_error(caught.value, path, BAD_INDEX, case)
    elif case.level == "column":
        _check_row_error(caught.value, path, 0, case)
    else:
        message = str(caught.value)
        _check_one_line(message, path)
        assert message.startswith(f"{path}: {case.fragment}"), message


@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: c.id)
def test_a_bad_row_alone(tmp_path: Path, tokenizer: Any, case: Case) -> None:
    """The bad row as the only row of its file (a missing key is then absent, not null): row 0, same field."""
    path = _write(tmp_path, case, rows=[case.bad])
    with pytest.raises(DataError) as caught:
        load_pairs(path, tokenizer=tokenizer)
    _check_row_error(caught.value, path, 0, case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_skip_mode(tmp_path: Path, tokenizer: Any, case: Case) -> None:
    """``on_bad_row="skip"``: exactly the good rows are kept and the bad one is counted under its reason; valid
    rows are all kept; a file-level problem (or a file with nothing left) still raises."""
    path = _write(tmp_path, case)
    if case.level in ("file", "column"):
        with pytest.raises(DataError) as caught:
            load_pairs(path, tokenizer=tokenizer, on_bad_row="skip")
        message = str(caught.value)
        _check_one_line(message, path)
        if case.level == "column":
            assert message == f"{path}: all 4 rows were skipped; first reason: row 0: field '{case.field}' is missing"
        else:
            assert message.startswith(f"{path}: {case.fragment}"), message
        return
    pairs, stats = load_pairs(path, tokenizer=tokenizer, on_bad_row="skip")
    if case.level == "load":
        assert pairs == _expected_pairs(case, tokenizer)
        assert stats == {"rows": 4, "kept": 4, "skipped": 0, "skip_reasons": {}}
        return
    with pytest.raises(DataError) as caught:
        load_pairs(path, tokenizer=tokenizer, on_bad_row="error")
    assert pairs == _standard(case.good, tokenizer)
    assert stats == {"rows": 4, "kept": 3, "skipped": 1, "skip_reasons": {caught.value.reason: 1}}


def test_skip_counts_every_kind_of_bad_row_at_once(tmp_path: Path, tokenizer: Any) -> None:
    """All the standard-format row cases in one JSON-lines file with the good rows: each is skipped and counted."""
    bad = [c for c in ROW_CASES if c.suffix == ".jsonl" and c.good is GOOD]
    path = write_rows(tmp_path, [*GOOD, *(c.bad for c in bad)], ".jsonl")
    pairs, stats = load_pairs(path, tokenizer=tokenizer, on_bad_row="skip")
    assert pairs == list(GOOD)
    assert stats["rows"] == len(GOOD) + len(bad) and stats["kept"] == len(GOOD) and stats["skipped"] == len(bad)
    assert sum(stats["skip_reasons"].values()) == len(bad)


# ---------------------------------------------------------------------------------------------------- tokenize_pairs
MAX_LENGTH, MAX_PROMPT_LENGTH = 64, 32


@pytest.fixture(scope="module")
def byte_level_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The trainer's embedded byte-level BPE (no BOS), trained on a tiny corpus: every Unicode string round-trips."""
    corpus = ["w1 w2 w3 the quick brown fox jumps over the lazy dog"] * 8
    config = {"tokenizer": "embedded", "vocab_size": 300}
    return models.build_tokenizer(config, tmp_path_factory.mktemp("tokenizer"), corpus=lambda: corpus)


def _long_and_odd_rows() -> list[dict[str, str]]:
    rows = [{**ROW, f: LONG} for f in FIELDS]
    rows += [{"prompt": t, "chosen": f"{t} w1", "rejected": f"w2 {t}"} for t in ODD_UNICODE.values()]
    everything = " ".join(ODD_UNICODE.values())
    rows += [{"prompt": LONG, "chosen": everything, "rejected": LONG}]
    return rows


@pytest.mark.parametrize("kind", ["word-level", "byte-level"])
def test_long_and_unicode_rows_tokenize_within_the_limits(
    tmp_path: Path, tokenizer: Any, byte_level_tokenizer: Any, kind: str
) -> None:
    """100k-character and odd-Unicode rows, loaded from a file, tokenize within max_length=64 and
    max_prompt_length=32: the prompt keeps its last tokens (and BOS), each completion its first ones (EOS when it
    fits); byte-level ids decode back to the exact text."""
    tok = tokenizer if kind == "word-level" else byte_level_tokenizer
    rows = _long_and_odd_rows()
    pairs, _ = load_pairs(write_rows(tmp_path, rows, ".jsonl"), tokenizer=tok)
    assert pairs == rows
    kept, stats = tokenize_pairs(pairs, tok, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    assert stats["pairs"] == stats["kept"] == len(rows) and stats["dropped_empty_completion"] == 0
    bos, eos = tok.bos_token_id, tok.eos_token_id
    add_bos = tok("w1")["input_ids"][:1] == [bos]
    assert add_bos == (kind == "word-level")

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    for row, pair in zip(rows, kept, strict=True):
        prompt = [bos, *encode(row["prompt"])] if add_bos else encode(row["prompt"])
        if len(prompt) > MAX_PROMPT_LENGTH:
            keep = MAX_PROMPT_LENGTH - 1 if add_bos else MAX_PROMPT_LENGTH
            prompt_cut = ([bos] if add_bos else []) + prompt[len(prompt) - keep :]
        else:
            prompt_cut = prompt
        assert pair["prompt_ids"] == prompt_cut
        assert 1 <= len(pair["prompt_ids"]) <= MAX_PROMPT_LENGTH
        budget = MAX_LENGTH - len(pair["prompt_ids"])
        truncated = len(prompt_cut) < len(prompt)
        for field in ("chosen", "rejected"):
            full = [*encode(row[field]), eos]
            ids = pair[f"{field}_ids"]
            assert ids == full[:budget]
            assert 1 <= len(ids) and len(pair["prompt_ids"]) + len(ids) <= MAX_LENGTH
            truncated = truncated or len(full) > budget
            if kind == "byte-level" and len(full) <= budget:
                assert tok.decode(ids[:-1]) == row[field]
        assert pair["truncated"] == truncated
        if kind == "byte-level" and len(prompt) <= MAX_PROMPT_LENGTH:
            assert tok.decode(pair["prompt_ids"]) == row["prompt"]
        if LONG in (row["chosen"], row["rejected"]):
            assert pair["truncated"]
        if row["prompt"] == LONG:
            assert len(pair["prompt_ids"]) == MAX_PROMPT_LENGTH
    assert stats["truncated"] == sum(pair["truncated"] for pair in kept) >= 4


# ----------------------------------------------------------------------------------------------- the command line
BAD_CLI_ROWS = 2  # row 1: chosen is an int; row 3: rejected is missing


def _cli_rows() -> list[dict[str, Any]]:
    rows = [
        {"prompt": f"w{i} review", "chosen": f"great product {i}", "rejected": f"bad product {i}"} for i in range(14)
    ]
    rows[1] = {**rows[1], "chosen": 5}
    rows[3] = {k: v for k, v in rows[3].items() if k != "rejected"}
    return rows


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Four runs of ``python -m prefopt.train`` started together (each spends ~10 s importing): the bad file with
    ``on_bad_row=error`` and ``skip``, a negative β, and a missing data file."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "pairs.jsonl"
    data.write_text(_jsonl(_cli_rows()))
    local = ["data=local", f"data.path={data}", "data.max_length=40", "data.max_prompt_length=12"]
    runs = {
        "error": local,
        "skip": [*local, "data.on_bad_row=skip"],
        "negative_beta": ["loss.beta=-1"],
        "missing_file": ["data=local", f"data.path={root / 'nonexistent.jsonl'}"],
    }
    env = {**os.environ, "HF_DATASETS_CACHE": str(root / "hf_cache"), "HF_UPDATE_DOWNLOAD_COUNTS": "0"}
    procs = {}
    try:
        for name, overrides in runs.items():
            args = [
                sys.executable,
                "-m",
                "prefopt.train",
                *overrides,
                "trainer.max_steps=1",
                *TINY_MODEL,
                f"cache_dir={root / name / 'cache'}",
                f"hydra.run.dir={root / name / 'run'}",
            ]
            procs[name] = subprocess.Popen(
                args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        results = {}
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=300)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"root": root, "data": data, **results}


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("prefopt-train: error:")]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("error", "{data} row 1: field 'chosen' must be a string or a list of messages, got int"),
        ("negative_beta", "dpo.beta must be a finite number > 0, got -1"),
        ("missing_file", "{root}/nonexistent.jsonl: file not found"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(cli_runs: dict[str, Any], name: str, message: str) -> None:
    result = cli_runs[name]
    assert result.returncode == 2, result.stderr[-3000:]
    expected = "prefopt-train: error: " + message.format(data=cli_runs["data"], root=cli_runs["root"])
    assert _error_lines(result) == [expected], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (cli_runs["root"] / name / "run" / "final").exists()


def test_cli_skip_trains_on_the_good_rows(cli_runs: dict[str, Any]) -> None:
    result = cli_runs["skip"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not _error_lines(result)
    run_dir = cli_runs["root"] / "skip" / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 1
    load = summary["data_stats"]["load"]
    rows = len(_cli_rows())
    assert (load["rows"], load["kept"], load["skipped"]) == (rows, rows - BAD_CLI_ROWS, BAD_CLI_ROWS)
    assert load["skip_reasons"] == {
        "field 'chosen' must be a string or a list of messages, got int": 1,
        "field 'rejected' is missing (null)": 1,
    }
    assert summary["train_pairs"] + summary["eval_pairs"] == rows - BAD_CLI_ROWS
    assert (run_dir / "final" / "model.safetensors").exists()
    log = result.stdout + result.stderr + "".join(p.read_text() for p in run_dir.glob("*.log"))
    assert f"skipped {BAD_CLI_ROWS} of {rows} rows with bad data" in log
