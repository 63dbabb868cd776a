"""One forward -> per-sequence summed log-probs of completion tokens, accumulated in fp32.

The selective log-softmax runs the LM head only on the hidden states that predict completion tokens, in chunks,
under activation checkpointing: per chunk it forms ``logits = head(h).float()`` and keeps ``logit[target] −
logsumexp(logits)``; backward recomputes the chunk's logits. So no fp32 [B, T, V] tensor (nor a [B, T, V] tensor of
any dtype) is ever held, forward or backward. Models whose logits are not ``lm_head(last_hidden_state)`` (logit
soft-capping or scaling) fall back to the model's own logits, still gathered in fp32 chunks; so do FSDP2-sharded
models (:func:`is_sharded`), whose parameters are gathered by hooks on the whole model's forward, with one forward per
call (no length buckets: every process must run the same forwards).

Length buckets: a padded batch wastes the compute of every pad position (chosen and rejected rows of one batch often
differ by 2-4x in length). ``sequence_logps`` therefore sorts the rows by length and runs the backbone on groups of
rows cut to their own longest row (:func:`plan_buckets` picks the groups: fewest padded tokens plus a per-forward
overhead). The result is the same per row (attention is masked, positions are unchanged: right padding), only the
rounding of the matrix products may differ; all groups' hidden states then go through one selective log-softmax.
Where the logits are small (vocabulary x target tokens <= 4M elements, 16 MiB) they are kept for backward instead of
recomputed under checkpointing.

Shared prompts: rows that share a prompt (an online group's k samples, a pair's chosen and rejected) compute it k
times in a row-wise forward. With buckets on, such rows run their distinct prompts once (one forward, KV cache kept,
with gradient) and then their completions, in length buckets, as continuations of their own prompt's cache: the
same positions and masks, so the same values up to the matrix products' rounding; gradients reach the prompt through
its cache. Chosen where it computes fewer tokens (padding included, plus the per-forward overhead) than the rows'
own buckets, and where the cache can carry a prompt: full-attention layers, no gradient checkpointing in a backward.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["sequence_logps", "sequence_statistics", "selective_log_softmax", "plan_buckets", "bucket_overhead"]


def _chunk_logps(hidden: Tensor, targets: Tensor, head: torch.nn.Module) -> Tensor:
    logits = head(hidden).float()  # [chunk, V]
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunk_logps_sum_sq(hidden: Tensor, targets: Tensor, head: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """``_chunk_logps`` and, without gradient, ``log Σ_v p_v² = logsumexp(2z) − 2·logsumexp(z)`` of each row."""
    logits = head(hidden).float()  # [chunk, V]
    log_z = torch.logsumexp(logits, dim=-1)
    detached = logits.detach()
    log_sum_sq = torch.logsumexp(2 * detached, dim=-1) - 2 * log_z.detach()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - log_z, log_sum_sq


CHUNK_ELEMENTS = 1 << 24  # fp32 logits per chunk (64 MiB): rows per chunk = this // vocabulary size
KEEP_ELEMENTS = 1 << 22  # logits up to this many elements (16 MiB fp32) are kept for backward, not recomputed
BUCKET_OVERHEAD = {"cpu": 64, "cuda": 2048}  # one more forward costs about this many padded tokens (see plan_buckets)


def auto_chunk_size(vocab_size: int) -> int:
    """Rows per LM-head chunk so one chunk's fp32 logits stay near 64 MiB (128 rows for a 128k vocabulary)."""
    return max(16, CHUNK_ELEMENTS // max(int(vocab_size), 1))


def selective_log_softmax(
    hidden: Tensor, targets: Tensor, head: torch.nn.Module, chunk_size: int | None = None, *, log_sum_sq: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """``log softmax(head(hidden))[target]`` per row, fp32: hidden [M, H], targets [M] -> [M]. ``chunk_size`` rows
    per chunk (default: :func:`auto_chunk_size` of the head's output size). ``log_sum_sq``: also ``log Σ_v p_v²`` per
    row ([M], no gradient; WPO's weights), from the same chunks."""
    vocab = getattr(head, "out_features", None) or (hidden.shape[-1] if isinstance(head, torch.nn.Identity) else 0)
    if chunk_size is None:
        chunk_size = auto_chunk_size(vocab) if vocab else 4096
    pieces = []
    keep = bool(vocab) and hidden.shape[0] <= chunk_size and hidden.shape[0] * vocab <= KEEP_ELEMENTS
    chunk_fn = _chunk_logps_sum_sq if log_sum_sq else _chunk_logps
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad and not keep:
            pieces.append(checkpoint(chunk_fn, h, t, head, use_reentrant=False))
        else:
            pieces.append(chunk_fn(h, t, head))
    if not log_sum_sq:
        return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32), hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces]).detach()


