"""Providers: everything a loss takes beyond the policy's own log-probs comes from one.

A loss declares its inputs (``losses.get(name).requirements``). The step's layout (:mod:`prefopt.step`) supplies the
policy log-probs and lengths of the rows it forwards (``policy_chosen_logps`` ... for pairs, ``policy_logps`` ... for
groups). Every other input is supplied by a provider, chosen by :func:`plan` from the names the loss declares:

* ``reference`` — ``ref_chosen_logps`` / ``ref_rejected_logps`` (pairs) or ``ref_logps`` (groups), from the run's
  :class:`~prefopt.reference.Reference` (precomputed table, online memo, or live model);
* ``regularization`` — MPO's samples from the reference policy: adds its rows to the policy forward and supplies
  ``reg_logps``, ``reg_lengths``, ``reg_ref_logps``;
* ``sft_data`` — supervised sequences joined to the forward: ``sft_logps``, ``sft_lengths`` (MPO's ``ptx_weight``);
* ``aux_rewards`` — UPO's auxiliary rewards ``aux_rewards_chosen`` / ``aux_rewards_rejected`` (``aux_rewards``
  reward functions, z-normalised over the training data, or over each draw of samples online) and, for its
  ``prompt_expectile`` baseline, ``aux_values``.

Adding a loss with a new input is the loss plus, at most, one provider registered with :func:`register_provider`;
the trainer and the step stay as they are. A provider implements what it needs of :class:`Provider`:
``sequences`` (rows to add to the policy forward), ``inputs`` (the named tensors for one micro-batch) and
``on_sample`` (online: called with every draw of samples).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import losses
from losses._common import expectile
from prefopt import rewards
from prefopt.cache import cache_key, cached, load_tensors, save_tensors, sequence_key
from prefopt.config import ConfigError
from prefopt.generation import sample_completions
from prefopt.reference import Reference, logps_of
from prefopt.warm_start import sft_examples

__all__ = [
    "MicroBatch",
    "Provider",
    "Own",
    "ProviderContext",
    "ProviderFactory",
    "PROVIDERS",
    "register_provider",
    "plan",
    "ReferenceInputs",
    "EpochDraws",
    "RegularizationPool",
    "SftSequences",
    "AuxRewards",
    "PromptValue",
    "pool_size",
]

log = logging.getLogger("prefopt")


@dataclass
class MicroBatch:
    """One micro-batch as providers see it."""

    items: list[dict]  # pairs or groups, as the batch source gives them
    rows: list[dict]  # the layout's sequences ({prompt_ids, completion_ids}) in forward order
    step: int  # the optimizer step being taken (0-based)
    index: int  # micro-batch index within the step; negative in evaluation
    layout: Any  # prefopt.step.PairLayout | GroupLayout: names per-row values
    device: torch.device


@dataclass
class Own:
    """A provider's own rows of a forward (from :meth:`Provider.sequences`) and the policy's values on them."""

    rows: list[dict]
    logps: Tensor  # [R] summed log-probs
    lengths: Tensor  # [R] completion tokens


class Provider:
    """Supplies named loss inputs for each micro-batch (see the module docstring)."""

    names: tuple[str, ...] = ()  # the inputs it supplies
    on_sample: Callable[[dict], None] | None = None  # online: every draw of samples (texts, ids, log-probs)

    def sequences(self, micro: MicroBatch) -> list[dict]:
        """Rows to add to the policy forward of this micro-batch (none by default)."""
        return []

    def inputs(self, micro: MicroBatch, own: Own) -> dict[str, Tensor]:
        """The inputs for ``micro``; ``own`` holds this provider's rows of the forward with the policy's values."""
        raise NotImplementedError

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """After each optimizer step: the step's logged training metrics (e.g. to warn about what they show)."""

    def state(self) -> Any:
        """What must survive a resume (JSON), the same on every process; None when nothing."""
        return None

    def load_state(self, state: Any) -> None:
        """Restore :meth:`state`'s value from a checkpoint."""

    def summary(self) -> dict[str, Any]:
        """Entries for the run's ``summary.json``."""
        return {}


