"""Sampling completions from a causal LM: left-padded batches, seeded, EOS kept on the completions that produced it.

Used for MPO's regularisation samples (from the reference, before training), the online trainer's samples (from
the current policy, every step) and reward selection (from the reference).

:func:`sample_groups` is the online trainer's sampler: k completions per prompt from one prompt forward per
distinct prompt (its KV cache repeated k times), then one token per step for every row: by the lean decoding step
of :mod:`prefopt.decoding` for the Llama family (the model's forward's logits up to float rounding), else by
``model(...)`` with a preallocated KV cache (no concatenation per token); rows that have finished leave the batch
once they are many, the next token is drawn by inverting the CDF at one uniform per row, and the sampling policy's
log-probs of the sampled tokens are read off the decoding logits (no second forward).
:func:`sample_completions` is ``model.generate``.
"""

from __future__ import annotations

import types
from collections.abc import Sequence

import torch

from prefopt.decoding import LeanDecoder, lean_decoder
from prefopt.logps import cache_argument, is_sharded

__all__ = ["sample_completions", "sample_groups", "decode_completions"]


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


@torch.no_grad()
def sample_groups(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    k: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int | str = 0,
    device=None,
) -> tuple[list[list[int]], list[list[float]] | None]:
    """``k`` completions of each prompt, prompt-major (prompt 0's k first): ``(completions, token_logps)``.
    Completions as :func:`sample_completions` gives them (cut after the first EOS, kept); ``token_logps`` the
    model's fp32 log-probs of each sampled token (before temperature and top-p: log π(y_t | x, y_<t)), or None where
    this falls back to ``model.generate`` (sharded models, whose forwards are collectives; a generation config with
    settings this sampler does not apply, such as a repetition penalty). ``batch_size`` bounds the rows decoded
    together (k per prompt). The draw is a pure function of ``seed`` (global RNG state restored afterwards)."""
    if is_sharded(model) or not _plain_generation_config(model):
        repeated = [p for p in prompts for _ in range(k)]
        completions = sample_completions(
            model,
            tokenizer,
            repeated,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            batch_size=batch_size,
            seed=seed,
            device=device,
        )
        return completions, None
    was_training = model.training
    model.eval()
    device = device if device is not None else next(model.parameters()).device
    per_chunk = max(1, batch_size // k)
    completions: list[list[int]] = []
    logps: list[list[float]] = []
    try:
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(_seed_int(seed))
            for start in range(0, len(prompts), per_chunk):
                chunk = [list(p) for p in prompts[start : start + per_chunk]]
                ids, values = _decode(model, tokenizer, chunk, k, max_new_tokens, temperature, top_p, device)
                completions += ids
                logps += values
    finally:
        model.train(was_training)
    return completions, logps


# generation-config fields whose non-default values change what model.generate samples beyond temperature / top-p
_UNSUPPORTED_GENERATION = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "min_new_tokens": None,
    "min_length": 0,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "guidance_scale": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": None,
    "exponential_decay_length_penalty": None,
}


def _plain_generation_config(model) -> bool:
    """Whether ``model.generate`` would sample with temperature / top-p only (what :func:`sample_groups` applies)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return True
    return all(getattr(config, key, default) in (default, None) for key, default in _UNSUPPORTED_GENERATION.items())


def _next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, log_probs: torch.Tensor | None = None
) -> torch.Tensor:
    """One sampled token per row from fp32 ``logits`` [B, V], as ``model.generate`` samples (temperature, then
    top-p keeping at least one token, then a draw from the softmax); greedy when ``temperature`` is 0.
    ``log_probs``: ``log_softmax(logits)`` when the caller has it (temperature 1 and top-p 1 then draw from it)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if log_probs is not None and temperature == 1.0 and top_p >= 1.0:
        return _draw(log_probs.exp())
    scores = logits / temperature if temperature != 1.0 else logits
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return _draw(scores.softmax(dim=-1))


