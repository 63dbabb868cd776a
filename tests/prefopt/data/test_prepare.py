"""The tokenized-data cache of ``prepare_data``: a miss writes ``cache_dir/data/<key>.json``, a hit skips loading and
tokenizing and gives the identical result, anything that decides the tokens invalidates it, and a damaged file is
reported and rebuilt, never used."""

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from prefopt import models
from prefopt.config import plain
from prefopt.data import prepare as dataset
from prefopt.data import synthetic
from prefopt.data.prepare import data_cache_key, prepare_data, tokenizer_fingerprint
from prefopt.settings import DataSettings

CONF = Path(__file__).resolve().parents[3] / "conf" / "data"


def data_cfg(name: str = "synthetic", **overrides) -> DataSettings:
    base = {**plain(OmegaConf.load(CONF / f"{name}.yaml")), "n_train": 24, "n_eval": 6}
    if name == "local":
        base = plain(OmegaConf.load(CONF / "local.yaml"))
    return DataSettings.from_mapping({**base, "max_length": 40, "max_prompt_length": 12, **overrides})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tok")
    return models.build_tokenizer({"name": "tiny-llama", "tokenizer": "embedded", "vocab_size": 256}, cache)


@pytest.fixture
def loads(monkeypatch) -> list[int]:
    """Counts the calls that load rows (what a cache hit skips)."""
    calls: list[int] = []
    original = dataset.load_standard_rows

    def counting(cfg, tok):
        calls.append(1)
        return original(cfg, tok)

    monkeypatch.setattr(dataset, "load_standard_rows", counting)
    return calls


def same(a, b) -> None:
    assert a.train == b.train and a.eval == b.eval
    assert a.fingerprint == b.fingerprint and a.stats == b.stats


def cache_files(cache_dir: Path) -> list[Path]:
    """The cache entries (the lock files beside them, ``.NAME.lock``, are not entries)."""
    folder = cache_dir / "data"
    return sorted(p for p in folder.glob("*") if not p.name.endswith(".lock")) if folder.exists() else []


def test_miss_then_hit_gives_the_identical_result(tmp_path, tokenizer, loads):
    cfg = data_cfg()
    plain = prepare_data(cfg, tokenizer)  # no cache_dir: nothing cached
    assert loads == [1] and not cache_files(tmp_path)
    first = prepare_data(cfg, tokenizer, cache_dir=tmp_path)
    assert loads == [1, 1]
    files = cache_files(tmp_path)
    assert [f.name for f in files] == [f"{data_cache_key(cfg, tokenizer)}.json"]  # no temporary file left over
    second = prepare_data(cfg, tokenizer, cache_dir=tmp_path)
    assert loads == [1, 1]  # the hit loaded nothing
    same(first, plain)
    same(second, plain)


def test_the_hit_is_independent_of_later_changes_to_the_returned_examples(tmp_path, tokenizer):
    cfg = data_cfg()
    first = prepare_data(cfg, tokenizer, cache_dir=tmp_path)
    for example in first.train:  # the trainer attaches reference log-probs to the examples it gets
        example["ref_chosen_logps"] = -1.0
    second = prepare_data(cfg, tokenizer, cache_dir=tmp_path)
    assert "ref_chosen_logps" not in second.train[0]


@pytest.mark.parametrize(
    "change", [{"n_train": 25}, {"seed": 1}, {"max_length": 32}, {"max_prompt_length": 8}, {"max_eval_rows": 3}]
)
def test_a_changed_data_config_misses(tmp_path, tokenizer, loads, change):
    prepare_data(data_cfg(), tokenizer, cache_dir=tmp_path)
    changed = prepare_data(data_cfg(**change), tokenizer, cache_dir=tmp_path)
    assert loads == [1, 1]
    same(changed, prepare_data(data_cfg(**change), tokenizer))
    assert len(cache_files(tmp_path)) == 2


