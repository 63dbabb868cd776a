"""One forward -> per-sequence summed log-probs of completion tokens, accumulated in fp32.

The selective log-softmax runs the LM head only on the hidden states that predict completion tokens, in chunks,
under activation checkpointing: per chunk it forms ``logits = head(h).float()`` and keeps ``logit[target] −
logsumexp(logits)``; backward recomputes the chunk's logits. So no fp32 [B, T, V] tensor (nor a [B, T, V] tensor of
any dtype) is ever held, forward or backward. Models whose logits are not ``lm_head(last_hidden_state)`` (logit
soft-capping or scaling) fall back to the model's own logits, still gathered in fp32 chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["sequence_logps", "selective_log_softmax"]


def _chunk_logps(hidden: Tensor, targets: Tensor, head: torch.nn.Module) -> Tensor:
    logits = head(hidden).float()  # [chunk, V]
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


CHUNK_ELEMENTS = 1 << 24  # fp32 logits per chunk (64 MiB): rows per chunk = this // vocabulary size


def auto_chunk_size(vocab_size: int) -> int:
    """Rows per LM-head chunk so one chunk's fp32 logits stay near 64 MiB (128 rows for a 128k vocabulary)."""
    return max(16, CHUNK_ELEMENTS // max(int(vocab_size), 1))


def selective_log_softmax(
    hidden: Tensor, targets: Tensor, head: torch.nn.Module, chunk_size: int | None = None
) -> Tensor:
    """``log softmax(head(hidden))[target]`` per row, fp32: hidden [M, H], targets [M] -> [M]. ``chunk_size`` rows
    per chunk (default: :func:`auto_chunk_size` of the head's output size)."""
    if chunk_size is None:
        vocab = getattr(head, "out_features", None) or (hidden.shape[-1] if isinstance(head, torch.nn.Identity) else 0)
        chunk_size = auto_chunk_size(vocab) if vocab else 4096
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_logps, h, t, head, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(h, t, head))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def _plain_head(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    scaled = any(getattr(config, key, None) not in (None, 1.0) for key in ("final_logit_softcapping", "logit_scale"))
    return not scaled and hasattr(model, "base_model_prefix") and model.get_output_embeddings() is not None


def sequence_logps(
    model: torch.nn.Module,
    input_ids: Tensor,  # [N, T] prompt + completion, right-padded
    attention_mask: Tensor,  # [N, T]
    completion_mask: Tensor,  # [N, T] 1 on completion tokens (incl. EOS), 0 on prompt and padding
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Summed log-prob of each row's completion tokens, fp32 [N] (one-token shift: position t predicts t + 1)."""
    target_mask = completion_mask[:, 1:].bool()  # [N, T-1]
    targets = input_ids[:, 1:][target_mask]  # [M]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(target_mask)[target_mask]
    if _plain_head(model):
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        token_logps = selective_log_softmax(
            hidden[:, :-1][target_mask], targets, model.get_output_embeddings(), chunk_size
        )
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        token_logps = selective_log_softmax(logits[target_mask], targets, torch.nn.Identity(), chunk_size)
    summed = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    return summed.index_add(0, rows, token_logps)
