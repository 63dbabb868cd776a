"""Token sequences -> one right-padded batch, so the policy runs a single forward per micro-batch.

A sequence is ``{prompt_ids, completion_ids}``; the completion mask marks the tokens whose log-probs count."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Batch", "collate"]


@dataclass
class Batch:
    input_ids: Tensor  # [N, T]
    attention_mask: Tensor  # [N, T]
    completion_mask: Tensor  # [N, T]
    lengths: Tensor  # [N] completion tokens per row

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.completion_mask, self.lengths)))


def collate(sequences: Sequence[dict], pad_id: int) -> Batch:
    width = max(len(s["prompt_ids"]) + len(s["completion_ids"]) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    completion = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        prompt, comp = sequence["prompt_ids"], sequence["completion_ids"]
        n_prompt, n_total = len(prompt), len(prompt) + len(comp)
        input_ids[row, :n_total] = torch.tensor(list(prompt) + list(comp), dtype=torch.long)
        attention[row, :n_total] = 1
        completion[row, n_prompt:n_total] = 1
    return Batch(input_ids, attention, completion, completion.sum(dim=1))
