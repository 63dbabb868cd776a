"""The reference policy: one object, chosen once per run and shared by offline training, online sampling and sampled
evaluation — at most one frozen copy of the initial policy per process.

:class:`Reference` answers ``logps(sequences)`` (summed log-probs of ``{prompt_ids, completion_ids}`` rows, fp32)
from, in order: a table of precomputed values (``reference.mode=precomputed``: computed once before training and
cached on disk, keyed by the initial weights and the tokenized data), a short-lived memo of the values the online
source computed when it sampled, and a live frozen copy (``reference.mode=live``, online runs, sampled evaluation).
Tables are keyed by content (:func:`prefopt.cache.sequence_key`), so a lookup never depends on data order.

    reference = Reference.live(policy)                      # a frozen copy
    reference = Reference.precomputed(policy, splits, ...)  # a table; keep_model=True keeps the copy too
    reference.logps(rows)                                   # [N] fp32, rows as the policy sees them

With a fresh LoRA adapter (``adapters="fresh"``) the reference is the policy itself run under
``disable_adapter()``: no copy at all. With a trained adapter (``"trained"``) it is a frozen copy of the policy *with*
that adapter, like a full model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from prefopt.batching import collate
from prefopt.cache import cached, load_tensors, save_tensors, sequence_key
from prefopt.logps import sequence_logps, token_logps

__all__ = ["Reference", "frozen_copy", "logps_of", "token_logps_of"]


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, eval-mode copy of the initial policy."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def logps_of(
    model, sequences: Sequence[dict], pad_id: int, batch_size: int | None, device, buckets: bool | int = True
) -> Tensor:
    """Summed log-probs of ``{prompt_ids, completion_ids}`` rows under ``model``, fp32 [N], on the CPU unless
    ``batch_size`` is None (then one batch, the result left on ``device``); ``buckets`` as in ``sequence_logps``."""
    was_training = model.training
    model.eval()
    out = []
    size = batch_size or max(len(sequences), 1)
    for start in range(0, len(sequences), size):
        batch = collate(sequences[start : start + size], pad_id).to(device)
        values = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask, buckets=buckets)
        out.append(values if batch_size is None else values.cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def token_logps_of(model, sequences: Sequence[dict], pad_id: int, batch_size: int, device) -> list[list[float]]:
    """Per-token log-probs of each ``{prompt_ids, completion_ids}`` row under ``model`` (fp32, one list per row, its
    completion's length), ``batch_size`` rows per forward in eval mode; summing a row gives :func:`logps_of`'s value."""
    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    try:
        for start in range(0, len(sequences), batch_size):
            batch = collate(list(sequences[start : start + batch_size]), pad_id).to(device)
            values, mask = token_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
            lengths = mask.sum(dim=1).long().tolist()
            out += [row[:n] for row, n in zip(values.cpu().tolist(), lengths, strict=True)]
    finally:
        model.train(was_training)
    return out


class Reference:
    """Reference log-probs by table, memo or live model (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module | None,
        *,
        pad_id: int,
        device,
        table: dict[bytes, float] | None = None,
        adapter_off: bool = False,
    ):
        self.model, self.pad_id, self.device = model, pad_id, device
        self.table = table or {}
        self.adapter_off = adapter_off  # model is the LoRA policy itself: run it with its adapters disabled
        self._memo: dict[bytes, float] = {}
        self._token_memo: dict[bytes, list[float]] = {}  # per-token values the online source computed

    @staticmethod
    def _model(policy: torch.nn.Module, adapters: str) -> tuple[torch.nn.Module, bool]:
        """The reference model for ``policy``: itself with adapters disabled (fresh LoRA) or a frozen copy."""
        return (policy, True) if adapters == "fresh" else (frozen_copy(policy), False)

    @classmethod
    def live(cls, policy: torch.nn.Module, *, pad_id: int, device, adapters: str = "none") -> Reference:
        model, off = cls._model(policy, adapters)
        return cls(model, pad_id=pad_id, device=device, adapter_off=off)

    def off(self):
        """The context the reference model runs in: ``disable_adapter()`` for a fresh LoRA policy."""
        return self.model.disable_adapter() if self.adapter_off else contextlib.nullcontext()

    @classmethod
    def precomputed(
        cls,
        policy: torch.nn.Module,
        splits: Iterable[tuple[list[dict], Path]],
        *,
        pad_id: int,
        batch_size: int,
        device,
        keep_model: bool = False,
        adapters: str = "none",
    ) -> Reference:
        """Reference log-probs of both completions of every pair (or the completion of every unpaired row) of each
        ``(examples, cache_file)`` split, computed once with ``policy`` (the initial policy = the reference) or loaded
        from the cache file. ``keep_model`` keeps a model too, for sequences no table holds (samples drawn during
        training). A fresh LoRA policy computes the table as it starts (its adapters are the identity)."""
        table: dict[bytes, float] = {}
        for examples, path in splits:
            # pairs: both completions (stored as "chosen", "rejected"); unpaired rows: the completion ("completion")
            sides = ("completion",) if examples and "completion_ids" in examples[0] else ("chosen", "rejected")
            rows = [
                {"prompt_ids": e["prompt_ids"], "completion_ids": e[f"{side}_ids"]} for side in sides for e in examples
            ]

            n = len(examples)

            def compute(rows=rows, n=n, sides=sides) -> dict[str, Tensor]:
                values = logps_of(policy, rows, pad_id, batch_size, device)
                return {side: values[i * n : (i + 1) * n] for i, side in enumerate(sides)}

            def load(file: Path, n=n, sides=sides) -> dict[str, Tensor]:
                stored = load_tensors(file)
                if any(side not in stored or stored[side].numel() != n for side in sides):
                    raise ValueError(f"it does not hold {'/'.join(sides)} values of the data's {n} rows")
                return stored

            stored = cached(path, compute, save=save_tensors, load=load, what="reference log-probs")
            values = [value for side in sides for value in stored[side].tolist()]
            for row, value in zip(rows, values, strict=True):
                table[sequence_key(row["prompt_ids"], row["completion_ids"])] = value
        model, off = cls._model(policy, adapters) if keep_model else (None, False)
        return cls(model, pad_id=pad_id, device=device, table=table, adapter_off=off)

    @property
    def is_live(self) -> bool:
        """Whether this reference runs a model during training (no table)."""
        return self.model is not None and not self.table

    def token_logps(self, sequences: Sequence[dict]) -> Tensor:
        """[N, L] fp32 per-token reference log-probs of ``sequences`` (left-aligned, zero-padded to the longest
        completion), from the per-token memo (what the online source computed when it sampled) or the live model:
        tables hold only sums."""
        found = None
        if self._token_memo:
            found = [self._token_memo.get(sequence_key(r["prompt_ids"], r["completion_ids"])) for r in sequences]
        if found is not None and all(row is not None for row in found):
            rows = found
        elif self.model is None:
            raise RuntimeError("per-token reference log-probs need a live reference model (online runs have one)")
        else:
            rows = self.token_values(sequences, batch_size=max(len(sequences), 1))
        width = max((len(r) for r in rows), default=0)
        return torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float32, device=self.device)

    def token_values(self, sequences: Sequence[dict], *, batch_size: int) -> list[list[float]]:
        """Per-token log-probs of each row under the live reference model (one list per row, its completion's
        length; ``batch_size`` rows per forward); their sums are :meth:`logps`'s values up to float rounding."""
        if self.model is None:
            raise RuntimeError("per-token reference log-probs need a live reference model (online runs have one)")
        with self.off():
            return token_logps_of(self.model, sequences, self.pad_id, batch_size, self.device)

    def remember(
        self, sequences: Sequence[dict], values: Tensor, tokens: Sequence[Sequence[float]] | None = None
    ) -> None:
        """Keep values just computed for ``sequences`` (online samples) until :meth:`forget`: their sums and, when
        given, their per-token values (then a token loss's step reads them instead of running the model again)."""
        for row, value in zip(sequences, values.tolist(), strict=True):
            self._memo[sequence_key(row["prompt_ids"], row["completion_ids"])] = value
        for row, per_token in zip(sequences, tokens or (), strict=False):
            self._token_memo[sequence_key(row["prompt_ids"], row["completion_ids"])] = list(per_token)

    def forget(self) -> None:
        self._memo.clear()
        self._token_memo.clear()

    def logps(self, sequences: Sequence[dict], *, batch_size: int | None = None, buckets: bool | int = True) -> Tensor:
        """[N] fp32 reference log-probs of ``sequences``: from the table or memo where known, else computed live
        (``batch_size`` rows per forward, None = one forward); on the reference's device unless computed in
        batches."""
        if self.table or self._memo:
            keys = [sequence_key(r["prompt_ids"], r["completion_ids"]) for r in sequences]
            found = [self.table.get(k, self._memo.get(k)) for k in keys]
            if all(v is not None for v in found):
                return torch.tensor(found, dtype=torch.float32, device=self.device)
            if self.model is None:
                missing = next(i for i, v in enumerate(found) if v is None)
                raise RuntimeError(
                    f"reference log-probs of row {missing} were not precomputed and no reference model is kept"
                )
        if self.model is None:
            raise RuntimeError("this reference has neither a table nor a model")
        with self.off():
            return logps_of(self.model, sequences, self.pad_id, batch_size, self.device, buckets=buckets)

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module, alpha: float) -> None:
        """TR-DPO's reference update (Gorbatovski et al. 2024, arXiv 2404.09656): ``π_ref ← α·π + (1 − α)·π_ref``
        on every parameter (α = 1: a hard copy), as TRL's ``SyncRefModelCallback``; parameters by name, so extra
        policy parameters (a value head) are left out. Values remembered from before are forgotten."""
        policy_parameters = dict(policy.named_parameters())
        for name, parameter in self.model.named_parameters():
            parameter.mul_(1.0 - alpha).add_(policy_parameters[name].detach().to(parameter.dtype), alpha=alpha)
        self.forget()
