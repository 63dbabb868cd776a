"""Training unpaired losses (kind ``"unpaired"``: ``kto``, ``apo_zero_unpaired``, ``upo`` over them) offline.

* :class:`UnpairedLayout` — the step's rows for single completions ``{prompt_ids, completion_ids, label}``: one row
  each, named ``policy_logps [N]``, ``lengths [N]``, ``labels [N]`` (bool, True = desirable).
* :class:`UnpairedSource` — the offline source of unpaired rows: ``batch_size`` rows per step in a seeded per-epoch
  order, as for pairs, each row carrying the completion of its **mismatched pair** (``kl_completion_ids``).
* the ``kl_pairs`` provider (:class:`KLPairs`) — KTO's KL reference point inputs ``policy_kl_logps`` and
  ``ref_kl_logps``, built only when the loss declares them.

**Mismatched pairs, as TRL builds them.** TRL 1.16's ``KTOTrainer`` rotates the completions by one within each
per-device batch: ``(x_1, y_n), (x_2, y_1), …, (x_n, y_{n−1})`` (``add_kl_completion_ids``, a ``map`` over chunks of
``per_device_train_batch_size`` rows of the training set, which it then reads in order with a sequential sampler),
so the mismatched completions of a batch are that batch's own completions, paired with other prompts. Here the same
rotation runs over the **whole step's batch** (``trainer.batch_size`` rows, all processes and micro-batches
together), in the order the source draws it: with one process and no accumulation that is TRL's pairing with
``per_device_train_batch_size = batch_size``. The evaluation rows are paired the same way within consecutive blocks of
``batch_size`` eval rows (TRL maps its eval set in blocks of ``per_device_train_batch_size`` too); a last block of one
row joins the block before it.

**The reference point is a statistic of the step.** ``z₀ = max(0, mean_j [S_θ − S_ref](x_j, y'_j))`` is taken over
the step's ``batch_size`` mismatched pairs, whatever the split: before the step's first micro-batch each process
computes the policy's (under ``no_grad``, as TRL) and the reference's log-probs of the pairs of its own rows, the
values are gathered over processes, and every micro-batch's loss gets all of them. So 1 process, gradient
accumulation and 2 processes see the same z₀ and the same loss (the rows' losses are independent given z₀, and the
loss is their mean). TRL instead computes a mean per micro-batch and averages those means over processes (a
micro-batch's z₀ differs between its accumulation steps). At an evaluation z₀ is taken over the whole eval set at the
evaluated policy. The price is one no-grad forward of the step's mismatched pairs before its micro-batches (TRL runs
the same forward inside each micro-batch).

**Reference log-probs.** With ``reference.mode=precomputed`` (the default) the reference's values of the rows come
from the table computed once before training (:meth:`prefopt.reference.Reference.precomputed`), and those of every
mismatched pair the run will draw — the order is seeded, so the pairs of all ``max_steps`` steps are known in advance —
are computed once too and cached (``cache_dir/reference/kl-*``, keyed by the initial weights, the data, the seed, the
batch size and the step count). ``reference.mode=live`` computes them with the frozen copy at each step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from prefopt.batching import collate
from prefopt.cache import cache_key, cached, load_tensors, save_tensors, sequence_key
from prefopt.config import ConfigError
from prefopt.logps import sequence_logps
from prefopt.providers import MicroBatch, Own, Provider, ProviderContext, register_provider
from prefopt.reference import Reference, logps_of
from prefopt.sources import Draw, OfflineSource, Order

__all__ = ["UnpairedLayout", "UnpairedSource", "KLPairs", "mismatched", "mismatched_blocks", "run_kl_rows"]


class UnpairedLayout:
    """Unpaired rows ``{prompt_ids, completion_ids, label}``: one forward row each, in order."""

    kind = "unpaired"
    names = ("policy_logps", "lengths", "labels")

    def rows(self, items: Sequence[dict]) -> list[dict]:
        return [{"prompt_ids": r["prompt_ids"], "completion_ids": r["completion_ids"]} for r in items]

    def named(self, values: Tensor, names: Sequence[str], n_items: int) -> dict[str, Tensor]:
        """Per-row values ``[N, ...]`` as ``{names[0]: [N, ...]}``."""
        return {names[0]: values[:n_items]}

    def inputs(self, items: Sequence[dict], logps: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        labels = torch.tensor([bool(r["label"]) for r in items], dtype=torch.bool, device=logps.device)
        return {"policy_logps": logps, "lengths": lengths.to(logps.dtype), "labels": labels}

    def eval_items(self, items: list[dict], batch_size: int) -> list[dict]:
        """The eval rows with their mismatched pairs (blocks of ``batch_size``, see the module docstring)."""
        return mismatched_blocks(items, batch_size)


# ------------------------------------------------------------------------------------------------ mismatched pairs
def mismatched(items: Sequence[dict]) -> list[dict]:
    """``items`` with TRL's mismatched completions: row j gets row j−1's completion (row 0 the last row's) as
    ``kl_completion_ids`` — ``[y_n, y_1, …, y_{n−1}]``, TRL's ``add_kl_completion_ids``."""
    completions = [item["completion_ids"] for item in items]
    rotated = completions[-1:] + completions[:-1]
    return [{**item, "kl_completion_ids": kl} for item, kl in zip(items, rotated, strict=True)]


def mismatched_blocks(items: Sequence[dict], size: int) -> list[dict]:
    """:func:`mismatched` within consecutive blocks of ``size`` rows; a last block of one row joins the previous."""
    starts = list(range(0, len(items), max(size, 1)))
    if len(starts) > 1 and len(items) - starts[-1] == 1:
        starts.pop()
    ends = starts[1:] + [len(items)]
    return [row for start, end in zip(starts, ends, strict=True) for row in mismatched(items[start:end])]


def kl_rows(items: Sequence[dict]) -> list[dict]:
    """The forward rows ``(x_j, y'_j)`` of items carrying ``kl_completion_ids``."""
    return [{"prompt_ids": item["prompt_ids"], "completion_ids": item["kl_completion_ids"]} for item in items]


def run_kl_rows(examples: Sequence[dict], *, batch_size: int, seed: int, steps: int) -> list[dict]:
    """Every mismatched pair an :class:`UnpairedSource` over ``examples`` draws in ``steps`` steps from the start
    (the draws are seeded: a resumed run draws the same ones), distinct by content, in draw order."""
    order, rows = Order(len(examples), seed), {}
    for _ in range(steps):
        for row in kl_rows(mismatched([examples[i] for i in order.take(batch_size)])):
            rows.setdefault(sequence_key(row["prompt_ids"], row["completion_ids"]), row)
    return list(rows.values())


class UnpairedSource(OfflineSource):
    """Unpaired rows: ``batch_size`` per step (global) in the seeded order of :class:`OfflineSource`, each with its
    mismatched completion from a rotation over the step's whole batch; this process's share split into
    micro-batches."""

    def draw(self, policy, step: int) -> Draw:
        batch = mismatched([self.examples[i] for i in self.order.take(self.batch_size)])
        mine, size = batch[self.rank :: self.world], self.micro_batch_size
        return Draw([mine[m * size : (m + 1) * size] for m in range(self.accumulation)])


# ---------------------------------------------------------------------------------------------------- the provider
class KLPairs(Provider):
    """``policy_kl_logps`` and ``ref_kl_logps`` of the mismatched pairs of the whole step (or evaluation): computed
    by :meth:`prepare` before the micro-batches run (policy under ``no_grad``, reference from the run's reference),
    gathered over processes, and handed to every micro-batch (see the module docstring)."""

    names = ("policy_kl_logps", "ref_kl_logps")

    def __init__(self, reference: Reference, *, micro_batch_size: int, pad_id: int, buckets: bool | int, device):
        self.reference, self.micro_batch_size, self.pad_id = reference, micro_batch_size, pad_id
        self.buckets, self.device = buckets, device
        self.current: tuple[Tensor, Tensor] | None = None

    @torch.no_grad()
    def prepare(self, policy, micro_batches: Sequence[Sequence[dict]], step: int) -> None:
        """The step's (or evaluation's) values: this process's pairs, then every process's."""
        rows = kl_rows([item for micro in micro_batches for item in micro])
        counts = _gather_counts(len(rows), self.device)
        size = self.micro_batch_size
        forwards = math.ceil(max(counts) / size)  # the same on every process: a sharded forward is a collective
        values = []
        for index in range(forwards):
            chunk = rows[index * size : (index + 1) * size]
            placeholder = [{"prompt_ids": [self.pad_id], "completion_ids": [self.pad_id]}]  # a process with no rows
            batch = collate(chunk or rows[:size] or placeholder, self.pad_id).to(self.device)
            out = sequence_logps(
                policy, batch.input_ids, batch.attention_mask, batch.completion_mask, buckets=self.buckets
            )
            values.append(out[: len(chunk)].float())
        policy_values = torch.cat(values) if values else torch.zeros(0, device=self.device)
        ref_values = self.reference.logps(rows, batch_size=size, buckets=self.buckets) if rows else torch.zeros(0)
        local = torch.stack([policy_values, ref_values.to(self.device, torch.float32)])  # [2, M]
        gathered = _gather_columns(local, counts)
        self.current = (gathered[0], gathered[1])

    def inputs(self, micro: MicroBatch, own: Own) -> dict[str, Tensor]:
        if self.current is None:
            raise RuntimeError("the mismatched pairs' log-probs were not prepared for this step")
        return {"policy_kl_logps": self.current[0], "ref_kl_logps": self.current[1]}


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gather_counts(count: int, device) -> list[int]:
    """Every process's number of rows (one collective)."""
    if not _distributed():
        return [count]
    local = torch.tensor([count], device=device)
    counts = [torch.zeros_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(counts, local)
    return [int(c) for c in counts]


def _gather_columns(local: Tensor, counts: list[int]) -> Tensor:
    """``[2, M_r]`` of every process -> ``[2, Σ M_r]``, in process order (padded to the largest for all_gather)."""
    if len(counts) == 1:
        return local
    width = max(counts)
    padded = torch.nn.functional.pad(local, (0, width - local.shape[1]))
    parts = [torch.zeros_like(padded) for _ in counts]
    torch.distributed.all_gather(parts, padded.contiguous())
    return torch.cat([part[:, :n] for part, n in zip(parts, counts, strict=True)], dim=1)


# ------------------------------------------------------------------------------------------ reference of the pairs
def precompute_kl_reference(ctx: ProviderContext, eval_items: Sequence[dict]) -> None:
    """Add the reference log-probs of every mismatched pair the run draws (and of the eval pairs) to the run's
    precomputed table, computed once with the initial policy and cached (see the module docstring)."""
    reference, tcfg = ctx.reference, ctx.settings.trainer
    train = run_kl_rows(ctx.data.train, batch_size=tcfg.batch_size, seed=ctx.seed, steps=tcfg.max_steps)
    rows = train + kl_rows(eval_items)
    key = cache_key("ref-kl", ctx.fingerprint, ctx.data.fingerprint, tcfg.batch_size, ctx.seed, tcfg.max_steps)
    path = ctx.cache_dir / "reference" / f"kl-{key}.safetensors"

    def compute() -> dict[str, Tensor]:  # the initial policy is the reference (a fresh adapter is the identity)
        return {"values": logps_of(ctx.policy, rows, ctx.tokenizer.pad_token_id, tcfg.micro_batch_size, ctx.device)}

    def load(file) -> dict[str, Tensor]:
        stored = load_tensors(file)
        if stored["values"].numel() != len(rows):
            raise ValueError(f"it holds {stored['values'].numel()} rows, the run draws {len(rows)}")
        return stored

    stored = cached(path, compute, save=save_tensors, load=load, what="reference log-probs of the mismatched pairs")
    for row, value in zip(rows, stored["values"].tolist(), strict=True):
        reference.table.setdefault(sequence_key(row["prompt_ids"], row["completion_ids"]), value)


@register_provider("kl_pairs", KLPairs.names)
def _kl_pairs(ctx: ProviderContext) -> Provider:
    tcfg = ctx.settings.trainer
    if ctx.reference is None:
        raise ConfigError(f"loss '{ctx.loss.name}' needs a reference for its mismatched pairs, but the run built none")
    if tcfg.batch_size < 2:
        raise ConfigError(
            f"loss '{ctx.loss.name}' estimates its KL reference point from mismatched pairs within a step's batch: "
            "trainer.batch_size must be at least 2"
        )
    if ctx.reference.table:
        precompute_kl_reference(ctx, UnpairedLayout().eval_items(ctx.data.eval, tcfg.batch_size))
    return KLPairs(
        ctx.reference,
        micro_batch_size=tcfg.micro_batch_size,
        pad_id=ctx.tokenizer.pad_token_id,
        buckets=ctx.buckets,
        device=ctx.device,
    )
