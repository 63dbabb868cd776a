"""Supervised warm start: a few hundred next-token steps on the embedded synthetic reviews before preference training.

A random-init model samples noise, so an online run (sample -> score -> learn) has nothing to rank; the DPO paper's
recipe starts every method from an SFT model for the same reason. ``model.sft.steps > 0`` trains the freshly built
model on prompt + completion texts of the synthetic review task (loss on completion tokens only, EOS included) and
caches the weights under ``cache_dir/models``, keyed by the initial weights' fingerprint, the tokenizer and the SFT
settings, so a sweep trains it once. The returned fingerprint names the warm-started weights (it keys the reference
and regularisation caches).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from prefopt.batching import collate
from prefopt.cache import cache_key, cached, load_tensors, save_tensors
from prefopt.data import synthetic
from prefopt.data.tokenize import tokenize_pairs
from prefopt.logps import sequence_logps

__all__ = ["warm_start", "sft_examples"]

log = logging.getLogger("prefopt")


def sft_examples(tokenizer, *, n_rows: int, seed: int, max_length: int, max_prompt_length: int) -> list[dict]:
    """Tokenized ``{prompt_ids, completion_ids}``: both completions of ``n_rows`` synthetic pairs (so the mix of
    sentiment is symmetric), tokenized by the same rules as preference data."""
    rows, _ = synthetic.make_preference_data(n_rows, 0, seed=seed)
    pairs, _ = tokenize_pairs(rows, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    return [
        {"prompt_ids": p["prompt_ids"], "completion_ids": p[key]}
        for p in pairs
        for key in ("chosen_ids", "rejected_ids")
    ]


def warm_start(
    model, tokenizer, sft_cfg: Mapping[str, Any] | None, *, fingerprint: str, cache_dir: Path, device
) -> str:
    """Warm-start ``model`` in place as ``sft_cfg`` says (nothing when absent or ``steps`` is 0); return the
    fingerprint of the resulting weights."""
    if not sft_cfg or not int(sft_cfg.get("steps", 0)):
        return fingerprint
    settings = {k: sft_cfg[k] for k in sorted(sft_cfg)}
    key = cache_key("sft", fingerprint, settings, len(tokenizer))

    def train() -> dict[str, torch.Tensor]:
        examples = sft_examples(
            tokenizer,
            n_rows=int(settings["n_rows"]),
            seed=int(settings["seed"]),
            max_length=int(settings["max_length"]),
            max_prompt_length=int(settings["max_prompt_length"]),
        )
        curve = _train(model, tokenizer.pad_token_id, examples, settings, device)
        log.info("sft warm start: %d steps, token NLL %.3f -> %.3f", len(curve), curve[0], curve[-1])
        return model.state_dict()

    path = Path(cache_dir) / "models" / f"sft-{key}.safetensors"
    weights = cached(path, train, save=save_tensors, load=lambda p: load_tensors(p, str(device)), what="sft warm start")
    model.load_state_dict(weights)
    return key


def _train(model, pad_id: int, examples: list[dict], settings: Mapping[str, Any], device) -> list[float]:
    """AdamW with linear decay on the mean token NLL of completion tokens; seeded, returns the loss per step."""
    steps, batch_size = int(settings["steps"]), int(settings["batch_size"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(settings["lr"]))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / steps)
    rng = random.Random(int(settings["seed"]))
    was_training = model.training
    model.train()
    curve = []
    for _ in range(steps):
        batch = collate(rng.sample(examples, min(batch_size, len(examples))), pad_id).to(device)
        logps = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
        loss = -logps.sum() / batch.lengths.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(loss.item())
    model.train(was_training)
    return curve
