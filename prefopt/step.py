"""One micro-batch: the layout's rows plus every provider's rows -> one policy forward -> the loss's inputs -> loss.

The layout is decided by the loss's kind: :class:`PairLayout` forwards chosen then rejected completions and names
their values ``policy_chosen_logps`` ...; :class:`GroupLayout` forwards K completions per prompt and names them
``policy_logps`` ``[G, K]`` ...; :class:`~prefopt.unpaired.UnpairedLayout` forwards single completions labelled
desirable or not (``policy_logps [N]``, ``labels [N]``); :class:`~prefopt.reward_model.RewardLayout` forwards
chosen then rejected sequences through a sequence classifier (``chosen_scores``, ``rejected_scores``). Everything
else the loss takes comes from the run's providers (:mod:`prefopt.providers`). Nothing here knows a loss or an input
by any other name.

:func:`forward_backward` runs the micro-batches of one optimizer step; :class:`NonFiniteGuard` counts skipped steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

import losses
from prefopt.batching import collate
from prefopt.logps import sequence_logps, sequence_statistics, token_logps
from prefopt.metrics import Averager
from prefopt.providers import MicroBatch, Own, Provider
from prefopt.reward_model import RewardLayout
from prefopt.unpaired import UnpairedLayout  # also registers the 'kl_pairs' provider

__all__ = [
    "PairLayout",
    "GroupLayout",
    "TokenLayout",
    "LAYOUTS",
    "Step",
    "forward_backward",
    "NonFiniteGuard",
    "NonFiniteTraining",
]

log = logging.getLogger("prefopt")


class PairLayout:
    """Pairs ``{prompt_ids, chosen_ids, rejected_ids}``: chosen rows, then rejected rows. Besides the summed
    log-probs it supplies, where the loss declares them, per-row statistics of the same forward
    (:func:`~prefopt.logps.sequence_statistics`): the summed log-probs over the pair's shared length
    ``min(|y_w|, |y_l|)`` and ``Σ_t log Σ_v p²`` (the DPO modifiers' inputs, :mod:`losses.modifiers`)."""

    kind = "pair"
    # statistic of sequence_statistics -> the (chosen, rejected) input names it fills
    statistics = {
        "prefix_logps": ("policy_chosen_shared_logps", "policy_rejected_shared_logps"),
        "log_sum_sq_probs": ("policy_chosen_log_sum_sq_probs", "policy_rejected_log_sum_sq_probs"),
    }
    names = (
        "policy_chosen_logps",
        "policy_rejected_logps",
        "chosen_lengths",
        "rejected_lengths",
        *(name for pair in statistics.values() for name in pair),
    )

    @staticmethod
    def prefix_lengths(lengths: Tensor, n_items: int) -> Tensor:
        """Per row of a forward (the layout's 2B rows first): the shared length ``min(|y_w|, |y_l|)`` of its pair;
        a provider's row after them keeps its own length. ``lengths``: completion tokens per row."""
        shared = torch.minimum(lengths[:n_items], lengths[n_items : 2 * n_items])
        return torch.cat([shared, shared, lengths[2 * n_items :]])

    def rows(self, items: Sequence[dict]) -> list[dict]:
        return [
            {"prompt_ids": p["prompt_ids"], "completion_ids": p[f"{side}_ids"]}
            for side in ("chosen", "rejected")
            for p in items
        ]

    def named(self, values: Tensor, names: Sequence[str], n_items: int) -> dict[str, Tensor]:
        """Per-row values ``[2B, ...]`` as ``{names[0]: chosen [B, ...], names[1]: rejected [B, ...]}``."""
        return {names[0]: values[:n_items], names[1]: values[n_items : 2 * n_items]}

    def inputs(self, items: Sequence[dict], logps: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        n = len(items)
        return {**self.named(logps, self.names[:2], n), **self.named(lengths, self.names[2:4], n)}


class GroupLayout:
    """Groups ``{prompt_ids, completions: [K], rewards: [K]}``: K completions per prompt, rows group-major."""

    kind = "group"
    names = ("policy_logps", "lengths", "rewards")

    def rows(self, items: Sequence[dict]) -> list[dict]:
        return [{"prompt_ids": g["prompt_ids"], "completion_ids": c} for g in items for c in g["completions"]]

    def named(self, values: Tensor, names: Sequence[str], n_items: int) -> dict[str, Tensor]:
        """Per-row values ``[G·K, ...]`` as ``{names[0]: [G, K, ...]}``."""
        return {names[0]: rearrange(values, "(g k) ... -> g k ...", g=n_items)}

    def inputs(self, items: Sequence[dict], logps: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        n = len(items)
        rewards = torch.tensor([g["rewards"] for g in items], dtype=torch.float32, device=logps.device)
        return {
            **self.named(logps, ("policy_logps",), n),
            **self.named(lengths.to(logps.dtype), ("lengths",), n),
            "rewards": rewards,
        }


class TokenLayout(GroupLayout):
    """Groups as :class:`GroupLayout`, for token-level losses: per-token policy log-probs ``[N, L]`` (N = G·K rows,
    left-aligned, L = the longest completion), their ``completion_mask``, one advantage per completion from the
    group's rewards (:func:`losses.group_advantages`, TRL's computation; ``scale_rewards`` as TRL's) and the rewards
    themselves ``[G, K]`` (for losses that build their own advantages, e.g. ``reinforce_pp``)."""

    kind = "token"
    per_token = True
    names = ("policy_token_logps", "completion_mask", "advantages", "rewards", "token_rewards", "old_values")

    def __init__(self, scale_rewards: str = "group", width: int | None = None):
        self.scale_rewards = scale_rewards
        self.width = width  # the sampler's max_new_tokens: every call's T (Dr. GRPO's constant normaliser)

    def named(self, values: Tensor, names: Sequence[str], n_items: int) -> dict[str, Tensor]:
        """Per-row values ``[N, ...]``: token losses take one row per completion (per-token rows padded to T)."""
        return {names[0]: self._padded(values)}

    def _padded(self, values: Tensor) -> Tensor:
        if self.width is None or values.dim() != 2 or values.shape[1] >= self.width:
            return values
        return torch.nn.functional.pad(values, (0, self.width - values.shape[1]))

    def inputs(self, items: Sequence[dict], logps: Tensor, mask: Tensor) -> dict[str, Tensor]:
        logps, mask = self._padded(logps), self._padded(mask)  # T = max_new_tokens in every call
        rewards = torch.tensor([g["rewards"] for g in items], dtype=torch.float32, device=logps.device)
        if all("advantages" in g for g in items):  # computed by the sampler over the whole step's batch
            advantages = torch.tensor([a for g in items for a in g["advantages"]], device=logps.device)
        else:
            advantages = losses.group_advantages(rewards, scale_rewards=self.scale_rewards)
        out = {"policy_token_logps": logps, "completion_mask": mask, "advantages": advantages, "rewards": rewards}
        if all("token_rewards" in g for g in items):  # each vector right-aligned to its own row's last token
            out["token_rewards"] = right_aligned([v for g in items for v in g["token_rewards"]], mask)
        if any("truncated" in g for g in items):  # mask_truncated_completions: no loss on a completion cut short
            cut = [c for g in items for c in g.get("truncated") or [False] * len(g["completions"])]
            keep = ~torch.tensor(cut, dtype=torch.bool, device=mask.device)
            out["completion_mask"] = mask * keep[:, None].to(mask.dtype)
        for key in ("old_token_logps", "old_values"):  # the sampling policy's (a draw serving several steps)
            if all(key in g for g in items):
                old = torch.zeros_like(logps)
                for row, values in enumerate(v for g in items for v in g[key]):
                    old[row, : len(values)] = torch.tensor(values, dtype=logps.dtype)
                out[key] = old
        return out

    @staticmethod
    def metrics(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """``policy/approxkl`` when the rows were sampled by an older policy (``old_token_logps``): 0.5 · the masked
        mean of (log π − log π_old)² over tokens (TRL's PPO approxkl; what ``trainer.online.early_stopping`` reads)."""
        if "old_token_logps" not in inputs:
            return {}
        mask = inputs["completion_mask"]
        log_ratio = (inputs["policy_token_logps"].detach() - inputs["old_token_logps"]) * mask
        return {"policy/approxkl": 0.5 * log_ratio.square().sum() / mask.sum().clamp(min=1)}


def right_aligned(vectors: Sequence[Sequence[float]], mask: Tensor) -> Tensor:
    """``[N, T]`` (``mask``'s shape, rows left-aligned): row i's vector placed so that its last value lands on row
    i's last real token (``mask[i].sum() − 1``), whatever the rows' lengths; a vector longer than its row keeps its
    last values."""
    out = torch.zeros_like(mask, dtype=torch.float32)
    for row, values in enumerate(vectors):
        length = int(mask[row].sum())
        values = list(values)[-length:] if length else []
        if values:
            out[row, length - len(values) : length] = torch.tensor(values, dtype=torch.float32)
    return out


LAYOUTS = {
    "pair": PairLayout,
    "group": GroupLayout,
    "token": TokenLayout,
    "unpaired": UnpairedLayout,
    "reward": RewardLayout,  # a sequence classifier's scores (trainer=reward)
}


@dataclass
class StepOutput:
    out: losses.LossOutput
    tokens: int  # non-pad tokens forwarded


class Step:
    """One micro-batch through the policy and the loss (see the module docstring)."""

    def __init__(
        self,
        loss_fn: losses.BoundLoss,
        layout,
        providers: Sequence[Provider],
        *,
        pad_id: int,
        buckets: bool | int,
        device: torch.device,
    ):
        self.loss_fn, self.layout, self.providers = loss_fn, layout, list(providers)
        self.pad_id, self.buckets, self.device = pad_id, buckets, device
        req = loss_fn.requirements
        self.accepted = set(req.inputs) | set(req.optional_inputs)
        self.step_sums = tuple(n for n in loss_fn.spec.step_sums if n in self.accepted)

    def prepare(self, policy, micro_batches: Sequence[Sequence[dict]], step: int) -> None:
        """Before a step's (or an evaluation's) micro-batches: providers with inputs that are statistics of all of
        them, on every process (``prepare(policy, micro_batches, step)``, e.g. KTO's mismatched pairs), compute
        them."""
        for provider in self.providers:
            if hasattr(provider, "prepare"):
                provider.prepare(policy, micro_batches, step)

    def __call__(self, policy, items: list[dict], step: int, index: int, shared: dict | None = None) -> StepOutput:
        """``shared``: loss inputs of the whole step (e.g. ``batch_tokens``), the same for every micro-batch."""
        rows = self.layout.rows(items)
        micro = MicroBatch(items, rows, step, index, self.layout, self.device)
        added = [provider.sequences(micro) for provider in self.providers]  # each provider's own rows
        batch = collate(rows + [row for own in added for row in own], self.pad_id)
        tokens = int(batch.attention_mask.sum())
        batch = batch.to(self.device)
        n = len(rows)
        if hasattr(self.layout, "scores"):  # a reward model: one score per row from the classifier, no log-probs
            logps = self.layout.scores(policy, batch)
            inputs = self.layout.inputs(items, logps[:n], batch.lengths[:n])
        elif getattr(self.layout, "per_token", False):  # token losses: [N, L] values of the layout's rows
            values, mask = token_logps(
                policy, batch.input_ids, batch.attention_mask, batch.completion_mask, buckets=self.buckets
            )
            logps = (values * mask).sum(dim=-1)  # what providers' own rows get
            width = int(batch.lengths[:n].max())
            inputs = self.layout.inputs(items, values[:n, :width], mask[:n, :width])
        else:
            wanted = {k: v for k, v in getattr(self.layout, "statistics", {}).items() if set(v) & self.accepted}
            if wanted:  # per-row statistics the loss declares, from the same forward
                prefix = self.layout.prefix_lengths(batch.lengths, len(items)) if "prefix_logps" in wanted else None
                stats = sequence_statistics(
                    policy,
                    batch.input_ids,
                    batch.attention_mask,
                    batch.completion_mask,
                    prefix_lengths=prefix,
                    log_sum_sq="log_sum_sq_probs" in wanted,
                    buckets=self.buckets,
                )
                logps = stats["logps"]
            else:
                logps = sequence_logps(
                    policy, batch.input_ids, batch.attention_mask, batch.completion_mask, buckets=self.buckets
                )
            inputs = self.layout.inputs(items, logps[:n], batch.lengths[:n])
            for statistic, names in wanted.items():
                inputs.update(self.layout.named(stats[statistic][:n], names, len(items)))
        for key, value in (shared or {}).items():
            if key in self.accepted:
                value = value if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.float32)
                inputs[key] = value.to(self.device)
        start = n
        for provider, own in zip(self.providers, added, strict=True):
            end = start + len(own)
            supplied = provider.inputs(micro, Own(own, logps[start:end], batch.lengths[start:end]))
            inputs.update({k: v for k, v in supplied.items() if k in self.accepted})
            start = end
        out = self.loss_fn(**inputs)
        if hasattr(self.layout, "metrics"):  # the layout's own statistics of its inputs, where the loss has not
            for key, value in self.layout.metrics(inputs).items():
                out.metrics.setdefault(key, value)
        return StepOutput(out, tokens)


class NonFiniteTraining(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient; a checkpoint was saved."""


class NonFiniteGuard:
    """Counts skipped steps; ``skip`` returns True once ``limit`` steps in a row were skipped."""

    def __init__(self, limit: int) -> None:
        self.limit, self.total, self.consecutive = limit, 0, 0

    def ok(self) -> None:
        self.consecutive = 0

    def skip(self, step: int, problem: str) -> bool:
        self.total += 1
        self.consecutive += 1
        log.warning(
            "step %d skipped: %s (%d skipped in total, %d in a row)", step, problem, self.total, self.consecutive
        )
        return bool(self.limit) and self.consecutive >= self.limit


def forward_backward(
    accelerator, policy, step_fn: Step, micro_batches: list[list[dict]], step: int, shared: dict | None = None
):
    """Forward + backward over the micro-batches of one optimizer step (gradients synchronised on the last only);
    ``shared``: the step's loss inputs common to every micro-batch (``Draw.inputs``).

    Returns ``(averager, problem)``. A non-finite loss input or value (``losses.NonFiniteError``) does not stop the
    loop: the micro-batch backpropagates a zero through every parameter instead, so all processes run the same
    collective calls, and the problem is returned for the step to be skipped. So does an empty micro-batch (online:
    every sampled reward tied)."""
    averager, problem = Averager(), None
    step_fn.prepare(policy, micro_batches, step)
    if step_fn.step_sums and (len(micro_batches) > 1 or accelerator.num_processes > 1):
        shared = {**(shared or {}), **step_totals(accelerator, policy, step_fn, micro_batches, step, shared)}
    for index, items in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(policy):
            loss = None
            if items:
                try:
                    result = step_fn(policy, items, step, index, shared)
                    averager.tokens += result.tokens
                    loss = result.out.loss / len(micro_batches)
                    averager.add(result.out)
                except losses.NonFiniteError as error:
                    problem = problem or f"a non-finite loss ({error})"
            accelerator.backward(loss if loss is not None else zero_loss(policy))
    return averager, problem


@torch.no_grad()
def step_totals(accelerator, policy, step_fn: Step, micro_batches, step: int, shared: dict | None) -> dict:
    """The loss's ``step_sums`` (statistics it normalises by, e.g. whitening moments) totalled over every micro-batch
    of the step on every process: a forward of each micro-batch without gradient first, so each call of the step
    then normalises by the whole batch's statistics, as one call over the whole batch would."""
    totals: dict[str, Tensor] = {}
    for index, items in enumerate(micro_batches):
        if not items:
            continue
        try:
            sums = step_fn(policy, items, step, index, shared).out.sums
        except losses.NonFiniteError:  # the training pass reports it and skips the step
            continue
        for name in step_fn.step_sums:
            value = sums[name].detach().double()
            totals[name] = totals[name] + value if name in totals else value
    if accelerator.num_processes > 1:
        totals = {name: accelerator.reduce(value, "sum") for name, value in totals.items()}
    return totals


def zero_loss(policy) -> Tensor:
    """A zero that reaches every trainable parameter, so every process still runs the same gradient all-reduce."""
    return sum(p.sum() * 0.0 for p in policy.parameters() if p.requires_grad)


@torch.no_grad()
def evaluate_loss(
    policy, step_fn: Step, items: list[dict], *, micro_batch_size: int, rank: int, world: int, step: int
) -> Averager:
    """The loss and metrics on ``items`` (this process's shard), averaged over its items. Every process runs
    the same number of forwards (a sharded model's forward is a collective): one whose shard is shorter repeats its
    first micro-batch and discards the result."""
    policy.eval()
    averager = Averager()
    shard = items[rank::world]
    step_fn.prepare(policy, [shard], step)
    forwards = math.ceil(math.ceil(len(items) / world) / micro_batch_size)
    for index in range(forwards):
        start = index * micro_batch_size
        chunk = shard[start : start + micro_batch_size]
        out = step_fn(policy, chunk or shard[:micro_batch_size] or items[:micro_batch_size], step, -1 - start).out
        averager.add(out, weight=len(chunk))  # a repeat counts 0 times (its keys still reach the reduction)
    policy.train()
    return averager