def test_a_changed_tokenizer_misses(tmp_path, tokenizer, loads):
    cfg = data_cfg()
    before = tokenizer_fingerprint(tokenizer)
    prepare_data(cfg, tokenizer, cache_dir=tmp_path)
    other = models.build_tokenizer(
        {"name": "tiny-llama", "tokenizer": "embedded", "vocab_size": 300}, tmp_path / "tok300"
    )
    assert tokenizer_fingerprint(other) != before
    prepare_data(cfg, other, cache_dir=tmp_path)
    assert loads == [1, 1]
    original_template = tokenizer.chat_template
    try:  # the chat template renders conversational rows: it is part of the key
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        assert tokenizer_fingerprint(tokenizer) != before
        prepare_data(cfg, tokenizer, cache_dir=tmp_path)
        assert loads == [1, 1, 1]
    finally:
        tokenizer.chat_template = original_template
    assert tokenizer_fingerprint(tokenizer) == before
    prepare_data(cfg, tokenizer, cache_dir=tmp_path)
    assert loads == [1, 1, 1]  # back to the original tokenizer: a hit again


def test_a_changed_local_file_misses(tmp_path, tokenizer, loads):
    rows, _ = synthetic.make_preference_data(20, 0, seed=3)
    path = synthetic.write_jsonl(rows, tmp_path / "pairs.jsonl")
    cfg = data_cfg("local", path=str(path), eval_fraction=0.2)
    first = prepare_data(cfg, tokenizer, cache_dir=tmp_path / "cache")
    prepare_data(cfg, tokenizer, cache_dir=tmp_path / "cache")
    assert loads == [1]
    rows[0]["chosen"] = "the changed completion ."
    synthetic.write_jsonl(rows, path)  # new content, size and mtime: the same path no longer hits
    changed = prepare_data(cfg, tokenizer, cache_dir=tmp_path / "cache")
    assert loads == [1, 1]
    assert changed.fingerprint != first.fingerprint
    same(changed, prepare_data(cfg, tokenizer))


def test_hub_sources_are_not_cached(tokenizer):
    assert data_cache_key(DataSettings.from_mapping({"source": "hub", "name": "x"}), tokenizer) is None


@pytest.mark.parametrize("damage", ["truncate", "flip_a_token_id", "garbage", "empty", "other_key"])
def test_a_damaged_cache_file_is_reported_and_rebuilt(tmp_path, tokenizer, loads, caplog, damage):
    cfg = data_cfg()
    good = prepare_data(cfg, tokenizer, cache_dir=tmp_path)
    (path,) = cache_files(tmp_path)
    raw = path.read_bytes()
    header, body = raw.split(b"\n", 1)
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip_a_token_id":  # still valid JSON: only the checksum can tell
        payload = json.loads(body)
        payload["train"][0]["chosen_ids"][0] += 1
        path.write_bytes(header + b"\n" + json.dumps(payload).encode())
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff not json")
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a file renamed onto another key
        meta = json.loads(header)
        path.write_bytes(json.dumps({**meta, "key": "0" * 24}).encode() + b"\n" + body)
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        rebuilt = prepare_data(cfg, tokenizer, cache_dir=tmp_path)
    assert "is unusable" in caplog.text and "rebuilding" in caplog.text
    assert loads == [1, 1]
    same(rebuilt, good)
    assert path.read_bytes() == raw  # rebuilt in place
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        same(prepare_data(cfg, tokenizer, cache_dir=tmp_path), good)
    assert loads == [1, 1] and "unusable" not in caplog.text


def test_a_hit_repeats_the_truncation_warning(tmp_path, tokenizer, caplog):
    cfg = data_cfg(max_length=12, max_prompt_length=4)
    prepare_data(cfg, tokenizer, cache_dir=tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        prepare_data(cfg, tokenizer, cache_dir=tmp_path)
    assert "cached data: skipped 0 rows with bad data, dropped 0 pairs with an empty completion, truncated" in (
        caplog.text
    )


def test_an_unwritable_cache_dir_costs_the_cache_not_the_run(tmp_path, tokenizer, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        prepared = prepare_data(data_cfg(), tokenizer, cache_dir=blocker)
    assert prepared.train and "data not cached" in caplog.text
