"""A tiny offline tokenizer with a chat template, and writers for preference files in every supported type."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pandas as pd
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = [f"w{i}" for i in range(200)] + ["<|", "|>", "system", "user", "assistant", "Human", "Assistant", ":"]
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}
BOS, EOS = VOCAB["<s>"], VOCAB["</s>"]


def make_tokenizer(*, add_bos: bool = True, chat_template: str | None = TEMPLATE, eos: bool = True) -> Any:
    """Word-level tokenizer: one id per whitespace-separated word ``w0``..``w199``, ``<unk>`` for anything else."""
    model = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    specials = {"bos_token": "<s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if eos:
        specials["eos_token"] = "</s>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, **specials)
    tokenizer.chat_template = chat_template
    return tokenizer


def word_ids(text: str) -> list[int]:
    """The ids the tokenizer gives ``text`` made of vocabulary words."""
    return [VOCAB[word] for word in text.split()]


def write_rows(directory: Path, rows: list[dict[str, Any]], suffix: str, name: str = "train") -> Path:
    """Write rows as ``{name}{suffix}``: .jsonl, .jsonl.gz, .json, .parquet or .csv (CSV: string values only)."""
    path = directory / f"{name}{suffix}"
    if suffix in (".jsonl", ".jsonl.gz"):
        text = "".join(json.dumps(row) + "\n" for row in rows)
        path.write_bytes(gzip.compress(text.encode()) if suffix.endswith(".gz") else text.encode())
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        raise ValueError(suffix)
    return path