def bucket_overhead(device: torch.device | str) -> int:
    """The default per-forward overhead (padded tokens) of :func:`plan_buckets` on this device type."""
    return BUCKET_OVERHEAD.get(torch.device(device).type, BUCKET_OVERHEAD["cuda"])


def plan_buckets(lengths: list[int] | Tensor, overhead: int) -> list[list[int]]:
    """Split rows into groups, each run as one forward cut to its longest row: the partition of the rows sorted by
    length into contiguous groups that minimises sum(rows x longest row) + overhead x groups (exact, by dynamic
    programming over the sorted lengths). Returns row indices per group, shortest group first."""
    lengths = np.asarray(lengths.tolist() if isinstance(lengths, Tensor) else lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(lengths, kind="stable")
    longest = lengths[order]
    best = np.zeros(n + 1)  # best[j]: cost of the first j sorted rows
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):  # the last group is rows i..j-1 (sorted), padded to longest[j - 1]
        costs = best[:j] + (j - np.arange(j)) * longest[j - 1] + overhead
        cut[j] = int(np.argmin(costs))
        best[j] = costs[cut[j]]
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j].tolist())
        j = int(cut[j])
    return groups[::-1]


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is the root of an FSDP2 (``fully_shard``) model: its parameters are gathered by hooks on
    its own forward, so it must be called whole (backbone + head), never its backbone and head separately."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def cache_argument(model) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _plain_head(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    scaled = any(getattr(config, key, None) not in (None, 1.0) for key in ("final_logit_softcapping", "logit_scale"))
    return not scaled and hasattr(model, "base_model_prefix") and model.get_output_embeddings() is not None


def _completion_logps(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    chunk_size: int | None,
    buckets: bool | int,
    log_sum_sq: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None] | None:
    """fp32 log-probs of every completion token (one-token shift), with the row of each, its position within its
    row's completion (0 = first completion token) and, with ``log_sum_sq``, ``log Σ_v p_v²`` of its next-token
    distribution (no gradient; else None); None when no row has a completion token."""
    sharded = is_sharded(model)
    if hasattr(model, "get_base_model") and not sharded:  # a peft model: its base runs the injected adapter layers
        model = model.get_base_model()
    n_rows = input_ids.shape[0]
    plain = not sharded and _plain_head(model)  # FSDP's hooks gather parameters only in the root's own forward
    backbone = getattr(model, model.base_model_prefix) if plain else model
    groups: list[list[int] | None] = [None]  # None: the whole padded batch
    states, targets, rows, places = [], [], [], []
    if buckets is not False and n_rows > 1 and not sharded:  # sharded: every process runs the same forwards
        lengths = attention_mask.sum(dim=1)
        columns = torch.arange(input_ids.shape[1], device=lengths.device)
        if bool((attention_mask.bool() == (columns < lengths[:, None])).all()):  # cutting columns: right padding
            overhead = bucket_overhead(input_ids.device) if buckets is True else int(buckets)
            lengths = lengths.tolist()
            groups = plan_buckets(lengths, overhead)
            whole_cost = _cost(groups, lengths, overhead)
            shared = _shared_prompts(model, input_ids, completion_mask, lengths, overhead, whole_cost)
            if shared is not None:  # rows sharing a prompt: it runs once, the completions continue from its cache
                groups = []
                states, targets, rows, places = _shared_prompt_forwards(backbone, plain, input_ids, shared, overhead)
    for group in groups:
        if group is None:
            ids, attention, completion, index = input_ids, attention_mask, completion_mask, None
        else:
            index = torch.tensor(group, device=input_ids.device)
            width = max(max(lengths[i] for i in group), 1)
            ids, attention, completion = (t[index, :width] for t in (input_ids, attention_mask, completion_mask))
        target_mask = completion[:, 1:].bool()  # [n, T-1]
        if not target_mask.any() and not sharded:
            continue
        row_ids = torch.arange(ids.shape[0], device=ids.device) if index is None else index
        rows.append(row_ids[:, None].expand_as(target_mask)[target_mask])
        places.append((target_mask.long().cumsum(dim=1) - 1)[target_mask])
        targets.append(ids[:, 1:][target_mask])
        out = backbone(input_ids=ids, attention_mask=attention, use_cache=False)
        hidden = out.last_hidden_state if plain else out.logits
        states.append(hidden[:, :-1][target_mask])
    if not states or not sum(len(t) for t in targets):
        return None
    head = model.get_output_embeddings() if plain else torch.nn.Identity()
    if log_sum_sq:
        values, sum_sq = selective_log_softmax(_cat(states), _cat(targets), head, chunk_size, log_sum_sq=True)
        return values, _cat(rows), _cat(places), sum_sq
    return selective_log_softmax(_cat(states), _cat(targets), head, chunk_size), _cat(rows), _cat(places), None


