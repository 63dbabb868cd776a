"""Batch sources: where each optimizer step's micro-batches come from. The step function does not know which.

* :class:`OfflineSource` — preference pairs from the dataset, in a seeded per-epoch order (``trainer=default``).
* :class:`OnlineSource` — every step, ``samples_per_prompt`` completions per prompt sampled from the current policy,
  scored by the configured reward (``prefopt.scoring``), then shaped for the loss's kind: pairs (best vs worst, or
  every ordered pair whose reward gap exceeds a margin) for pairwise losses, groups of k scored samples for group
  losses (``rloo``). Reference log-probs are computed at sampling time by the run's reference, which keeps them
  for the step (``trainer=online``).

A source's ``draw(policy, step)`` returns a :class:`Draw`: this process's micro-batches, sampling metrics and, now
and then, a small table of samples to log. ``state()`` / ``load_state()`` make the data position resumable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from prefopt.generation import decode_completions, sample_completions
from prefopt.logps import is_sharded
from prefopt.reference import Reference, logps_of, token_logps_of
from prefopt.scoring import Scores
from prefopt.settings import SamplingSettings

__all__ = ["Order", "Draw", "OfflineSource", "OnlineSource"]

log = logging.getLogger("prefopt")


@dataclass
class Order:
    """Seeded permutation per epoch; (epoch, position) is the resumable data position."""

    size: int
    seed: int
    epoch: int = 0
    position: int = 0

    def _permutation(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=gen).tolist()

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            permutation = self._permutation()
            chunk = permutation[self.position : self.position + count - len(out)]
            out += chunk
            self.position += len(chunk)
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    @property
    def epochs(self) -> float:
        return self.epoch + self.position / self.size


@dataclass
class Draw:
    micro_batches: list[list[dict]]  # this process's examples, one list per accumulation micro-step
    metrics: dict[str, float] = field(default_factory=dict)  # sampling statistics (online)
    table: list[dict] | None = None  # a few samples to log
    inputs: dict[str, float] = field(default_factory=dict)  # loss inputs of the whole step (every micro-batch)


class OfflineSource:
    """Dataset pairs: ``batch_size`` per step (global), this process's share split into micro-batches."""

    def __init__(
        self, examples: list[dict], *, batch_size: int, micro_batch_size: int, rank: int, world: int, seed: int
    ):
        self.examples, self.batch_size, self.rank, self.world = examples, batch_size, rank, world
        self.micro_batch_size = micro_batch_size
        self.order = Order(len(examples), seed)
        self.accumulation = batch_size // (micro_batch_size * world)

    def draw(self, policy, step: int) -> Draw:
        indices = self.order.take(self.batch_size)[self.rank :: self.world]
        size, examples = self.micro_batch_size, self.examples
        return Draw([[examples[i] for i in indices[m * size : (m + 1) * size]] for m in range(self.accumulation)])

    def state(self) -> dict[str, Any]:
        return self.order.state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.order.load_state(state)

    def process_state(self) -> dict[str, Any] | None:
        return None  # nothing per process: the data position is global

    def load_process_state(self, state: dict[str, Any] | None) -> None:
        pass


def unique_prompts(examples: Sequence[dict]) -> list[dict]:
    """Distinct prompts (by token ids) of ``examples``, in first-seen order: ``{prompt, prompt_ids}``."""
    seen: dict[tuple[int, ...], dict] = {}
    for example in examples:
        seen.setdefault(
            tuple(example["prompt_ids"]), {"prompt": example["prompt"], "prompt_ids": example["prompt_ids"]}
        )
    return list(seen.values())