@dataclass
class ProviderContext:
    """What a provider may be built from (assembled by :mod:`prefopt.build`)."""

    loss: losses.BoundLoss  # the loss being trained (its hyper-parameters, for inputs that depend on them)
    policy: torch.nn.Module  # the initial policy (before training)
    tokenizer: Any
    data: Any  # prefopt.data.prepare.PreparedData
    reference: Reference | None
    device: torch.device
    cache_dir: Path
    fingerprint: str  # of the initial weights
    settings: Any  # prefopt.build.Settings
    rank: int = 0  # this process
    world: int = 1  # processes

    @property
    def kind(self) -> str:  # "pair" | "group"
        return self.loss.requirements.kind

    @property
    def online(self) -> bool:  # samples from the policy (trainer=online)
        return self.settings.trainer.source == "online"

    @property
    def seed(self) -> int:
        return self.settings.trainer.seed

    @property
    def buckets(self) -> bool | int:
        return self.settings.trainer.buckets

    def draws(self, ratio: float, seed: int) -> dict[str, Any]:
        """:class:`EpochDraws` settings for ``ratio`` sequences per item of each of this run's micro-batches."""
        tcfg = self.settings.trainer
        return {
            "ratio": ratio,
            "seed": seed,
            "per_micro": max(1, round(ratio * tcfg.micro_batch_size)),
            "accumulation": tcfg.batch_size // (tcfg.micro_batch_size * self.world),
            "rank": self.rank,
            "world": self.world,
        }


@dataclass(frozen=True)
class ProviderFactory:
    name: str
    supplies: Callable[[str], tuple[str, ...]]  # kind -> input names
    build: Callable[[ProviderContext], Provider]
    when_optional: Callable[[ProviderContext], bool] = lambda ctx: False  # build it for optional inputs only?


PROVIDERS: dict[str, ProviderFactory] = {}


def register_provider(
    name: str,
    supplies: Sequence[str] | Callable[[str], tuple[str, ...]],
    *,
    when_optional: Callable[[ProviderContext], bool] | None = None,
) -> Callable[[Callable[[ProviderContext], Provider]], Callable[[ProviderContext], Provider]]:
    """Register a provider builder ``build(ctx) -> Provider`` under ``name``, supplying the input names
    ``supplies`` (or ``supplies(kind)``). Registering a name again replaces it."""
    names = supplies if callable(supplies) else (lambda kind, fixed=tuple(supplies): fixed)

    def decorate(build: Callable[[ProviderContext], Provider]) -> Callable[[ProviderContext], Provider]:
        PROVIDERS[name] = ProviderFactory(name, names, build, when_optional or (lambda ctx: False))
        return build

    return decorate


def plan(loss: losses.BoundLoss, layout_names: Sequence[str]) -> tuple[list[ProviderFactory], list[ProviderFactory]]:
    """(providers for required inputs, providers for optional inputs only) of ``loss``; one ConfigError line names
    any required input no provider supplies."""
    req = loss.requirements
    required = [n for n in req.inputs if n not in layout_names]
    optional = [n for n in req.optional_inputs if n not in layout_names]
    chosen, covered = [], set()
    for factory in PROVIDERS.values():
        names = set(factory.supplies(req.kind))
        if names & (set(required) - covered):
            chosen.append(factory)
            covered |= names
    missing = [n for n in required if n not in covered]
    if missing:
        raise ConfigError(
            f"loss '{loss.name}' needs input(s) {', '.join(missing)}, which no provider supplies "
            f"(providers: {', '.join(sorted(PROVIDERS)) or 'none'})"
        )
    optional_only = [
        f for f in PROVIDERS.values() if f not in chosen and set(f.supplies(req.kind)) & (set(optional) - covered)
    ]
    return chosen, optional_only


# ---------------------------------------------------------------------------------------------------- reference
class ReferenceInputs(Provider):
    """Reference log-probs of the layout's rows from the run's :class:`Reference`."""

    def __init__(self, reference: Reference, kind: str, buckets: bool | int):
        self.reference, self.buckets = reference, buckets
        self.names = _reference_names(kind)

    def inputs(self, micro: MicroBatch, own: Own) -> dict[str, Tensor]:
        with torch.no_grad():
            if getattr(micro.layout, "per_token", False):
                values = self.reference.token_logps(micro.rows)
            else:
                values = self.reference.logps(micro.rows, buckets=self.buckets)
        return micro.layout.named(values.to(micro.device), self.names, len(micro.items))