def _shared_prompts(
    model, input_ids: Tensor, completion_mask: Tensor, lengths: list[int], overhead: int, whole_cost: int
):
    """``(prompt_of_row [N], starts [N], ends [N], prompt_rows [P])`` when rows (right-padded, of ``lengths``)
    share prompts and running each distinct prompt once, then the completions in length buckets, computes fewer
    tokens (padding included, plus ``overhead`` per forward) than the rows' own buckets (``whole_cost``), else None.
    ``starts``: each row's prompt length (its first completion column), ``ends``: its length; ``prompt_rows``: one
    row holding each distinct prompt. Needs a completion right after the prompt (up to the row's end), a non-empty
    prompt, a cache made of full-attention layers and no gradient checkpointing in a backward (it drops the cache)."""
    inner = getattr(model, "module", model)  # DDP: the wrapped model (its forwards still go through the wrapper)
    checkpointing = getattr(inner, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers before is_activation_checkpointing
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    if torch.is_grad_enabled() and checkpointing:
        return None
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    ends = torch.tensor(lengths, device=input_ids.device)
    starts = completion_mask.int().argmax(dim=1)
    expected = (columns >= starts[:, None]) & (columns < ends[:, None])
    if not bool((completion_mask.bool() == expected).all() and (starts > 0).all() and (ends > starts).all()):
        return None
    ids, start_list = input_ids.cpu().numpy(), starts.tolist()
    distinct: dict[bytes, int] = {}
    prompt_of, prompt_rows = [], []
    for row, start in enumerate(start_list):
        index = distinct.setdefault(ids[row, :start].tobytes(), len(distinct))
        if index == len(prompt_rows):
            prompt_rows.append(row)
        prompt_of.append(index)
    # the prompts once (padded to the longest, one forward), then the completions' own buckets
    completion_lengths = [end - start for end, start in zip(lengths, start_list, strict=True)]
    prompt_cost = len(prompt_rows) * max(start_list[row] for row in prompt_rows) + overhead
    if prompt_cost + _cost(plan_buckets(completion_lengths, overhead), completion_lengths, overhead) >= whole_cost:
        return None
    if not _full_attention_cache(inner):
        return None
    device = input_ids.device
    return torch.tensor(prompt_of, device=device), starts, ends, torch.tensor(prompt_rows, device=device)


def _cost(groups: list[list[int]], lengths: list[int], overhead: int) -> int:
    """Padded tokens plus ``overhead`` per forward of running ``lengths`` as ``groups`` (:func:`plan_buckets`)."""
    return sum(len(group) * max(lengths[i] for i in group) + overhead for group in groups)


def _full_attention_cache(model) -> bool:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)
    except Exception:  # a config the cache cannot be built from
        return False


def _shared_prompt_forwards(backbone, plain: bool, input_ids: Tensor, shared, overhead: int):
    """Each distinct prompt's forward once (its KV cache), then each length bucket of completions as a
    continuation of its rows' prompt caches: the same hidden states as the full rows' forward (positions and masks
    unchanged), with the prompt computed once per group of rows. Returns the per-token (states, targets, rows,
    places) lists of :func:`_completion_logps`."""
    from transformers import DynamicCache

    prompt_of, starts, ends, prompt_rows = shared
    inner = getattr(backbone, "module", backbone)  # DDP: called through the wrapper, read through it
    config = inner.config
    device, name = input_ids.device, cache_argument(inner)
    prompt_lengths = starts[prompt_rows]
    width = int(prompt_lengths.max())
    prompt_mask = (torch.arange(width, device=device) < prompt_lengths[:, None]).long()
    cache = DynamicCache(config=config)
    out = backbone(input_ids=input_ids[prompt_rows, :width], attention_mask=prompt_mask, **{name: cache})
    prompt_hidden = out.last_hidden_state if plain else out.logits  # [P, width, ·]
    first = prompt_hidden[prompt_of, starts - 1]  # each row's last prompt state: predicts its first completion token
    prompt_states = [(layer.keys, layer.values) for layer in cache.layers]
    lengths = (ends - starts).tolist()
    states, targets, rows, places = [], [], [], []
    for group in plan_buckets(lengths, overhead):
        index = torch.tensor(group, device=device)
        span = max(lengths[i] for i in group)
        steps = torch.arange(span, device=device)
        inside = steps < (ends - starts)[index, None]  # [n, span] real completion tokens
        columns = (starts[index, None] + steps).clamp(max=input_ids.shape[1] - 1)
        ids = input_ids[index[:, None], columns]
        continued = DynamicCache(config=config)
        for layer, (keys, values) in enumerate(prompt_states):
            continued.update(keys[prompt_of[index]], values[prompt_of[index]], layer)
        out = backbone(
            input_ids=ids,
            attention_mask=torch.cat([prompt_mask[prompt_of[index]], inside.long()], dim=1),
            position_ids=starts[index, None] + steps,
            **{name: continued},
        )
        hidden = out.last_hidden_state if plain else out.logits  # [n, span, ·]: position j predicts token j + 1
        predictors = torch.cat([first[index, None], hidden[:, :-1]], dim=1)
        states.append(predictors[inside])
        targets.append(ids[inside])
        rows.append(index[:, None].expand_as(inside)[inside])
        places.append(steps.expand_as(inside)[inside])
    return states, targets, rows, places