class OnlineSource:
    """Sample -> score -> pairs or groups, every step, from the current policy (see the module docstring)."""

    def __init__(
        self,
        prompts: list[dict],
        eval_prompts: list[dict],
        *,
        tokenizer,
        scorer,
        reference: Reference | None,
        kind: str,
        settings: SamplingSettings,
        batch_size: int,
        micro_batch_size: int,
        rank: int,
        world: int,
        seed: int,
        device,
        observers: Sequence[Callable[[dict], None]] = (),
    ):
        if not prompts:
            raise ValueError("online training needs at least one prompt")
        self.prompts, self.eval_prompts = prompts, eval_prompts
        self.tokenizer, self.scorer, self.reference, self.kind = tokenizer, scorer, reference, kind
        self.sampling, self.observers = settings, list(observers)
        self.batch_size, self.micro_batch_size, self.rank, self.world = batch_size, micro_batch_size, rank, world
        self.seed, self.device = seed, device
        self.k = settings.samples_per_prompt
        self.order = Order(len(prompts), seed)
        self.accumulation = batch_size // (micro_batch_size * world)
        self.iterations = settings.num_iterations
        self.held: tuple[int, Draw] | None = None  # (draw index, draw) reused for num_iterations steps

    # ------------------------------------------------------------------------------------------------ sampling
    def generate(self, model, prompts: list[dict], k: int, seed: Any) -> dict:
        """k completions per prompt from ``model``: prompt ids and texts, completion ids, texts and token pieces."""
        sampling = self.sampling
        prompt_ids = [p["prompt_ids"] for p in prompts for _ in range(k)]
        completions = sample_completions(
            model,
            self.tokenizer,
            prompt_ids,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            batch_size=sampling.generation_batch_size,
            seed=seed,
            device=self.device,
        )
        texts, pieces = decode_completions(self.tokenizer, completions)
        prompt_texts = [p["prompt"] for p in prompts for _ in range(k)]
        return {
            "eos_token_id": self.tokenizer.eos_token_id,
            "prompt_ids": prompt_ids,
            "prompts": prompt_texts,
            "completions": completions,
            "texts": texts,
            "pieces": pieces,
        }

    def fit_scorer(self, model) -> dict[str, Any]:
        """Reward statistics (ALaRM's z-normalisation) from samples of ``model`` (the reference) on the first
        ``fit_prompts`` train prompts; the same samples on every process."""
        prompts = self.prompts[: self.sampling.fit_prompts]
        generated = self.generate(model, prompts, self.k, seed=f"{self.seed}/fit")
        return self.scorer.fit(generated["prompts"], generated["texts"], generated["pieces"])

    def sample(self, model, prompts: list[dict], k: int, seed: Any, per_token: bool = False) -> dict:
        """:meth:`generate`, then scores and the policy's and reference's log-probs of every sample (the reference
        keeps its values until the next draw, so the step reads them instead of running the reference again).
        ``per_token``: also the policy's per-token values (``policy_token_logps``, one list per sample), from the
        same forward whose sums are ``policy_logps``."""
        generated = self.generate(model, prompts, k, seed)
        prompt_ids, completions = generated["prompt_ids"], generated["completions"]
        scores: Scores = self.scorer(generated["prompts"], generated["texts"], generated["pieces"])
        sequences = [
            {"prompt_ids": p, "completion_ids": c or [self.tokenizer.eos_token_id]}
            for p, c in zip(prompt_ids, completions, strict=True)
        ]
        batch = self.sampling.generation_batch_size
        pad = self.tokenizer.pad_token_id
        token_values = token_logps_of(model, sequences, pad, batch, self.device) if per_token else None
        if token_values is None:
            policy_logps = logps_of(model, sequences, pad, batch, self.device)
        else:
            policy_logps = torch.tensor([sum(row) for row in token_values], dtype=torch.float32)
        ref_logps = None
        if self.reference is not None:
            self.reference.forget()
            ref_logps = self.reference.logps(sequences, batch_size=batch)
            self.reference.remember(sequences, ref_logps)
        sampled = {**generated, "scores": scores, "policy_logps": policy_logps, "ref_logps": ref_logps}
        return {**sampled, "policy_token_logps": token_values} if per_token else sampled

    def _metrics(self, sampled: dict, prefix: str = "") -> dict[str, float]:
        scores: Scores = sampled["scores"]
        eos = self.tokenizer.eos_token_id
        lengths = torch.tensor([len(c) for c in sampled["completions"]], dtype=torch.float64)
        metrics = {
            "reward/mean": float(scores.total.double().mean()),
            "reward/std": float(scores.total.double().std(correction=0)),
            "response_length": float(lengths.mean()),
            "eos_frac": sum(bool(c) and c[-1] == eos for c in sampled["completions"]) / len(sampled["completions"]),
            **{f"reward/{name}": float(v.double().mean()) for name, v in scores.components.items()},
            **scores.metrics,
        }
        if sampled["ref_logps"] is not None:  # sampled KL(π‖π_ref): mean of log π(y) − log π_ref(y), y ~ π
            metrics["kl"] = float((sampled["policy_logps"] - sampled["ref_logps"]).double().mean())
        return {f"{prefix}{k}": v for k, v in metrics.items()}

    # ----------------------------------------------------------------------------------------------- one step
    def draw(self, policy, step: int) -> Draw:
        """This process's micro-batches for ``step``: a new draw of samples every ``num_iterations`` steps, the held
        one in between (held in the checkpoint too, so a run resumed between iterations trains on the same
        samples)."""
        index = step // self.iterations
        if self.held is not None and self.held[0] == index:
            return self.held[1]
        draw = self._new_draw(policy, step)
        if self.iterations > 1:
            self.held = (index, draw)
        return draw

    def _new_draw(self, policy, step: int) -> Draw:
        indices = self.order.take(self.batch_size)[self.rank :: self.world]
        prompts = [self.prompts[i] for i in indices]
        old_logps = self.kind == "token" and self.iterations > 1  # later iterations divide by the sampler's values
        sampled = self.sample(
            policy, prompts, self.k, seed=f"{self.seed}/online/{step}/{self.rank}", per_token=old_logps
        )
        for observe in self.observers:
            observe(sampled)
        build = self._pairs if self.kind == "pair" else self._groups
        per_prompt, dropped = build(sampled, len(prompts))
        size = self.micro_batch_size
        micro_batches = [sum(per_prompt[m * size : (m + 1) * size], []) for m in range(self.accumulation)]
        metrics = self._metrics(sampled, "online/")
        metrics["online/items"] = float(sum(map(len, micro_batches)))
        metrics["online/tied_prompts_frac"] = dropped / len(prompts)
        table = None
        every = self.sampling.table_every
        if every and ((step + 1) % every == 0 or step == 0):  # logged as steps 1, every, 2 * every, ...
            table = self._table(sampled)
        inputs = self._batch_statistics(micro_batches) if self.kind == "token" else {}
        return Draw(micro_batches, metrics, table, inputs)

    def _batch_statistics(self, micro_batches: list[list[dict]]) -> dict[str, float]:
        """Token losses: what depends on the whole step's batch, over every process, so the update does not depend
        on how the batch is split into micro-batches and processes. Each group gets its completions' advantages
        (:func:`losses.group_advantages` on the rewards of every process's groups: ``scale_rewards=batch`` takes
        the std of the global batch, as TRL); the step gets ``batch_tokens``, the completion tokens of the global
        batch per loss call (TRL's ``num_items_in_batch / num_processes × gradient_accumulation_steps``), the
        normaliser of the token-mean losses."""
        import losses

        groups = [g for micro in micro_batches for g in micro]
        rewards = torch.tensor([g["rewards"] for g in groups], dtype=torch.float64)
        tokens = torch.tensor([float(sum(len(c) for g in groups for c in g["completions"]))], dtype=torch.float64)
        if self.world > 1:
            gathered = [torch.zeros_like(rewards) for _ in range(self.world)]
            torch.distributed.all_gather(gathered, rewards)  # every process holds as many groups
            torch.distributed.all_reduce(tokens)
            rewards = torch.cat(gathered)
        advantages = losses.group_advantages(rewards, scale_rewards=self.sampling.scale_rewards)
        own = advantages.reshape(-1, self.k)[self.rank * len(groups) : (self.rank + 1) * len(groups)]
        for group, values in zip(groups, own.tolist(), strict=True):
            group["advantages"] = values
        return {"batch_tokens": float(tokens) / (len(micro_batches) * self.world)}

    def _rewards(self, sampled: dict) -> torch.Tensor:
        return sampled["scores"].total.double().reshape(-1, self.k)  # [G, K]

    def _pairs(self, sampled: dict, n_prompts: int) -> tuple[list[list[dict]], int]:
        """Per prompt: (best, worst) by reward, or every (i, j) with r_i − r_j > margin; ties give no pair."""
        rewards_gk = self._rewards(sampled)
        margin, mode = self.sampling.pair_margin, self.sampling.pairing
        per_prompt, tied = [], 0
        for g in range(n_prompts):
            r = rewards_gk[g]
            if mode == "best_worst":
                best, worst = int(r.argmax()), int(r.argmin())
                candidates = [(best, worst)] if r[best] - r[worst] > margin else []
            elif mode == "all":
                candidates = [(i, j) for i in range(self.k) for j in range(self.k) if r[i] - r[j] > margin]
            else:
                raise ValueError(f"trainer.online.pairing must be best_worst or all, got {mode!r}")
            tied += not candidates
            per_prompt.append([self._pair(sampled, g * self.k + i, g * self.k + j) for i, j in candidates])
        return per_prompt, tied

    def _pair(self, sampled: dict, i: int, j: int) -> dict:
        eos = self.tokenizer.eos_token_id
        return {
            "prompt_ids": sampled["prompt_ids"][i],
            "chosen_ids": sampled["completions"][i] or [eos],
            "rejected_ids": sampled["completions"][j] or [eos],
        }

    def _groups(self, sampled: dict, n_prompts: int) -> tuple[list[list[dict]], int]:
        """Per prompt: one group of k completions with their rewards."""
        rewards_gk = self._rewards(sampled)
        eos = self.tokenizer.eos_token_id
        per_prompt, tied = [], 0
        for g in range(n_prompts):
            rows = range(g * self.k, (g + 1) * self.k)
            group = {
                "prompt_ids": sampled["prompt_ids"][g * self.k],
                "completions": [sampled["completions"][i] or [eos] for i in rows],
                "rewards": rewards_gk[g].tolist(),
            }
            if sampled.get("policy_token_logps") is not None:  # the sampling policy's per-token values
                group["old_token_logps"] = [sampled["policy_token_logps"][i] for i in rows]
            tokens = sampled["scores"].tokens
            if tokens is not None and self.kind == "token":  # per-token rewards (ALaRM's token vector)
                group["token_rewards"] = [tokens[i].tolist() for i in rows]
            tied += bool((rewards_gk[g] == rewards_gk[g][0]).all())
            per_prompt.append([group])
        return per_prompt, tied

    def _table(self, sampled: dict) -> list[dict]:
        rows = []
        scores: Scores = sampled["scores"]
        for i in range(min(self.sampling.table_rows, len(sampled["texts"]))):
            row = {"prompt": sampled["prompts"][i], "completion": sampled["texts"][i], "reward": float(scores.total[i])}
            row.update({name: float(v[i]) for name, v in scores.components.items()})
            rows.append(row)
        return rows

    # -------------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self, policy) -> dict[str, float]:
        """Reward, KL and length of samples on the eval prompts (this process's shard), same seed every time."""
        prompts = self.eval_prompts[: self.sampling.eval_prompts]
        if is_sharded(policy):  # every process samples as many (a sharded model's forwards are collectives)
            prompts = prompts[: len(prompts) - len(prompts) % self.world]
        prompts = prompts[self.rank :: self.world]
        if not prompts:
            return {}
        k = self.sampling.eval_samples_per_prompt
        sampled = self.sample(policy, prompts, k, seed=f"{self.seed}/eval/{self.rank}")
        return self._metrics(sampled)

    def state(self) -> dict[str, Any]:
        return self.order.state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.order.load_state(state)

    def process_state(self) -> dict[str, Any] | None:
        """This process's held draw (between iterations over one draw of samples), for the checkpoint."""
        if self.held is None:
            return None
        index, draw = self.held
        return {
            "index": index,
            "micro_batches": draw.micro_batches,
            "metrics": draw.metrics,
            "table": draw.table,
            "inputs": draw.inputs,
        }

    def load_process_state(self, state: dict[str, Any] | None) -> None:
        self.held = (
            None
            if state is None
            else (
                int(state["index"]),
                Draw(state["micro_batches"], state["metrics"], state["table"], state.get("inputs", {})),
            )
        )
