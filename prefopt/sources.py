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

from prefopt.generation import decode_completions, sample_groups
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
        self.cycle = settings.steps_per_generation * settings.num_iterations  # optimizer steps per draw
        self.held: tuple[int, list[Draw]] | None = None  # (the step its draw began, its slices), over its steps

    # ------------------------------------------------------------------------------------------------ sampling
    def generate(self, model, prompts: list[dict], k: int, seed: Any) -> dict:
        """k completions per prompt from ``model``: prompt ids and texts, completion ids, texts and token pieces, and
        the sampler's per-token log-probs of them (:func:`prefopt.generation.sample_groups`; None where it falls back
        to ``model.generate``)."""
        sampling = self.sampling
        prompt_ids = [p["prompt_ids"] for p in prompts for _ in range(k)]
        completions, token_logps = sample_groups(  # one prompt forward per prompt, its cache shared by its k samples
            model,
            self.tokenizer,
            [p["prompt_ids"] for p in prompts],
            k,
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
            "sampler_token_logps": token_logps,  # the sampling policy's log-probs of its tokens, or None
        }

    def fit_scorer(self, model) -> dict[str, Any]:
        """Reward statistics (ALaRM's z-normalisation) from samples of ``model`` (the reference) on the first
        ``fit_prompts`` train prompts; the same samples on every process."""
        prompts = self.prompts[: self.sampling.fit_prompts]
        generated = self.generate(model, prompts, self.k, seed=f"{self.seed}/fit")
        return self.scorer.fit(generated["prompts"], generated["texts"], generated["pieces"])

    def sample(self, model, prompts: list[dict], k: int, seed: Any, per_token: bool = False) -> dict:
        """:meth:`generate`, then scores and the policy's and reference's log-probs of every sample (the reference
        keeps its values until the next draw, so the step reads them instead of running the reference again; for
        token losses its per-token values, from the one forward whose sums are ``ref_logps``). ``policy_logps`` are
        the sampler's own (read off its logits, no forward) unless ``per_token``: then the policy's per-token values
        (``policy_token_logps``, one list per sample, the old policy of later iterations) come from a forward, whose
        sums are ``policy_logps``."""
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
        sampler = generated.get("sampler_token_logps")
        if token_values is not None:
            policy_logps = torch.tensor([sum(row) for row in token_values], dtype=torch.float32)
        elif sampler is not None and all(completions):  # read off the sampling logits: no forward
            policy_logps = torch.tensor([sum(row) for row in sampler], dtype=torch.float32)
        else:
            policy_logps = logps_of(model, sequences, pad, batch, self.device)
        ref_logps = None
        if self.reference is not None:
            self.reference.forget()
            if self.kind == "token" and self.reference.model is not None:  # per-token values, kept for the step
                ref_tokens = self.reference.token_values(sequences, batch_size=batch)
                ref_logps = torch.tensor([sum(row) for row in ref_tokens], dtype=torch.float32)
                self.reference.remember(sequences, ref_logps, ref_tokens)
            else:
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
        """This process's micro-batches for ``step``. Samples are drawn every ``steps_per_generation ×
        num_iterations`` steps, for ``steps_per_generation`` slices of ``batch_size`` prompts; the steps in between
        take the held slices in TRL's order (each iteration over every slice); ``early_stopping`` ends a draw
        early (:meth:`on_metrics`), the next step then draws anew. The held draw is checkpointed too, so a run
        resumed inside a generation trains on the same samples."""
        slices, cycle = self.sampling.steps_per_generation, self.cycle
        if self.held is None or not self.held[0] <= step < self.held[0] + cycle:
            draws = self._new_draws(policy, step)
            self.held = (step, draws) if cycle > 1 else None
            if cycle == 1:
                return draws[0]
        return self.held[1][((step - self.held[0]) % cycle) % slices]

    def on_metrics(self, step: int, line: dict[str, float]) -> None:
        """After optimizer step ``step`` (1-based) with its metrics (the same on every process): with
        ``early_stopping``, a ``policy/approxkl`` above 1.5 × ``target_kl`` ends the held draw, as TRL's PPO ends
        its epochs over a batch (``online/early_stopped`` = 1 on that step's line)."""
        sampling = self.sampling
        if not sampling.early_stopping or self.held is None or step >= self.held[0] + self.cycle:
            return  # nothing held, or the held draw is over anyway
        if line.get("policy/approxkl", 0.0) > 1.5 * sampling.target_kl:
            self.held = None
            line["online/early_stopped"] = 1.0

    def _agree(self, flag: bool) -> bool:
        """True on every process if it is True on any (they must take the same branch)."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], dtype=torch.float64)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item() > 0)

    def _sample_groups(self, policy, step: int, round_: int) -> tuple[dict, list[list[dict]], int, int]:
        """One round: ``steps_per_generation × batch_size`` prompts (this process's share), sampled, scored, shaped
        and made into pairs or groups: (sampled, per-prompt items, prompts, tied prompts)."""
        needed = self.batch_size * self.sampling.steps_per_generation
        indices = self.order.take(needed)[self.rank :: self.world]
        prompts = [self.prompts[i] for i in indices]
        # later steps of a generation divide by the sampler's values
        old_logps = self.kind == "token" and self.cycle > 1
        seed = f"{self.seed}/online/{step}/{self.rank}" + (f"/{round_}" if round_ else "")
        sampled = self.sample(policy, prompts, self.k, seed=seed, per_token=old_logps)
        sampled["rewards"] = self._shaped(sampled)
        for observe in self.observers:
            observe(sampled)
        build = self._pairs if self.kind == "pair" else self._groups
        per_prompt, tied = build(sampled, len(prompts))
        return sampled, per_prompt, len(prompts), tied

    def _new_draws(self, policy, step: int) -> list[Draw]:
        sampled, per_prompt, n_prompts, tied = self._sample_groups(policy, step, 0)
        metrics = self._metrics(sampled, "online/")
        metrics["online/tied_prompts_frac"] = tied / n_prompts
        if self.sampling.dynamic_sampling:  # DAPO: replace tied groups by newly sampled untied ones
            kept = [g for g in per_prompt if not g[0]["tied"]]
            spare = [g for g in per_prompt if g[0]["tied"]]
            rounds = 0
            while rounds < self.sampling.dynamic_sampling_rounds and self._agree(len(kept) < n_prompts):
                rounds += 1
                _, more, _, _ = self._sample_groups(policy, step, rounds)
                kept += [g for g in more if not g[0]["tied"]]
                spare += [g for g in more if g[0]["tied"]]
            metrics["online/dynamic_sampling_rounds"] = float(rounds)
            metrics["online/dynamic_sampling_filled_frac"] = max(n_prompts - len(kept), 0) / n_prompts  # tied left
            per_prompt = (kept + spare)[:n_prompts]
        table = None
        every = self.sampling.table_every
        if every and ((step + 1) % every == 0 or step == 0):  # logged as steps 1, every, 2 * every, ...
            table = self._table(sampled)
        if self.kind == "token":
            self._advantages([g for items in per_prompt for g in items])
        share, size = n_prompts // self.sampling.steps_per_generation, self.micro_batch_size
        draws = []
        for s in range(self.sampling.steps_per_generation):
            own = per_prompt[s * share : (s + 1) * share]
            micro_batches = [sum(own[m * size : (m + 1) * size], []) for m in range(self.accumulation)]
            line = {**metrics, "online/items": float(sum(map(len, micro_batches)))}
            inputs = self._batch_tokens(micro_batches) if self.kind == "token" else {}
            draws.append(Draw(micro_batches, line, table if s == 0 else None, inputs))
        return draws

    def _shaped(self, sampled: dict) -> torch.Tensor:
        """The rewards the loss is trained on [N]: the scorer's total, minus ``kl_reward_coef`` × the sample's
        KL to the reference (log π − log π_ref of the completion: the KL in the reward), plus DAPO's soft overlong
        punishment ``−penalty · (|o| − (L − buffer)) / buffer`` for lengths past ``L − buffer`` (L =
        ``max_new_tokens``; Yu et al. 2025, §3.4)."""
        sampling = self.sampling
        rewards = sampled["scores"].total.double().clone()
        if sampling.kl_reward_coef > 0 and sampled["ref_logps"] is not None:
            kl = (sampled["policy_logps"] - sampled["ref_logps"]).double()
            rewards -= sampling.kl_reward_coef * kl
        if sampling.overlong_buffer > 0:
            start = sampling.max_new_tokens - sampling.overlong_buffer
            lengths = torch.tensor([len(c) for c in sampled["completions"]], dtype=torch.float64)
            rewards -= sampling.overlong_penalty * (lengths - start).clamp(min=0.0) / sampling.overlong_buffer
        return rewards

    def _advantages(self, groups: list[dict]) -> None:
        """Token losses: each group's advantages from the rewards of the whole generation batch, over every process
        (:func:`losses.group_advantages`; ``scale_rewards=batch`` takes the global batch's std, as TRL)."""
        import losses

        rewards = torch.tensor([g["rewards"] for g in groups], dtype=torch.float64)
        if self.world > 1:
            gathered = [torch.zeros_like(rewards) for _ in range(self.world)]
            torch.distributed.all_gather(gathered, rewards)  # every process holds as many groups
            rewards = torch.cat(gathered)
        advantages = losses.group_advantages(rewards, scale_rewards=self.sampling.scale_rewards)
        own = advantages.reshape(-1, self.k)[self.rank * len(groups) : (self.rank + 1) * len(groups)]
        for group, values in zip(groups, own.tolist(), strict=True):
            group["advantages"] = values

    def _batch_tokens(self, micro_batches: list[list[dict]]) -> dict[str, float]:
        """Token losses: ``batch_tokens``, the completion tokens of the step's global batch per loss call (TRL's
        ``num_items_in_batch / num_processes × gradient_accumulation_steps``), the token-mean losses' normaliser, so
        the update does not depend on how the batch is split into micro-batches and processes (masked truncated
        completions do not count)."""
        count = 0
        for group in (g for micro in micro_batches for g in micro):
            truncated = group.get("truncated") or [False] * len(group["completions"])
            count += sum(len(c) for c, cut in zip(group["completions"], truncated, strict=True) if not cut)
        tokens = torch.tensor([float(count)], dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(tokens)
        return {"batch_tokens": float(tokens) / (len(micro_batches) * self.world)}

    def _rewards(self, sampled: dict) -> torch.Tensor:
        return sampled["rewards"].reshape(-1, self.k)  # [G, K], shaped (:meth:`_shaped`)

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
            if sampled.get("old_values") is not None:  # a value head's values at sampling time (ppo)
                group["old_values"] = [sampled["old_values"][i] for i in rows]
            tokens = sampled["scores"].tokens
            if tokens is not None and self.kind == "token":  # per-token rewards (ALaRM's token vector)
                shaping = (sampled["rewards"] - sampled["scores"].total.double()).tolist()
                group["token_rewards"] = [tokens[i].tolist() for i in rows]
                for vector, i in zip(group["token_rewards"], rows, strict=True):  # shaping on the last token
                    vector[-1] += shaping[i]
            if self.sampling.mask_truncated_completions:  # cut at max_new_tokens before its EOS: no loss on it
                raw = [sampled["completions"][i] for i in rows]
                group["truncated"] = [len(c) >= self.sampling.max_new_tokens and c[-1] != eos for c in raw]
            group["tied"] = bool((rewards_gk[g] == rewards_gk[g][0]).all())
            tied += group["tied"]
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
        start, draws = self.held
        return {
            "start": start,
            "draws": [
                {"micro_batches": d.micro_batches, "metrics": d.metrics, "table": d.table, "inputs": d.inputs}
                for d in draws
            ],
        }

    def load_process_state(self, state: dict[str, Any] | None) -> None:
        self.held = (
            None
            if state is None
            else (
                # "index" (checkpoints before early stopping): the draw's number, each of cycle steps
                int(state["start"]) if "start" in state else int(state["index"]) * self.cycle,
                [
                    Draw(d["micro_batches"], d["metrics"], d["table"], d.get("inputs", {}))
                    for d in state.get("draws") or [state]  # a checkpoint written before slices: one draw
                ],
            )
        )
