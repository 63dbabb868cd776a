"""The reference policy, as the loss declares it: precomputed log-probs cached on disk (default), a live frozen copy,
or nothing at all for reference-free losses. Also MPO's regularisation samples, generated from the reference before
training and cached with their reference log-probs.

Caches are keyed by a hash of what produced them (initial weights, tokenized data, generation settings), so one
cache serves every run of a sweep over losses and β.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prefopt.batching import collate
from prefopt.generation import sample_completions
from prefopt.logps import sequence_logps

__all__ = [
    "logps_of",
    "frozen_copy",
    "precompute_reference_logps",
    "generate_regularization",
    "sample_extra",
    "cache_key",
]


def cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A live reference: a frozen, eval-mode copy of the initial policy."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


@torch.no_grad()
def logps_of(model, sequences: Sequence[dict], pad_id: int, batch_size: int, device) -> torch.Tensor:
    """Summed log-probs of ``(prompt_ids, completion_ids)`` sequences under ``model``, fp32 [N]."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(sequences), batch_size):
        batch = collate([], pad_id, extra=sequences[start : start + batch_size]).to(device)
        out.append(sequence_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def precompute_reference_logps(
    model, examples: list[dict], *, pad_id: int, batch_size: int, device, cache: Path
) -> None:
    """Attach ``ref_chosen_logps`` / ``ref_rejected_logps`` to every example: loaded from ``cache`` if present, else
    computed once with ``model`` (the initial policy = the reference) and saved there."""
    if cache.exists():
        stored = load_file(str(cache))
    else:
        sequences = [
            {"prompt_ids": e["prompt_ids"], "completion_ids": e[key]}
            for key in ("chosen_ids", "rejected_ids")
            for e in examples
        ]
        logps = logps_of(model, sequences, pad_id, batch_size, device)
        stored = {"chosen": logps[: len(examples)], "rejected": logps[len(examples) :]}
        _save_atomic(stored, cache)
    if stored["chosen"].numel() != len(examples):
        raise RuntimeError(f"reference cache {cache} holds {stored['chosen'].numel()} rows, data has {len(examples)}")
    for example, chosen, rejected in zip(examples, stored["chosen"].tolist(), stored["rejected"].tolist(), strict=True):
        example["ref_chosen_logps"], example["ref_rejected_logps"] = chosen, rejected


@torch.no_grad()
def generate_regularization(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    seed: int,
    device,
    cache: Path,
) -> list[dict]:
    """MPO's regularisation data: completions sampled from the reference for each distinct prompt, with their
    reference log-probs (``ref_logps``), cached at ``cache``. Generation is left-padded and seeded."""
    if cache.exists():
        stored = load_file(str(cache))
        return _unpack(stored)
    unique = [list(p) for p in dict.fromkeys(tuple(p) for p in prompts)] * samples_per_prompt
    completions = sample_completions(
        model,
        tokenizer,
        unique,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
        device=device,
    )
    samples = [{"prompt_ids": p, "completion_ids": c} for p, c in zip(unique, completions, strict=True) if c]
    ref = logps_of(model, samples, tokenizer.pad_token_id, batch_size, device)
    for sample, value in zip(samples, ref.tolist(), strict=True):
        sample["ref_logps"] = value
    _save_atomic(_pack(samples), cache)
    return samples


def _pack(samples: list[dict]) -> dict[str, torch.Tensor]:
    lengths = lambda key: torch.tensor([len(s[key]) for s in samples], dtype=torch.long)  # noqa: E731
    flat = lambda key: torch.tensor([t for s in samples for t in s[key]], dtype=torch.long)  # noqa: E731
    return {
        "prompt_lengths": lengths("prompt_ids"),
        "prompt_ids": flat("prompt_ids"),
        "completion_lengths": lengths("completion_ids"),
        "completion_ids": flat("completion_ids"),
        "ref_logps": torch.tensor([s["ref_logps"] for s in samples], dtype=torch.float32),
    }


def _unpack(stored: dict[str, torch.Tensor]) -> list[dict]:
    prompts = torch.split(stored["prompt_ids"], stored["prompt_lengths"].tolist())
    completions = torch.split(stored["completion_ids"], stored["completion_lengths"].tolist())
    return [
        {"prompt_ids": p.tolist(), "completion_ids": c.tolist(), "ref_logps": r}
        for p, c, r in zip(prompts, completions, stored["ref_logps"].tolist(), strict=True)
    ]


def sample_extra(pool: Sequence[dict], count: int, *, seed: int, step: int, micro: int) -> list[dict]:
    """``count`` regularisation samples for one micro-batch, a pure function of (seed, step, micro) so a resumed run
    draws the same ones."""
    rng = random.Random(f"{seed}/{step}/{micro}")
    return [pool[rng.randrange(len(pool))] for _ in range(count)]
