"""Reference log-probs over each pair's shared length, for LD-DPO (``ld_alpha``, :mod:`losses.modifiers`).

A loss with ``ld_alpha`` set declares ``ref_chosen_shared_logps`` / ``ref_rejected_shared_logps``: the reference's
summed log-probs of the first ``min(|y_w|, |y_l|)`` completion tokens of each side. They depend on the pair, not on
the sequence alone, so they are kept apart from the reference's per-sequence sums: with ``reference.mode=precomputed``
they are computed once before training with the initial policy (= the reference) for every train and eval pair and
cached on disk under their own key (``ref-shared``: a cache of sums is never read as one of these); a pair no table
holds (online samples) and ``reference.mode=live`` use the run's live reference model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from prefopt.batching import collate
from prefopt.cache import cache_key, cached, load_tensors, save_tensors, sequence_key
from prefopt.config import ConfigError
from prefopt.logps import sequence_statistics
from prefopt.providers import MicroBatch, Own, Provider, ProviderContext, register_provider
from prefopt.reference import Reference

__all__ = ["SharedReference", "prefix_logps_of", "NAMES"]

NAMES = ("ref_chosen_shared_logps", "ref_rejected_shared_logps")


@torch.no_grad()
def prefix_logps_of(
    model, sequences: Sequence[dict], prefix_lengths: Sequence[int], pad_id: int, batch_size: int, device
) -> Tensor:
    """Summed log-probs of the first ``prefix_lengths[i]`` completion tokens of each ``{prompt_ids,
    completion_ids}`` row under ``model`` in eval mode, fp32 [N] on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(sequences), batch_size):
            batch = collate(list(sequences[start : start + batch_size]), pad_id).to(device)
            prefix = torch.as_tensor(list(prefix_lengths[start : start + batch_size]), device=device)
            stats = sequence_statistics(
                model, batch.input_ids, batch.attention_mask, batch.completion_mask, prefix_lengths=prefix
            )
            out.append(stats["prefix_logps"].cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def _pair_rows(examples: Sequence[dict]) -> tuple[list[dict], list[int]]:
    """Chosen rows then rejected rows of ``examples`` and each row's shared length."""
    rows = [{"prompt_ids": e["prompt_ids"], "completion_ids": e[f"{side}_ids"]} for side in ("chosen", "rejected")
            for e in examples]  # fmt: skip
    shared = [min(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples]
    return rows, shared + shared


def _key(row: dict, prefix: int) -> tuple[bytes, int]:
    return sequence_key(row["prompt_ids"], row["completion_ids"]), int(prefix)


class SharedReference(Provider):
    """``ref_chosen_shared_logps`` / ``ref_rejected_shared_logps`` of each micro-batch: from the precomputed table
    where it holds the pair, else from the live reference (see the module docstring)."""

    names = NAMES

    def __init__(self, table: dict[tuple[bytes, int], float], reference: Reference | None, batch_size: int):
        self.table, self.reference, self.batch_size = table, reference, batch_size

    def inputs(self, micro: MicroBatch, own: Own) -> dict[str, Tensor]:
        n = len(micro.items)
        rows = micro.rows[: 2 * n]
        lengths = torch.tensor([len(r["completion_ids"]) for r in rows])
        prefix = micro.layout.prefix_lengths(lengths, n).tolist()
        found = [self.table.get(_key(row, k)) for row, k in zip(rows, prefix, strict=True)]
        if all(v is not None for v in found):
            values = torch.tensor(found, dtype=torch.float32)
        elif self.reference is not None and self.reference.model is not None:
            with self.reference.off():
                values = prefix_logps_of(
                    self.reference.model, rows, prefix, self.reference.pad_id, self.batch_size, self.reference.device
                )
        else:
            raise RuntimeError("shared-length reference log-probs of a pair were not precomputed and no model is kept")
        return micro.layout.named(values.to(micro.device), self.names, n)


@register_provider("reference_shared", NAMES)
def _reference_shared(ctx: ProviderContext) -> Provider:
    """The table for every train and eval pair when the run's reference is a precomputed table (computed with the
    initial policy, which is the reference, before training), and the live reference model when there is one."""
    if ctx.reference is None:
        raise ConfigError("ld_alpha needs shared-length reference log-probs, but the run built no reference")
    batch_size = 2 * ctx.settings.trainer.micro_batch_size
    table: dict[tuple[bytes, int], float] = {}
    if ctx.reference.table:
        for split, examples in (("train", ctx.data.train), ("eval", ctx.data.eval)):
            rows, prefix = _pair_rows(examples)

            def compute(rows=rows, prefix=prefix) -> dict[str, Tensor]:
                pad_id = ctx.tokenizer.pad_token_id
                return {"values": prefix_logps_of(ctx.policy, rows, prefix, pad_id, batch_size, ctx.device)}

            def load(file, rows=rows) -> dict[str, Tensor]:
                stored = load_tensors(file)
                if stored["values"].numel() != len(rows):
                    raise ValueError(f"it holds {stored['values'].numel()} rows, the data has {len(rows)}")
                return stored

            key = cache_key("ref-shared", ctx.fingerprint, ctx.data.fingerprint, split)
            path = ctx.cache_dir / "reference" / f"{key}.safetensors"
            stored = cached(path, compute, save=save_tensors, load=load, what="shared-length reference log-probs")
            for row, k, value in zip(rows, prefix, stored["values"].tolist(), strict=True):
                table[_key(row, k)] = value
    live = ctx.reference if ctx.reference.model is not None else None
    return SharedReference(table, live, batch_size)
