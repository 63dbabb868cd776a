"""Tokenized pairs -> one padded batch: chosen rows, then rejected rows, then any extra sequences the loss declared
(MPO's regularisation samples), so the policy runs a single forward per micro-batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Batch", "collate"]


@dataclass
class Batch:
    input_ids: Tensor  # [2B + R, T]
    attention_mask: Tensor  # [2B + R, T]
    completion_mask: Tensor  # [2B + R, T]
    lengths: Tensor  # [2B + R] completion tokens per row
    n_pairs: int  # B
    n_extra: int  # R
    inputs: dict[str, Tensor] = field(default_factory=dict)  # per-pair loss inputs carried by the data ([B] / [B, K])

    def to(self, device: torch.device) -> Batch:
        move = {k: v.to(device) for k, v in self.inputs.items()}
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.lengths.to(device),
            self.n_pairs,
            self.n_extra,
            move,
        )


def _pad(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    width = max(len(p) + len(c) for p, c in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    completion = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (prompt, comp) in enumerate(sequences):
        n_prompt, n_total = len(prompt), len(prompt) + len(comp)
        input_ids[row, :n_total] = torch.tensor(prompt + comp, dtype=torch.long)
        attention[row, :n_total] = 1
        completion[row, n_prompt:n_total] = 1
    return input_ids, attention, completion


def collate(
    pairs: Sequence[dict],  # tokenized pairs: prompt_ids, chosen_ids, rejected_ids (+ per-pair loss inputs)
    pad_id: int,
    extra: Sequence[dict] = (),  # extra sequences: prompt_ids, completion_ids
    pair_inputs: Sequence[str] = (),  # per-pair fields to stack into ``Batch.inputs``
) -> Batch:
    sequences = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs]
    sequences += [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    sequences += [(e["prompt_ids"], e["completion_ids"]) for e in extra]
    input_ids, attention, completion = _pad(sequences, pad_id)
    inputs = {name: torch.tensor([p[name] for p in pairs], dtype=torch.float32) for name in pair_inputs}
    return Batch(input_ids, attention, completion, completion.sum(dim=1), len(pairs), len(extra), inputs)