def sequence_logps(
    model: torch.nn.Module,
    input_ids: Tensor,  # [N, T] prompt + completion, right-padded
    attention_mask: Tensor,  # [N, T]
    completion_mask: Tensor,  # [N, T] 1 on completion tokens (incl. EOS), 0 on prompt and padding
    *,
    chunk_size: int | None = None,
    buckets: bool | int = True,
) -> Tensor:
    """Summed log-prob of each row's completion tokens, fp32 [N] (one-token shift: position t predicts t + 1).

    ``buckets``: True = length buckets with the device's default overhead (:func:`bucket_overhead`), an int = that
    overhead in padded tokens, False = one forward over the whole padded batch."""
    summed = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    found = _completion_logps(model, input_ids, attention_mask, completion_mask, chunk_size, buckets)
    if found is None:
        return summed
    token_logps, rows, _, _ = found
    return summed.index_add(0, rows, token_logps)


def sequence_statistics(
    model: torch.nn.Module,
    input_ids: Tensor,  # [N, T] prompt + completion, right-padded
    attention_mask: Tensor,  # [N, T]
    completion_mask: Tensor,  # [N, T]
    *,
    prefix_lengths: Tensor | None = None,  # [N] completion tokens per row that "prefix_logps" sums
    log_sum_sq: bool = False,
    chunk_size: int | None = None,
    buckets: bool | int = True,
) -> dict[str, Tensor]:
    """:func:`sequence_logps` (``"logps"``) and, from the same forward and chunked head, per row, fp32 [N]:
    ``"prefix_logps"``, the summed log-probs of the first ``prefix_lengths[i]`` completion tokens (LD-DPO's shared
    length), and with ``log_sum_sq`` ``"log_sum_sq_probs"``, ``Σ_t log Σ_v p_v(t)²`` over the completion tokens
    (no gradient; WPO's weights). No [B, T, V] tensor is held for either."""
    n = input_ids.shape[0]
    zeros = lambda: torch.zeros(n, dtype=torch.float32, device=input_ids.device)  # noqa: E731
    out = {"logps": zeros()}
    if prefix_lengths is not None:
        out["prefix_logps"] = zeros()
    if log_sum_sq:
        out["log_sum_sq_probs"] = zeros()
    found = _completion_logps(model, input_ids, attention_mask, completion_mask, chunk_size, buckets, log_sum_sq)
    if found is None:
        return out
    values, rows, places, sum_sq = found
    out["logps"] = out["logps"].index_add(0, rows, values)
    if prefix_lengths is not None:
        inside = places < prefix_lengths.to(places.device)[rows]
        out["prefix_logps"] = out["prefix_logps"].index_add(0, rows, values * inside)
    if log_sum_sq:
        out["log_sum_sq_probs"] = out["log_sum_sq_probs"].index_add(0, rows, sum_sq)
    return out


def token_logps(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    chunk_size: int | None = None,
    buckets: bool | int = True,
) -> tuple[Tensor, Tensor]:
    """Per-token completion log-probs, fp32 ``[N, L]`` left-aligned (column 0 = each row's first completion token,
    L = the longest completion), and the ``[N, L]`` mask of real tokens; summing a row over its mask gives
    :func:`sequence_logps`. Same forward, buckets and chunked head."""
    n = input_ids.shape[0]
    found = _completion_logps(model, input_ids, attention_mask, completion_mask, chunk_size, buckets)
    if found is None:
        empty = torch.zeros((n, 0), dtype=torch.float32, device=input_ids.device)
        return empty, empty
    values, rows, places, _ = found
    width = int(places.max()) + 1
    out = torch.zeros((n, width), dtype=values.dtype, device=values.device)
    mask = torch.zeros((n, width), dtype=values.dtype, device=values.device)
    out = out.index_put((rows, places), values)
    mask = mask.index_put((rows, places), torch.ones_like(values))
    return out, mask


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