def _reference_names(kind: str) -> tuple[str, ...]:
    names = {"group": ("ref_logps",), "token": ("ref_token_logps",), "unpaired": ("ref_logps",)}
    return names.get(kind, ("ref_chosen_logps", "ref_rejected_logps"))


def _reference_when_optional(ctx: ProviderContext) -> bool:
    """Supply an optional reference input when the run has a reference; per-token values cost a reference forward
    per step (tables and the online memo hold sums), so a token loss gets them only when it requires them."""
    return ctx.reference is not None and ctx.kind != "token"


@register_provider("reference", _reference_names, when_optional=_reference_when_optional)
def _reference(ctx: ProviderContext) -> Provider:
    if ctx.reference is None:
        raise ConfigError("this loss needs a reference, but the run built none")
    return ReferenceInputs(ctx.reference, ctx.kind, ctx.buckets)


# ----------------------------------------------------------------------------------------------- regularisation
class EpochDraws:
    """Draws from a fixed list of sequences for each micro-batch, ``ratio`` per item: training micro-batches take
    consecutive positions of a seeded permutation per pass over the list (so without replacement within a pass,
    disjoint across processes and accumulation steps, and a pure function of step, micro-batch and process, so a
    resumed run draws the same ones); evaluation micro-batches (negative index) draw at random, seeded likewise."""

    def __init__(
        self,
        items: list[dict],
        *,
        ratio: float,
        seed: int,
        per_micro: int,
        accumulation: int = 1,
        rank: int = 0,
        world: int = 1,
    ):
        self.items, self.ratio, self.seed, self.per_micro = items, ratio, seed, per_micro
        self.accumulation, self.rank, self.world = accumulation, rank, world
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * epoch + 17)
            self._orders = {epoch: torch.randperm(len(self.items), generator=generator).tolist()}
        return self._orders[epoch]

    def __call__(self, micro: MicroBatch) -> list[dict]:
        count = max(1, round(self.ratio * len(micro.items)))
        if micro.index < 0:  # evaluation
            rng = random.Random(f"{self.seed}/{micro.step}/{micro.index}")
            return [self.items[rng.randrange(len(self.items))] for _ in range(count)]
        start = ((micro.step * self.accumulation + micro.index) * self.world + self.rank) * self.per_micro
        size = len(self.items)
        return [self.items[self._order(p // size)[p % size]] for p in range(start, start + count)]


class RegularizationPool(Provider):
    """MPO's regularisation data: completions sampled from the reference policy before training, with their
    reference log-probs. Each training micro-batch adds ``batch_ratio`` of them per pair to the policy forward,
    drawn without replacement within each pass over the pool (:class:`EpochDraws`)."""

    names = ("reg_logps", "reg_lengths", "reg_ref_logps")
    KL_WINDOW, KL_MARGIN = 10, 0.1  # steps averaged; nats below 0 that are not sampling noise

    def __init__(self, pool: list[dict], *, draws: int = 0, max_reuse: float = 4.0, **draw: Any):
        if not pool:
            raise ConfigError("no regularisation samples were generated (every sample was empty)")
        self.pool, self.draws, self.max_reuse = pool, draws, max_reuse
        self.draw = EpochDraws(pool, **draw)
        self._warned, self._recent = False, []
        reuse = draws / len(pool)
        log.info(
            "regularisation pool: %d samples for %d draws over the run (each drawn %.2f times)", len(pool), draws, reuse
        )
        if reuse > max_reuse:
            log.warning(
                "regularisation pool: each of its %d samples is drawn %.1f times over the run (more than "
                "regularization.max_reuse=%g): the NLL term will memorise them and pull the policy away from the "
                "reference; raise regularization.pool_size",
                len(pool),
                reuse,
                max_reuse,
            )

    def sequences(self, micro: MicroBatch) -> list[dict]:
        return self.draw(micro)

    def inputs(self, micro: MicroBatch, own: Own) -> dict[str, Tensor]:
        reference = torch.tensor([s["ref_logps"] for s in own.rows], device=own.logps.device)
        return {"reg_logps": own.logps, "reg_lengths": own.lengths, "reg_ref_logps": reference}

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Warn once when the forward-KL estimate on the drawn samples (``*kl_fwd_est``), averaged over the last
        ``KL_WINDOW`` steps, is clearly negative: a KL is >= 0, so the policy has memorised the samples."""
        estimate = next((v for k, v in metrics.items() if k.endswith("kl_fwd_est")), None)
        if estimate is None or self._warned:
            return
        self._recent = [*self._recent[-(self.KL_WINDOW - 1) :], estimate]
        mean = sum(self._recent) / len(self._recent)
        if len(self._recent) == self.KL_WINDOW and mean < -self.KL_MARGIN:
            self._warned = True
            log.warning(
                "step %d: the forward-KL estimate on the regularisation samples is negative (%.3f over the last %d "
                "steps), though a KL is >= 0: the policy fits them better than the reference does (memorised); a "
                "larger regularization.pool_size helps (now %d samples, each drawn %.1f times)",
                step,
                mean,
                self.KL_WINDOW,
                len(self.pool),
                self.draws / len(self.pool),
            )

    def summary(self) -> dict[str, Any]:
        return {"regularization_pool": len(self.pool), "regularization_reuse": round(self.draws / len(self.pool), 3)}


def pool_size(train_pairs: int, max_steps: int, batch_size: int, batch_ratio: float) -> int:
    """The default ``regularization.pool_size``: one sample per train pair, or per draw of the run when there are
    more draws — max(train pairs, max_steps x batch_size x batch_ratio)."""
    return max(train_pairs, math.ceil(max_steps * batch_size * batch_ratio))


@torch.no_grad()
def generate_pool(ctx: ProviderContext, size: int) -> list[dict]:
    """``size`` completions sampled from the reference (the initial policy), one per train pair's prompt in data
    order, cycling through the pairs (prompts are not deduplicated: a prompt with more pairs gets more samples); empty
    completions are replaced by further samples. With their reference log-probs; cached under
    ``cache_dir/regularization``. Generation is left-padded and seeded."""
    settings = ctx.settings.regularization
    key = cache_key("reg-pool", ctx.fingerprint, ctx.data.fingerprint, settings.key(), size, ctx.seed)
    model, tokenizer = ctx.policy, ctx.tokenizer
    prompts = [e["prompt_ids"] for e in ctx.data.train]

    def build() -> list[dict]:
        samples: list[dict] = []
        for attempt in range(4):  # empty completions (EOS first) are dropped: sample again for the shortfall
            wanted = [prompts[(len(samples) + i) % len(prompts)] for i in range(size - len(samples))]
            completions = sample_completions(
                model,
                tokenizer,
                wanted,
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                batch_size=settings.batch_size,
                seed=f"{ctx.seed}/reg/{attempt}",
                device=ctx.device,
            )
            samples += [
                {"prompt_ids": list(p), "completion_ids": c} for p, c in zip(wanted, completions, strict=True) if c
            ]
            if len(samples) >= size:
                break
        values = logps_of(model, samples, tokenizer.pad_token_id, settings.batch_size, ctx.device)
        for sample, value in zip(samples, values.tolist(), strict=True):
            sample["ref_logps"] = value
        return samples

    def save(samples: list[dict], path: Path) -> None:
        save_tensors(_pack(samples), path)

    path = ctx.cache_dir / "regularization" / f"{key}.safetensors"
    return cached(path, build, save=save, load=lambda p: _unpack(load_tensors(p)), what="regularisation samples")


def _pack(samples: list[dict]) -> dict[str, Tensor]:
    lengths = lambda key: torch.tensor([len(s[key]) for s in samples], dtype=torch.long)  # noqa: E731
    flat = lambda key: torch.tensor([t for s in samples for t in s[key]], dtype=torch.long)  # noqa: E731
    return {
        "prompt_lengths": lengths("prompt_ids"),
        "prompt_ids": flat("prompt_ids"),
        "completion_lengths": lengths("completion_ids"),
        "completion_ids": flat("completion_ids"),
        "ref_logps": torch.tensor([s["ref_logps"] for s in samples], dtype=torch.float32),
    }


def _unpack(stored: dict[str, Tensor]) -> list[dict]:
    prompts = torch.split(stored["prompt_ids"], stored["prompt_lengths"].tolist())
    completions = torch.split(stored["completion_ids"], stored["completion_lengths"].tolist())
    return [
        {"prompt_ids": p.tolist(), "completion_ids": c.tolist(), "ref_logps": r}
        for p, c, r in zip(prompts, completions, stored["ref_logps"].tolist(), strict=True)
    ]


@register_provider("regularization", RegularizationPool.names)
def _regularization(ctx: ProviderContext) -> Provider:
    settings, tcfg = ctx.settings.regularization, ctx.settings.trainer
    draws = math.ceil(tcfg.max_steps * tcfg.batch_size * settings.batch_ratio)
    size = settings.pool_size or pool_size(len(ctx.data.train), tcfg.max_steps, tcfg.batch_size, settings.batch_ratio)
    return RegularizationPool(
        generate_pool(ctx, size), draws=draws, max_reuse=settings.max_reuse, **ctx.draws(settings.batch_ratio, ctx.seed)
    )


# --------------------------------------------------------------------------------------------------- SFT data
class SftSequences(Provider):
    """Supervised sequences (``sft_data``) joined to each training micro-batch, ``batch_ratio`` per pair, drawn
    without replacement within each pass (:class:`EpochDraws`); the policy's log-probs of them are ``sft_logps``
    (MPO's ``ptx_weight`` NLL term)."""

    names = ("sft_logps", "sft_lengths")

    def __init__(self, rows: list[dict], **draw: Any):
        if not rows:
            raise ConfigError("sft_data gave no sequences")
        self.draw = EpochDraws(rows, **draw)

    def sequences(self, micro: MicroBatch) -> list[dict]:
        return self.draw(micro)

    def inputs(self, micro: MicroBatch, own: Own) -> dict[str, Tensor]:
        return {"sft_logps": own.logps, "sft_lengths": own.lengths}


@register_provider("sft_data", SftSequences.names)
def _sft_data(ctx: ProviderContext) -> Provider:
    settings = ctx.settings.sft_data
    if settings.source == "chosen":
        rows = [{"prompt_ids": e["prompt_ids"], "completion_ids": e["chosen_ids"]} for e in ctx.data.train]
    else:
        data = ctx.settings.data
        rows = sft_examples(
            ctx.tokenizer,
            n_rows=settings.n_rows,
            seed=settings.seed,
            max_length=data.max_length,
            max_prompt_length=data.max_prompt_length,
        )
    return SftSequences(rows, **ctx.draws(settings.batch_ratio, ctx.seed + 1))  # a draw order of its own


# --------------------------------------------------------------------------------------------- auxiliary rewards
@dataclass
class PromptValue:
    """How :class:`AuxRewards` estimates ``aux_values`` V(x), the τ-expectile of the combined auxiliary rewards
    given the prompt: exactly per prompt (``features`` None: UPO's ``prompt_expectile``) or by a head on prompt
    features fit by expectile regression (UPO's ``value_head``, :class:`prefopt.value.ExpectileValue`)."""

    weights: Sequence[float] | None  # c_k of Σ_k c_k r_k, normalised to sum 1 (None: equal)
    tau: float
    features: dict[bytes, Tensor] | None = None  # prompt key -> [H] features of every prompt of the data
    head: Any = None  # prefopt.settings.AuxValueSettings
    seed: int = 0


class AuxRewards(Provider):
    """UPO's auxiliary rewards per completion, [B, K] for chosen and rejected: the ``aux_rewards`` reward functions,
    z-normalised with statistics of the training completions only (offline: computed once over train and eval, the
    eval split never moving the statistics) or of each draw of samples (online), looked up by content.

    With a ``value`` (:class:`PromptValue`: UPO's ``prompt_expectile`` / ``value_head`` baselines) it also supplies
    ``aux_values`` [B], V(x) fit to the weighted training rewards of every completion (all pairs; online: the
    draw's samples). Exactly per prompt, the τ-expectile of its completions — the minimiser of expectile regression
    with one value per prompt; a prompt with no training completions (an eval prompt) gets its pair's expectile. Or
    by the value head, which gives every prompt of the data a value."""

    names = ("aux_rewards_chosen", "aux_rewards_rejected", "aux_values")

    def __init__(self, reward_names: Sequence[str], data=None, value: PromptValue | None = None):
        if not reward_names:
            raise ConfigError("the loss needs auxiliary rewards: set aux_rewards to a list of reward names")
        self.reward_names, self.value = list(reward_names), value
        self.unpaired = data is not None and data.kind == "unpaired"
        self.table: dict[bytes, list[float]] = {}
        self.values: dict[bytes, float] = {}
        self.fit_report: dict[str, float] = {}
        if data is not None and data.kind == "unpaired":  # one row per completion
            rows = [
                (e["prompt_ids"], e["completion_ids"], e["prompt"], e["completion"]) for e in [*data.train, *data.eval]
            ]
            self._score(rows, fitted_on=len(data.train))
        elif data is not None:
            rows = [
                (e["prompt_ids"], e[f"{side}_ids"], e["prompt"], e[side])
                for split in (data.train, data.eval)
                for side in ("chosen", "rejected")
                for e in split
            ]
            self._score(rows, fitted_on=2 * len(data.train))

    def _score(self, rows: list[tuple], fitted_on: int | None = None) -> None:
        """Score ``rows`` and z-normalise each reward with the mean and std of the first ``fitted_on`` rows (all by
        default); a reward constant over them becomes zeros. With a value, fit V(x) on the same rows."""
        raw = rewards.score_completions(self.reward_names, [r[2] for r in rows], [r[3] for r in rows], normalize=False)
        fitted_on = len(rows) if fitted_on is None else fitted_on
        fit = raw[:fitted_on]
        mean, std = fit.mean(dim=0, keepdim=True), fit.std(dim=0, correction=0, keepdim=True)
        scores = torch.where(std > 1e-8, (raw - mean) / std.clamp_min(1e-8), torch.zeros_like(raw))  # [N, K]
        for (prompt_ids, completion_ids, _, _), values in zip(rows, scores.tolist(), strict=True):
            self.table[sequence_key(prompt_ids, completion_ids)] = values
        if self.value is not None:
            combined = self._combined(scores.double())
            keys = [sequence_key(row[0], []) for row in rows]
            if self.value.features is None:
                self._fit_table(keys[:fitted_on], combined[:fitted_on])
                if self.unpaired:  # an eval prompt without training rows: the expectile of its eval rows
                    held_out = self.values
                    self._fit_table(keys[fitted_on:], combined[fitted_on:])
                    self.values = {**self.values, **held_out}
            else:
                self._fit_head(keys, combined, fitted_on)

    def _fit_table(self, keys: list[bytes], combined: Tensor) -> None:
        """Per prompt, the τ-expectile of the combined rewards of its rows."""
        by_prompt: dict[bytes, list[int]] = {}
        for i, key in enumerate(keys):
            by_prompt.setdefault(key, []).append(i)
        self.values = {key: float(expectile(combined[index], self.value.tau)) for key, index in by_prompt.items()}

    def _fit_head(self, keys: list[bytes], combined: Tensor, fitted_on: int) -> None:
        """Fit the value head on the first ``fitted_on`` rows; value every prompt of the data; report the expectile
        loss on the fit rows and, offline, on the held-out rows against the constant (the fit rows' expectile)."""
        from prefopt.value import ExpectileValue, expectile_loss

        features = self.value.features
        missing = next((key for key in keys if key not in features), None)
        if missing is not None:
            raise KeyError("aux_value: a prompt without features (not a prompt of the data)")
        settings, tau = self.value.head, self.value.tau
        head = ExpectileValue(
            tau, hidden=settings.hidden, steps=settings.steps, lr=settings.lr, weight_decay=settings.weight_decay
        )
        head.fit(torch.stack([features[k] for k in keys[:fitted_on]]), combined[:fitted_on], seed=self.value.seed)
        prompts = list(features)
        self.values = dict(zip(prompts, head(torch.stack([features[k] for k in prompts])).tolist(), strict=True))
        self.fit_report = {"aux_value_fit_loss": head.fit_loss}
        if fitted_on < len(keys):
            held_out = combined[fitted_on:]
            predicted = torch.tensor([self.values[k] for k in keys[fitted_on:]], dtype=held_out.dtype)
            constant = expectile(combined[:fitted_on], tau).expand_as(held_out)
            self.fit_report["aux_value_eval_loss"] = float(expectile_loss(predicted, held_out, tau))
            self.fit_report["aux_value_eval_loss_constant"] = float(expectile_loss(constant, held_out, tau))

    def _combined(self, scores: Tensor) -> Tensor:
        """[N, K] rewards -> [N] ``Σ_k c_k r_k``, the weights normalised to sum 1 (equal when not given), as UPO
        combines them."""
        weights = self.value.weights
        w = torch.ones(scores.shape[1]) if weights is None else torch.as_tensor(list(weights))
        w = w.to(scores.dtype)
        return scores @ (w / w.sum())

    def observe(self, sampled: dict) -> None:
        """Online: score every sample of this draw (normalised over the draw), replacing the previous draw's."""
        self.table.clear()
        self.values.clear()
        eos = sampled["eos_token_id"]
        rows = [
            (p, c or [eos], prompt, text)
            for p, c, prompt, text in zip(
                sampled["prompt_ids"], sampled["completions"], sampled["prompts"], sampled["texts"], strict=True
            )
        ]
        self._score(rows)

    def inputs(self, micro: MicroBatch, own: Own) -> dict[str, Tensor]:
        values = [self.table[sequence_key(r["prompt_ids"], r["completion_ids"])] for r in micro.rows]
        values = torch.tensor(values, dtype=torch.float32, device=micro.device)
        if micro.layout.kind == "unpaired":  # per row: [N, K] rewards and V(x) of its prompt
            out = {"aux_rewards": values}
            if self.value is not None:
                fitted = [self.values[sequence_key(item["prompt_ids"], [])] for item in micro.items]
                out["aux_values"] = torch.tensor(fitted, dtype=torch.float32, device=micro.device)
            return out
        out = micro.layout.named(values, self.names[:2], len(micro.items))
        if self.value is not None:  # a prompt with no training completions (eval): the expectile of its pair
            n = len(micro.items)
            pair = self._combined(values.cpu().double()).reshape(2, n)  # [2, B] combined rewards
            fitted = [self.values.get(sequence_key(item["prompt_ids"], [])) for item in micro.items]
            estimates = [
                v if v is not None else float(expectile(pair[:, i], self.value.tau)) for i, v in enumerate(fitted)
            ]
            out["aux_values"] = torch.tensor(estimates, dtype=torch.float32, device=micro.device)
        return out

    def summary(self) -> dict[str, Any]:
        return {k: round(v, 6) for k, v in self.fit_report.items()}


def _prompt_value(ctx: ProviderContext) -> PromptValue | None:
    """The loss's value baseline, if it declares ``aux_values``: the head (``value_head``, on the initial policy's
    features of every prompt of the data) or the exact per-prompt table."""
    if "aux_values" not in ctx.loss.requirements.inputs:
        return None
    hparams = ctx.loss.hparams
    # an unpaired base asks for V(x) with the pair baselines too: pair_mean is the prompt's mean (τ_e = 0.5)
    tau = 0.5 if hparams.get("baseline") == "pair_mean" else float(hparams["expectile"])
    value = PromptValue(hparams["aux_weights"], tau, seed=ctx.seed)
    if hparams.get("baseline") == "value_head":
        from prefopt.value import prompt_features

        prompts = {sequence_key(e["prompt_ids"], []): e["prompt_ids"] for e in [*ctx.data.train, *ctx.data.eval]}
        settings = ctx.settings.aux_value
        features = prompt_features(
            ctx.policy, list(prompts.values()), ctx.tokenizer.pad_token_id, settings.batch_size, ctx.device
        )
        value.features, value.head = dict(zip(prompts, features, strict=True)), settings
    return value


def _aux_reward_names(kind: str) -> tuple[str, ...]:
    return ("aux_rewards", "aux_values") if kind == "unpaired" else AuxRewards.names


@register_provider("aux_rewards", _aux_reward_names)
def _aux_rewards(ctx: ProviderContext) -> Provider:
    value = _prompt_value(ctx)
    provider = AuxRewards(ctx.settings.aux_rewards, data=None if ctx.online else ctx.data, value=value)
    if ctx.online:
        provider.on_sample = provider.observe
    return provider
