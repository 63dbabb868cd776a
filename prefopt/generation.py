"""Sampling completions from a causal LM: left-padded batches, seeded, EOS kept on the completions that produced it.

Used for MPO's regularisation samples (from the reference, before training), the online trainer's samples (from
the current policy, every step) and reward selection (from the reference).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prefopt.logps import is_sharded

__all__ = ["sample_completions", "decode_completions"]


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int | str = 0,
    device=None,
) -> list[list[int]]:
    """One sampled completion per prompt (repeat a prompt for more samples): token ids, cut after the first EOS
    (kept), possibly empty. ``temperature`` 0 means greedy. The draw is a pure function of ``seed`` (global RNG
    state is restored afterwards), so a resumed run samples the same completions."""
    was_training = model.training
    model.eval()
    device = device if device is not None else next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # a sharded model gathers its parameters in every forward, a collective: each process keeps stepping until all
    # have finished (transformers' synced_gpus), so they run the same forwards
    synced = is_sharded(model) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(_seed_int(seed))
        for start in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[start : start + batch_size]]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, prompt in enumerate(chunk):
                ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.tensor(prompt), 1
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
                synced_gpus=synced,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )
            for new in generated[:, width:].tolist():
                out.append(new[: new.index(eos) + 1] if eos in new else new)
    model.train(was_training)
    return out


def decode_completions(tokenizer, completions: Sequence[Sequence[int]]) -> tuple[list[str], list[list[str]]]:
    """(texts, pieces): each completion's text without special tokens, and the text piece of each of its tokens
    (special tokens give ``""``), so reward functions can place per-token scores."""
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([list(c) for c in completions], skip_special_tokens=True)
    vocab_pieces: dict[int, str] = {}
    pieces = []
    for completion in completions:
        row = []
        for token in completion:
            if token not in vocab_pieces:
                vocab_pieces[token] = "" if token in special else tokenizer.decode([token])
            row.append(vocab_pieces[token])
        pieces.append(row)
    return texts, pieces


def _seed_int(seed: int | str) -> int:
    if isinstance(seed, int):
        return seed
    import hashlib

    return int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:8], "little") & ((1 << 63) - 1)
