"""Tokenization of standard pairs: BOS/EOS, truncation rules, drops, stats, and odd inputs."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from prefopt.data import to_standard, tokenize_pair, tokenize_pairs
from prefopt.data import tokenize as tokenize_module

from ._helpers import BOS, EOS, VOCAB, make_tokenizer, word_ids

UNK = VOCAB["<unk>"]
LIMITS = {"max_length": 100, "max_prompt_length": 50}


def words(start: int, stop: int) -> str:
    return " ".join(f"w{i}" for i in range(start, stop))


def pair(prompt: str, chosen: str, rejected: str) -> dict[str, str]:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_prompt_and_completions_tokenized_separately_with_bos_and_eos(tokenizer: Any) -> None:
    example = pair("w1 w2", " w3", "w4 w5")
    out = tokenize_pair(example, tokenizer, **LIMITS)
    assert out == {
        **example,
        "prompt_ids": [BOS, *word_ids("w1 w2")],
        "chosen_ids": [*word_ids("w3"), EOS],
        "rejected_ids": [*word_ids("w4 w5"), EOS],
        "truncated": False,
    }


def test_no_bos_when_the_tokenizer_does_not_add_one() -> None:
    out = tokenize_pair(pair("w1", "w2", "w3"), make_tokenizer(add_bos=False), **LIMITS)
    assert out["prompt_ids"] == word_ids("w1")


def test_bos_and_eos_are_not_duplicated(tokenizer: Any) -> None:
    out = tokenize_pair(pair("<s> w1", "w2 </s>", "w3"), tokenizer, **LIMITS)
    assert out["prompt_ids"] == [BOS, *word_ids("w1")]
    assert out["chosen_ids"] == [*word_ids("w2"), EOS]


def test_prompt_is_cut_from_the_left_keeping_its_end_and_bos(tokenizer: Any) -> None:
    out = tokenize_pair(pair(words(0, 10), "w20", "w21"), tokenizer, max_length=20, max_prompt_length=4)
    assert out["prompt_ids"] == [BOS, *word_ids("w7 w8 w9")]
    assert out["chosen_ids"] == [*word_ids("w20"), EOS]
    assert out["truncated"] is True


def test_prompt_without_bos_is_cut_to_its_last_tokens() -> None:
    tokenizer = make_tokenizer(add_bos=False)
    out = tokenize_pair(pair(words(0, 10), "w20", "w21"), tokenizer, max_length=20, max_prompt_length=4)
    assert out["prompt_ids"] == word_ids("w6 w7 w8 w9")


def test_completion_is_cut_from_the_right_and_loses_eos_only_when_cut(tokenizer: Any) -> None:
    # prompt [BOS, w1] leaves 3 tokens per completion
    out = tokenize_pair(pair("w1", words(10, 14), "w20 w21"), tokenizer, max_length=5, max_prompt_length=4)
    assert out["prompt_ids"] == [BOS, *word_ids("w1")]
    assert out["chosen_ids"] == word_ids("w10 w11 w12")  # cut: no EOS
    assert out["rejected_ids"] == [*word_ids("w20 w21"), EOS]  # fits exactly: EOS kept
    assert out["truncated"] is True


def test_exact_fit_is_not_truncated(tokenizer: Any) -> None:
    out = tokenize_pair(pair("w1", "w2 w3", "w4"), tokenizer, max_length=5, max_prompt_length=2)
    assert len(out["prompt_ids"]) + len(out["chosen_ids"]) == 5
    assert out["chosen_ids"][-1] == EOS
    assert out["truncated"] is False


def test_completion_without_tokens_drops_the_pair(tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    assert tokenize_pair(pair("w1", "   ", "w2"), tokenizer, **LIMITS) is None
    examples = [pair("w1", "w2", "w3"), pair("w1", "w2", ""), pair(words(0, 60), "w2", "w3")]
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        kept, stats = tokenize_pairs(examples, tokenizer, **LIMITS)
    assert [example["rejected"] for example in kept] == ["w3", "w3"]
    assert stats == {"pairs": 3, "kept": 2, "dropped_empty_completion": 1, "truncated": 1}
    assert [r.getMessage() for r in caplog.records] == [
        "tokenized 3 pairs: dropped 1 with an empty completion, truncated 1 (max_length=100, max_prompt_length=50)"
    ]


def test_no_warning_when_nothing_is_dropped_or_cut(tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        kept, stats = tokenize_pairs([pair("w1", "w2", "w3")], tokenizer, **LIMITS)
    assert stats == {"pairs": 1, "kept": 1, "dropped_empty_completion": 0, "truncated": 0}
    assert caplog.records == []
    assert tokenize_pairs([], tokenizer, **LIMITS) == (
        [],
        {"pairs": 0, "kept": 0, "dropped_empty_completion": 0, "truncated": 0},
    )


def test_batched_tokenization_matches_one_by_one(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenize_module, "_BATCH_SIZE", 2)
    examples = [pair(words(i, i + 7), words(i + 1, i + 2 * i + 2), f"w{i} x") for i in range(5)]
    kept, _ = tokenize_pairs(examples, tokenizer, max_length=9, max_prompt_length=5)
    assert kept == [tokenize_pair(example, tokenizer, max_length=9, max_prompt_length=5) for example in examples]


@pytest.mark.parametrize(
    ("max_length", "max_prompt_length", "fragment"),
    [
        (10, 10, "must be less than max_length"),
        (10, 20, "must be less than"),
        (0, -1, "max_length must be a positive"),
        (10, 0, "max_prompt_length must be a positive"),
        (10.0, 5, "max_length must be a positive integer"),
    ],
)
def test_length_limits_are_validated(tokenizer: Any, max_length: Any, max_prompt_length: Any, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        tokenize_pair(pair("w1", "w2", "w3"), tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    with pytest.raises(ValueError, match=fragment):
        tokenize_pairs([], tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)


def test_tokenizer_without_eos_is_rejected() -> None:
    with pytest.raises(ValueError, match="no eos_token_id"):
        tokenize_pair(pair("w1", "w2", "w3"), make_tokenizer(eos=False), **LIMITS)


def test_huge_and_odd_unicode_strings_convert_and_tokenize(tokenizer: Any) -> None:
    odd = "🙂 👩‍👩‍👧 漢字 e\u0301 \u200b \u202e \ufeff \x00 \U0010ffff 𝔘𝔫𝔦"
    huge = ("w1 🙂 " * 20_000)[:100_000]
    hh = f"\n\nHuman: {huge}\n\nAssistant:"
    example = to_standard({"chosen": hh + odd, "rejected": hh + " " + huge}, source="odd.jsonl", index=0)
    assert example["prompt"] == hh
    out = tokenize_pair(example, tokenizer, max_length=64, max_prompt_length=32)
    assert len(out["prompt_ids"]) == 32
    assert out["prompt_ids"][0] == BOS
    assert len(out["prompt_ids"]) + len(out["rejected_ids"]) == 64
    assert UNK in out["chosen_ids"]
    assert all(isinstance(i, int) for key in ("prompt_ids", "chosen_ids", "rejected_ids") for i in out[key])
