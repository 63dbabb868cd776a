"""Tokenizer and model builders: the embedded tokenizer and its cache, tiny-llama, loading from a local directory."""

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from prefopt import models
from prefopt.cache import atomic_write
from prefopt.data.synthetic import corpus, make_preference_data
from prefopt.models import build_model, build_tokenizer, model_fingerprint, resolve_dtype

TINY = {
    "name": "tiny-llama",
    "tokenizer": "embedded",
    "vocab_size": 300,
    "config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    },
    "dtype": "float32",
    "trust_remote_code": False,
    "init_seed": 0,
}
ROWS = make_preference_data(150, 10, seed=0)[0]


def small_corpus() -> list[str]:
    return corpus(ROWS)


def cfg_with(**changes) -> dict:
    return {**TINY, **changes}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return build_tokenizer(TINY, cache_dir, corpus=small_corpus)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(TINY, tokenizer)


def state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------------- tokenizer


def test_resolve_dtype():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    with pytest.raises(ValueError, match="valid"):
        resolve_dtype("float8")


def test_embedded_tokenizer_special_tokens_and_size(tokenizer):
    assert len(tokenizer) == TINY["vocab_size"]
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    )
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}) == 4


def test_embedded_tokenizer_round_trip(tokenizer):
    for text in [ROWS[0]["prompt"], ROWS[0]["chosen"], " " + ROWS[1]["rejected"], "unseen wörds ok!"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids  # no specials added
        assert tokenizer.decode(ids) == text
    assert len(tokenizer(ROWS[0]["chosen"])["input_ids"]) < len(ROWS[0]["chosen"])  # merges were learned


def test_embedded_tokenizer_chat_template(tokenizer):
    messages = [{"role": "user", "content": "Write a review of the kettle:"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nWrite a review of the kettle:\n<|assistant|>\n"
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "great ."}], tokenize=False)
    assert full.endswith("<|assistant|>\ngreat .\n")


def test_embedded_tokenizer_is_cached_not_retrained(tokenizer, cache_dir, monkeypatch):
    entries = sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock"))  # (the entry's lock)
    assert len(entries) == 1 and entries[0].startswith("tokenizer-")  # no temporary folders left behind

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the tokenizer is cached")

    monkeypatch.setattr(models, "_train_bpe", no_training)
    again = build_tokenizer(OmegaConf.create(TINY), cache_dir, corpus=small_corpus)  # a DictConfig works too
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")) == entries
    text = ROWS[3]["chosen"]
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.chat_template == tokenizer.chat_template
    with pytest.raises(AssertionError, match="retrained"):  # another vocab size is another cache entry
        build_tokenizer(cfg_with(vocab_size=280), cache_dir, corpus=small_corpus)


def test_cache_key_depends_on_corpus_and_size():
    key = models.embedded_tokenizer_key
    assert key(300, ["a b"]) == key(300, ["a b"])
    assert len({key(300, ["a b"]), key(301, ["a b"]), key(300, ["a c"])}) == 3


def test_concurrent_writer_wins(tokenizer, tmp_path):
    target = tmp_path / "tokenizer-x"
    atomic_write(target, lambda tmp: tokenizer.save_pretrained(tmp))
    mtime = (target / "tokenizer.json").stat().st_mtime_ns
    atomic_write(target, lambda tmp: tokenizer.save_pretrained(tmp))  # a later second writer: keeps the first
    assert (target / "tokenizer.json").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer-x"]


def test_pretrained_tokenizer_from_local_dir_gets_pad(tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    no_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    no_pad.save_pretrained(tmp_path)
    loaded = build_tokenizer(cfg_with(name=str(tmp_path), tokenizer=None), tmp_path / "unused")
    assert loaded.pad_token == loaded.eos_token == "</s>"
    assert loaded(ROWS[0]["chosen"])["input_ids"] == tokenizer(ROWS[0]["chosen"])["input_ids"]
    with pytest.warns(UserWarning, match="trust_remote_code"):
        build_tokenizer(cfg_with(tokenizer=str(tmp_path), trust_remote_code=True), tmp_path / "unused")


def test_tiny_llama_needs_a_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="embedded"):
        build_tokenizer(cfg_with(tokenizer=None), tmp_path)


# --------------------------------------------------------------------------------------------------------- model


def test_tiny_llama_builds_and_runs(model, tokenizer):
    assert model.config.vocab_size == len(tokenizer)
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), 32)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.bos_token_id == tokenizer.bos_token_id and model.config.eos_token_id == tokenizer.eos_token_id
    assert not model.config.tie_word_embeddings and model.config.num_hidden_layers == 2
    ids = torch.tensor([tokenizer(ROWS[0]["chosen"])["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_tiny_llama_is_seeded_and_keeps_caller_rng(model, tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    again = build_model(OmegaConf.create(TINY), tokenizer)
    assert torch.equal(torch.rand(5), expected)
    assert state_equal(model, again)
    assert not state_equal(model, build_model(cfg_with(init_seed=1), tokenizer))


def test_tiny_llama_dtype(tokenizer):
    half = build_model(cfg_with(dtype="bfloat16"), tokenizer)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_local_dir_loads_identical_weights(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert list(tmp_path.glob("*.safetensors"))
    loaded = build_model(cfg_with(name=str(tmp_path)), tokenizer)
    assert state_equal(model, loaded)
    assert loaded.config.pad_token_id == tokenizer.pad_token_id
    with pytest.warns(UserWarning, match="trust_remote_code"):
        build_model(cfg_with(name=str(tmp_path), trust_remote_code=True), tokenizer)


def test_tokenizer_larger_than_embeddings_is_rejected(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=True)
    bigger = build_tokenizer(cfg_with(vocab_size=320), tmp_path / "cache", corpus=small_corpus)
    with pytest.raises(ValueError, match="320 tokens"):
        build_model(cfg_with(name=str(tmp_path)), bigger)


def test_fingerprint_tiny_llama(model, tokenizer):
    fp = model_fingerprint(TINY, model)
    assert fp == model_fingerprint(OmegaConf.create(TINY), model) and len(fp) == 16
    other = build_model(cfg_with(init_seed=1), tokenizer)
    assert model_fingerprint(cfg_with(init_seed=1), other) != fp
    assert model_fingerprint(cfg_with(dtype="bfloat16"), model) != fp
    changed = cfg_with(config={**TINY["config"], "intermediate_size": 96})
    assert model_fingerprint(changed, model) != fp


def test_fingerprint_local_dir(model, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg = cfg_with(name=str(tmp_path))
    fp = model_fingerprint(cfg, model)
    assert fp == model_fingerprint(cfg, model) and fp != model_fingerprint(TINY, model)
    weights = next(tmp_path.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert model_fingerprint(cfg, model) != fp