def _draw(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of ``probs`` [B, V], drawn by inverting each row's CDF at a uniform draw: the distribution
    of ``torch.multinomial(probs, 1)`` from one uniform per row (multinomial draws one exponential per entry, most
    of a small model's sampling time). Zero-probability entries are never drawn."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand((probs.shape[0], 1), dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


def _decode(model, tokenizer, prompts: list[list[int]], k: int, max_new_tokens: int, temperature, top_p, device):
    """k completions of each of ``prompts`` and their tokens' log-probs: one forward of the distinct, left-padded
    prompts, their KV cache repeated k times into preallocated buffers, then one forward per new token over the
    rows still running."""
    from transformers import DynamicCache

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.tensor(prompt), 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    name = cache_argument(model)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **{name: cache}
    )
    rows = len(prompts) * k
    length = width + max_new_tokens
    lean = LeanDecoder(model, cache, k, length, mask) if lean_decoder(model, length) else None
    if lean is None:
        _preallocate(cache, k, length)
    logits = out.logits[:, -1].float().repeat_interleave(k, dim=0)
    attention = torch.zeros((rows, width + max_new_tokens), dtype=mask.dtype, device=device)
    attention[:, :width] = mask.repeat_interleave(k, dim=0)
    position = positions[:, -1:].repeat_interleave(k, dim=0) + 1
    tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
    token_logps = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    active = None  # the rows of `tokens` that the decoding batch holds, in order (None: all of them)
    running = torch.ones(rows, dtype=torch.bool, device=device)  # per batch row: no EOS yet
    finish = lengths.clone()  # per batch row: its length once it has produced EOS
    for t in range(max_new_tokens):
        log_probs = torch.log_softmax(logits, dim=-1)
        new = _next_tokens(logits, temperature, top_p, log_probs)
        values = log_probs.gather(1, new[:, None]).squeeze(1)
        # every batch row's token is written; a finished row's tokens after its EOS are cut by its length
        if active is None:
            tokens[:, t], token_logps[:, t] = new, values
        else:
            tokens[active, t], token_logps[active, t] = new, values
        ended = running & (new == eos)
        finish = finish.masked_fill(ended, t + 1)
        running = running & ~ended
        remaining = int(running.sum())
        if remaining == 0 or t + 1 == max_new_tokens:
            break
        if remaining * 4 <= len(running) * 3:  # finished rows leave the batch once they are a quarter of it
            keep = running.nonzero().squeeze(1)
            if active is None:
                lengths, active = finish, torch.arange(rows, device=device)
            else:
                lengths[active] = finish
            lean.select(keep) if lean is not None else cache.batch_select_indices(keep)
            active, new, attention, position = active[keep], new[keep], attention[keep], position[keep]
            running, finish = running[keep], finish[keep]
        new = new.masked_fill(~running, pad)  # finished rows still in the batch are fed padding (model.generate)
        if lean is not None:
            logits = lean.step(new, position).float()
        else:
            attention[:, width + t] = 1
            out = model(
                input_ids=new[:, None],
                attention_mask=attention[:, : width + t + 1],
                position_ids=position,
                use_cache=True,
                **{name: cache},
            )
            logits = out.logits[:, -1].float()
        position = position + 1
    if active is None:
        lengths = finish
    else:
        lengths[active] = finish
    tokens, token_logps, lengths = tokens.cpu().tolist(), token_logps.cpu().tolist(), lengths.tolist()
    return (
        [row[:n] for row, n in zip(tokens, lengths, strict=True)],
        [row[:n] for row, n in zip(token_logps, lengths, strict=True)],
    )


def _buffered_update(layer, key_states, value_states, *args, **kwargs):
    """A full-attention cache layer's update into buffers of the final length: each token is written in place and
    the layer exposes views of the filled part (``DynamicLayer`` concatenates, copying the whole cache per token)."""
    filled, new = layer.filled, key_states.shape[-2]
    layer.key_buffer[:, :, filled : filled + new].copy_(key_states)
    layer.value_buffer[:, :, filled : filled + new].copy_(value_states)
    layer.filled = filled + new
    layer.keys = layer.key_buffer[:, :, : layer.filled]
    layer.values = layer.value_buffer[:, :, : layer.filled]
    return layer.keys, layer.values


def _buffered_select(layer, indices):
    """Keep the batch rows ``indices`` (finished rows leave the decoding batch)."""
    layer.key_buffer, layer.value_buffer = layer.key_buffer[indices], layer.value_buffer[indices]
    layer.keys = layer.key_buffer[:, :, : layer.filled]
    layer.values = layer.value_buffer[:, :, : layer.filled]


def _preallocate(cache, k: int, length: int) -> None:
    """Repeat every layer's prompt cache k times (prompt-major); plain full-attention layers move into preallocated
    buffers of ``length`` positions, any other kind of layer is repeated as it is."""
    from transformers.cache_utils import DynamicLayer

    for layer in cache.layers:
        if type(layer) is not DynamicLayer or layer.keys is None or layer.keys.numel() == 0:
            layer.batch_repeat_interleave(k)
            continue
        batch, heads, filled, dim = layer.keys.shape
        layer.key_buffer = layer.keys.new_empty((batch * k, heads, length, dim))
        layer.value_buffer = layer.values.new_empty((batch * k, heads, length, layer.values.shape[-1]))
        layer.key_buffer[:, :, :filled] = layer.keys.repeat_interleave(k, dim=0)
        layer.value_buffer[:, :, :filled] = layer.values.repeat_interleave(k, dim=0)
        layer.filled = filled
        layer.keys, layer.values = layer.key_buffer[:, :, :filled], layer.value_buffer[:, :, :filled]
        layer.update = types.MethodType(_buffered_update, layer)
        layer.batch_select_indices = types.MethodType(_buffered_select, layer)


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
