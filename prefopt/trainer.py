"""The training loop: source -> one forward -> log-probs -> loss -> accelerate step -> log / checkpoint.

What the batch holds, whether a reference model exists, and which extra sequences join the forward all follow from
the loss's declaration (``losses.get(...).requirements``); nothing here branches on a loss name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from einops import rearrange
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from transformers import get_scheduler

import losses
from losses.registry import REFERENCE_INPUTS, STANDARD_INPUTS
from prefopt import models, rewards, synthetic
from prefopt.batching import Batch, collate
from prefopt.dataset import PreparedData, prepare_data
from prefopt.errors import ConfigError
from prefopt.logps import sequence_logps
from prefopt.memory import peak_rss_mib
from prefopt.reference import cache_key, frozen_copy, generate_regularization, precompute_reference_logps, sample_extra
from prefopt.sampled_data import materialize
from prefopt.scoring import build_scorer
from prefopt.sources import OfflineSource, OnlineSource, unique_prompts
from prefopt.warm_start import warm_start

__all__ = ["train", "build_loss", "Step", "GroupStep"]

log = logging.getLogger("prefopt")

REGULARIZATION_INPUTS = ("reg_logps", "reg_lengths", "reg_ref_logps")
AUX_INPUTS = ("aux_rewards_chosen", "aux_rewards_rejected")
SUMMARY_KEYS = ("rewards/accuracies", "rewards/margins", "reward/mean", "kl")
GROUP_INPUTS = ("policy_logps", "ref_logps", "rewards", "lengths")


def build_loss(loss_cfg) -> losses.BoundLoss:
    hparams = OmegaConf.to_container(loss_cfg, resolve=True) if OmegaConf.is_config(loss_cfg) else dict(loss_cfg)
    name = hparams.pop("name")
    return losses.get(name, **hparams)


# ------------------------------------------------------------------------------------------------------- the step
class Step:
    """One micro-batch: collate -> single policy forward -> loss inputs as declared -> ``LossOutput``."""

    def __init__(
        self,
        loss_fn,
        pad_id: int,
        reference=None,
        regularization=None,
        reg_ratio: float = 1.0,
        seed=0,
        buckets: bool | int = True,
    ):
        req = loss_fn.requirements
        self.loss_fn, self.pad_id, self.reference, self.buckets = loss_fn, pad_id, reference, buckets
        self.regularization = regularization if "reg_logps" in req.inputs else None
        self.reg_ratio, self.seed = reg_ratio, seed
        carried = [*AUX_INPUTS] if "aux_rewards_chosen" in req.inputs else []
        if req.needs_reference and reference is None:
            carried += list(REFERENCE_INPUTS)  # precomputed: reference log-probs travel with the data
        self.pair_inputs = carried

    def batch(self, examples: list[dict], step: int, micro: int) -> tuple[Batch, list[dict]]:
        extra = []
        if self.regularization is not None:
            count = max(1, round(self.reg_ratio * len(examples)))
            extra = sample_extra(self.regularization, count, seed=self.seed, step=step, micro=micro)
        return collate(examples, self.pad_id, extra=extra, pair_inputs=self.pair_inputs), extra

    def __call__(self, policy, batch: Batch, extra: list[dict]) -> losses.LossOutput:
        logps = sequence_logps(
            policy, batch.input_ids, batch.attention_mask, batch.completion_mask, buckets=self.buckets
        )
        b = batch.n_pairs
        inputs = {
            "policy_chosen_logps": logps[:b],
            "policy_rejected_logps": logps[b : 2 * b],
            "chosen_lengths": batch.lengths[:b],
            "rejected_lengths": batch.lengths[b : 2 * b],
            **batch.inputs,
        }
        if extra:
            inputs["reg_logps"], inputs["reg_lengths"] = logps[2 * b :], batch.lengths[2 * b :]
            inputs["reg_ref_logps"] = torch.tensor([e["ref_logps"] for e in extra], device=logps.device)
        if self.reference is not None:
            with torch.no_grad():
                ref = sequence_logps(
                    self.reference,
                    batch.input_ids[: 2 * b],
                    batch.attention_mask[: 2 * b],
                    batch.completion_mask[: 2 * b],
                    buckets=self.buckets,
                )
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref[:b], ref[b:]
        return self.loss_fn(**inputs)


class GroupStep:
    """One micro-batch of groups (k scored completions per prompt) -> one policy forward -> a group loss."""

    def __init__(self, loss_fn, pad_id: int, buckets: bool | int = True, **_: Any):
        self.loss_fn, self.pad_id, self.buckets = loss_fn, pad_id, buckets
        self.carried = [
            name
            for name in ("rewards", "ref_logps")
            if name in (*loss_fn.requirements.inputs, *loss_fn.requirements.optional_inputs)
        ]

    def batch(self, groups: list[dict], step: int, micro: int) -> tuple[Batch, list[dict]]:
        rows = [{"prompt_ids": g["prompt_ids"], "completion_ids": c} for g in groups for c in g["completions"]]
        batch = collate([], self.pad_id, extra=rows)
        batch.inputs = {
            name: torch.tensor([g[name] for g in groups], dtype=torch.float32)
            for name in self.carried
            if name in groups[0]
        }
        return batch, []

    def __call__(self, policy, batch: Batch, extra: list[dict]) -> losses.LossOutput:
        logps = sequence_logps(
            policy, batch.input_ids, batch.attention_mask, batch.completion_mask, buckets=self.buckets
        )
        k = batch.inputs["rewards"].shape[1]
        inputs = {
            "policy_logps": rearrange(logps, "(g k) -> g k", k=k),
            "lengths": rearrange(batch.lengths, "(g k) -> g k", k=k).to(logps.dtype),
            **batch.inputs,
        }
        return self.loss_fn(**inputs)


STEPS = {"pair": Step, "group": GroupStep}  # by the loss's declared kind


# --------------------------------------------------------------------------------------------------- preparation
def _check_providers(loss_fn: losses.BoundLoss, source: str) -> None:
    kind = loss_fn.requirements.kind
    if source not in SOURCES:
        raise ConfigError(f"trainer.source must be one of {sorted(SOURCES)}, got {source!r}")
    if kind not in STEPS:
        raise ConfigError(f"loss '{loss_fn.name}' is of kind {kind!r}, which no step trains")
    if kind == "group" and source != "online":
        raise ConfigError(
            f"loss '{loss_fn.name}' is a group loss (k sampled completions per prompt); train it with trainer=online"
        )
    known = set(STANDARD_INPUTS) | set(REGULARIZATION_INPUTS) | set(AUX_INPUTS) | set(GROUP_INPUTS)
    missing = [name for name in loss_fn.requirements.inputs if name not in known]
    if missing:
        raise ConfigError(
            f"loss '{loss_fn.name}' needs input(s) {', '.join(missing)}, which the trainer cannot provide"
        )


def _attach_aux_rewards(data: PreparedData, names: list[str]) -> None:
    """UPO's auxiliary rewards, computed once over every completion (train and eval jointly z-normalised)."""
    if not names:
        raise ConfigError("the loss needs auxiliary rewards: set aux_rewards to a list of reward names")
    examples = data.train + data.eval
    prompts = [e["prompt"] for e in examples] * 2
    completions = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    scores = rewards.score_completions(list(names), prompts, completions, normalize=True)  # [2N, K]
    for i, example in enumerate(examples):
        example["aux_rewards_chosen"] = scores[i].tolist()
        example["aux_rewards_rejected"] = scores[len(examples) + i].tolist()


def _metrics_line(step: int, out_metrics: dict[str, float], prefix: str = "") -> dict[str, Any]:
    return {"step": step, **{f"{prefix}{k}": v for k, v in out_metrics.items()}}


class _Averager:
    """Mean of the loss and metrics over micro-batches, kept as tensors: one host transfer per step, not per metric.
    Also counts the non-pad tokens forwarded (``tokens``)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.tokens = 0

    def add(self, out: losses.LossOutput) -> None:
        self.count += 1
        for key, value in {"loss": out.loss.detach(), **out.metrics}.items():
            value = value.detach().double()
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    def mean(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        values = (torch.stack([self.sums[k] for k in keys]) / self.count).tolist()
        return dict(zip(keys, values, strict=True))


# ------------------------------------------------------------------------------------------------------ sources
@dataclass
class Setup:
    """What a source builder hands the loop."""

    source: Any  # OfflineSource | OnlineSource
    step_reference: Any  # live reference model the step runs, or None (precomputed / carried by the source)
    evaluate: Callable[[Any, Any, int], dict[str, float]]  # (policy, step_fn, step) -> eval metrics, all processes
    summary: dict[str, Any]


def _offline(cfg, *, policy, tokenizer, data, fingerprint, loss_fn, micro, accelerator, run_dir) -> Setup:
    """Dataset pairs; the reference as ``reference.mode`` says (precomputed on disk, or a live frozen copy)."""
    reference = None
    if loss_fn.requirements.needs_reference:
        if cfg.reference.mode == "live":
            reference = frozen_copy(policy)
        elif cfg.reference.mode == "precomputed":
            for split, examples in (("train", data.train), ("eval", data.eval)):
                key = cache_key("ref", fingerprint, data.fingerprint, split)
                precompute_reference_logps(
                    policy,
                    examples,
                    pad_id=tokenizer.pad_token_id,
                    batch_size=2 * micro,
                    device=accelerator.device,
                    cache=Path(cfg.cache_dir).expanduser() / "reference" / f"{key}.safetensors",
                )
        else:
            raise ConfigError(f"reference.mode must be precomputed or live, got {cfg.reference.mode!r}")
    if "aux_rewards_chosen" in loss_fn.requirements.inputs:
        _attach_aux_rewards(data, list(cfg.aux_rewards or []))
    tcfg = cfg.trainer
    source = OfflineSource(
        data.train,
        batch_size=tcfg.batch_size,
        micro=micro,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        seed=tcfg.seed,
    )

    sampler = (
        _sampler(
            cfg,
            policy,
            tokenizer,
            data,
            req=loss_fn.requirements,
            micro=micro,
            accelerator=accelerator,
            run_dir=run_dir,
        )
        if tcfg.get("sample_eval")
        else None
    )

    def evaluate(model, step_fn, step):
        metrics = _evaluate(accelerator, model, step_fn, data.eval, micro, step) if data.eval else {}
        if sampler is not None:
            metrics.update(_reduce(accelerator, sampler.evaluate(accelerator.unwrap_model(model))))
        return metrics

    return Setup(source, reference, evaluate, {"train_pairs": len(data.train), "eval_pairs": len(data.eval)})


def _online(cfg, *, policy, tokenizer, data, fingerprint, loss_fn, micro, accelerator, run_dir) -> Setup:
    """Samples from the current policy each step, scored by ``cfg.reward``; the frozen initial policy is the
    reference (its log-probs of every sample travel with the batch, and give the sampled KL)."""
    source = _sampler(
        cfg, policy, tokenizer, data, req=loss_fn.requirements, micro=micro, accelerator=accelerator, run_dir=run_dir
    )

    def evaluate(model, step_fn, step):
        return _reduce(accelerator, source.evaluate(accelerator.unwrap_model(model)))

    summary = {
        "train_prompts": len(source.prompts),
        "eval_prompts": len(source.eval_prompts),
        "reward": cfg.reward.get("name"),
    }
    return Setup(source, None, evaluate, summary)


def _sampler(cfg, policy, tokenizer, data, *, req, micro, accelerator, run_dir) -> OnlineSource:
    """An :class:`OnlineSource` over the data's prompts, scored by ``cfg.reward``, with the frozen initial policy as
    reference: the batch source of online runs, and the sampling evaluator of ``trainer.sample_eval``."""
    tcfg = cfg.trainer
    if "reward" not in cfg:
        raise ConfigError("sampling needs a reward: add reward=NAME (conf/reward/)")
    reference = frozen_copy(policy)
    scorer = build_scorer(cfg.reward).to(accelerator.device)
    source = OnlineSource(
        unique_prompts(data.train),
        unique_prompts(data.eval),
        tokenizer=tokenizer,
        scorer=scorer,
        reference=reference,
        kind=req.kind,
        carry_reference=req.needs_reference,
        aux_rewards=list(cfg.aux_rewards or []) if "aux_rewards_chosen" in req.inputs else [],
        cfg=tcfg.online,
        batch_size=tcfg.batch_size,
        micro=micro,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        seed=tcfg.seed,
        device=accelerator.device,
    )
    _prepare_scorer(cfg, source, scorer, reference, run_dir, accelerator)
    return source


def _prepare_scorer(cfg, source, scorer, reference, run_dir: Path, accelerator) -> None:
    """Before training: ``reward.select: auto`` runs ALaRM's consistency-based aspect selection on reference samples
    (``reward_selection.json``), then the scorer's statistics (ALaRM's z-normalisation) are estimated on reference
    samples (``reward_stats.json``). A resumed run reloads both from the run dir instead."""
    stats_path, selection_path = run_dir / "reward_stats.json", run_dir / "reward_selection.json"
    resuming = cfg.trainer.resume not in (False, None, "false", "False")
    if cfg.reward.get("select", "none") == "auto":
        if resuming and selection_path.exists():
            result = json.loads(selection_path.read_text())
        else:
            from prefopt.select_rewards import format_table, select

            result = select(cfg.reward, source, reference, scorer)
            if accelerator.is_main_process:
                selection_path.write_text(json.dumps(result, indent=2))
            log.info("reward selection:\n%s", format_table(result))
        scorer.set_weights(result["weights"])
    if resuming and stats_path.exists():
        scorer.load_stats(json.loads(stats_path.read_text()))
        return
    stats = source.fit_scorer(reference)
    if accelerator.is_main_process and stats:
        stats_path.write_text(json.dumps(stats, indent=2))


SOURCES = {"offline": _offline, "online": _online}


# ------------------------------------------------------------------------------------------------------ the loop
def train(cfg, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train ``cfg.loss`` on ``cfg.data`` with ``cfg.model``; writes the run dir and returns the summary."""
    started = time.time()
    tcfg = cfg.trainer
    run_dir = Path(run_dir or cfg.get("run_dir") or "outputs/run").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cfg.cache_dir).expanduser()
    loss_fn = build_loss(cfg.loss)
    source_name = str(tcfg.get("source", "offline"))
    _check_providers(loss_fn, source_name)
    req = loss_fn.requirements

    micro = tcfg.micro_batch_size or tcfg.batch_size
    accelerator = Accelerator(
        mixed_precision=tcfg.mixed_precision, cpu=tcfg.cpu, log_with="tensorboard", project_dir=str(run_dir)
    )
    world = accelerator.num_processes
    if tcfg.batch_size % (micro * world):
        raise ConfigError(
            f"trainer.batch_size={tcfg.batch_size} must be a multiple of micro_batch_size={micro} x {world} process(es)"
        )
    set_seed(tcfg.seed)

    tokenizer = models.build_tokenizer(cfg.model, cache_dir, corpus=synthetic.default_corpus)
    policy = models.build_model(cfg.model, tokenizer)
    device = accelerator.device
    policy.to(device)
    fingerprint = models.model_fingerprint(cfg.model, policy)
    sampled = cfg.data.source == "sampled"  # pairs sampled from the starting policy, labelled by a gold reward
    data = None if sampled else prepare_data(cfg.data, tokenizer, cache_dir=cache_dir)  # bad data fails before SFT
    fingerprint = warm_start(
        policy, tokenizer, cfg.model.get("sft"), fingerprint=fingerprint, cache_dir=cache_dir, device=device
    )
    if sampled:
        local = materialize(cfg.data, policy, tokenizer, fingerprint=fingerprint, cache_dir=cache_dir, device=device)
        data = prepare_data(local, tokenizer, cache_dir=cache_dir)
    setup = SOURCES[source_name](
        cfg,
        policy=policy,
        tokenizer=tokenizer,
        data=data,
        fingerprint=fingerprint,
        loss_fn=loss_fn,
        micro=micro,
        accelerator=accelerator,
        run_dir=run_dir,
    )
    source = setup.source
    regularization = None
    if "reg_logps" in req.inputs:
        rcfg = cfg.regularization
        key = cache_key("reg", fingerprint, data.fingerprint, OmegaConf.to_container(rcfg), tcfg.seed)
        regularization = generate_regularization(
            policy,
            tokenizer,
            [e["prompt_ids"] for e in data.train],
            samples_per_prompt=rcfg.samples_per_prompt,
            max_new_tokens=rcfg.max_new_tokens,
            temperature=rcfg.temperature,
            top_p=rcfg.top_p,
            batch_size=rcfg.batch_size,
            seed=tcfg.seed,
            device=device,
            cache=cache_dir / "regularization" / f"{key}.safetensors",
        )
        if not regularization:
            raise ConfigError("no regularisation samples were generated (every sample was empty)")

    _performance_settings(tcfg, policy, device)
    optimizer = _optimizer(tcfg, policy)
    scheduler = get_scheduler(
        tcfg.scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps, num_training_steps=tcfg.max_steps
    )
    # accelerate checkpoints the prepared scheduler (loaded with weights_only=True); it is stepped below through
    # `.scheduler`, once per optimizer step, because the wrapper would step it once per process.
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    step_fn = STEPS[req.kind](
        loss_fn,
        tokenizer.pad_token_id,
        reference=setup.step_reference,
        regularization=regularization,
        reg_ratio=cfg.regularization.batch_ratio,
        seed=tcfg.seed,
        buckets=_buckets(tcfg),
    )
    metrics_path = run_dir / "metrics.jsonl"
    step = _resume(accelerator, tcfg.resume, run_dir, source)
    _truncate_metrics(accelerator, metrics_path, step)

    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    accelerator.init_trackers("tensorboard")
    log.info(
        "loss %s (%s): source=%s reference=%s extras=%s; %s",
        loss_fn.name,
        req.kind,
        source_name,
        cfg.reference.mode
        if req.needs_reference and source_name == "offline"
        else ("live" if source_name == "online" else "none"),
        list(req.extras),
        setup.summary,
    )
    summary: dict[str, Any] = {
        "loss_name": loss_fn.name,
        "source": source_name,
        "reference_model": setup.step_reference is not None,
    }
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    guard = NonFiniteGuard(tcfg.max_nonfinite_steps)
    bar = tqdm(
        total=tcfg.max_steps,
        initial=step,
        disable=not accelerator.is_main_process or not tcfg.progress_bar,
        desc=f"{loss_fn.name}",
    )
    if tcfg.get("eval_at_start") and tcfg.eval_every and step == 0:  # the starting point of the curves
        _log(accelerator, metrics_path, _metrics_line(0, setup.evaluate(policy, step_fn, 0), "eval/"))
    policy.train()
    summary["seconds_to_first_step"] = round(time.time() - started, 2)  # setup: tokenizer, model, data, reference
    while step < tcfg.max_steps:
        step_started = time.perf_counter()
        draw = source.draw(accelerator.unwrap_model(policy), step)
        averager, problem = _accumulate(accelerator, policy, step_fn, draw.micro_batches, step)
        empty = _agree(accelerator, None if averager.count else "no training items (every sampled reward tied)")
        grad_norm = _grad_norm(accelerator, policy, tcfg.max_grad_norm) if problem is None and empty is None else None
        if grad_norm is not None and not math.isfinite(grad_norm):
            problem = f"non-finite gradient norm ({grad_norm})"
        problem = _agree(accelerator, problem)
        step += 1
        if problem is None and empty is None:
            optimizer.step()
            scheduler.scheduler.step()
            guard.ok()
            perf = {"perf/step_seconds": time.perf_counter() - step_started, "perf/tokens": float(averager.tokens)}
            line = last_train = {
                **_reduce(accelerator, {**averager.mean(), **draw.metrics, **perf}),
                "grad_norm": grad_norm,
            }
            _perf_totals(line, accelerator.num_processes)
            line["perf/peak_memory_mib"] = _peak_memory_mib(device)
        elif problem is None:
            log.warning("step %d skipped: %s", step, empty)
            line = {"skipped": 1, **_reduce(accelerator, draw.metrics)}
        elif guard.skip(step, problem):
            optimizer.zero_grad()
            _save_checkpoint(accelerator, run_dir, step, source, tcfg.keep_last)
            raise NonFiniteTraining(
                f"stopped at step {step}: {guard.consecutive} steps in a row had {problem}; checkpoint saved in "
                f"{run_dir / 'checkpoints' / f'step-{step}'}"
            )
        else:
            line = {"skipped": 1}
        optimizer.zero_grad()
        line.update(lr=scheduler.get_last_lr()[0], nonfinite_steps=guard.total, epoch=source.order.epochs)
        if step % tcfg.log_every == 0 or step == tcfg.max_steps or "skipped" in line:
            _log(accelerator, metrics_path, _metrics_line(step, line))
        if draw.table:
            _log_table(accelerator, metrics_path, step, draw.table)
        if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == tcfg.max_steps):
            last_eval = setup.evaluate(policy, step_fn, step)
            if last_eval:
                _log(accelerator, metrics_path, _metrics_line(step, last_eval, "eval/"))
        if tcfg.save_every and step % tcfg.save_every == 0 and step < tcfg.max_steps:
            _save_checkpoint(accelerator, run_dir, step, source, tcfg.keep_last)
        bar.update(1)
        bar.set_postfix(_postfix(last_train))
    bar.close()
    summary["nonfinite_steps"] = guard.total

    final_dir = run_dir / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(policy).save_pretrained(final_dir, safe_serialization=True)
        tokenizer.save_pretrained(final_dir)
    accelerator.end_training()
    summary.update(
        steps=step,
        seconds=round(time.time() - started, 1),
        train=last_train,
        eval=last_eval,
        run_dir=str(run_dir),
        model_dir=str(final_dir),
        metrics=str(metrics_path),
        **setup.summary,
        data_stats=data.stats,
    )
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _performance_settings(tcfg, policy, device: torch.device) -> None:
    """``trainer.flush_denormal``: on a CPU, flush fp32 denormals to zero. Saturated sigmoids (MPO's σ(ΔS) on summed
    log-probs, DPO late in training) give gradients around 1e-40, and arithmetic on denormals is 10-100x slower on
    x86: single steps took 3-10x their median before this. ``trainer.gradient_checkpointing``: recompute each
    decoder layer in backward (less activation memory, ~1/3 more compute)."""
    if device.type == "cpu" and tcfg.get("flush_denormal", True) and not torch.set_flush_denormal(True):
        log.info("trainer.flush_denormal: this CPU cannot flush denormals (no SSE3); left as is")
    if tcfg.get("gradient_checkpointing", False):
        if not getattr(policy, "supports_gradient_checkpointing", False):
            raise ConfigError(f"trainer.gradient_checkpointing: {type(policy).__name__} does not support it")
        kwargs = {"use_reentrant": False}
        if hasattr(policy, "activation_checkpointing_enable"):  # transformers >= 5.x name
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _buckets(tcfg) -> bool | int:
    """``sequence_logps``'s ``buckets`` from ``trainer.length_buckets`` / ``trainer.bucket_overhead_tokens``."""
    if not tcfg.get("length_buckets", True):
        return False
    overhead = tcfg.get("bucket_overhead_tokens")
    return True if overhead is None else int(overhead)


def _peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far: allocated GPU memory on CUDA, else the peak resident set size."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()


def _perf_totals(line: dict[str, float], world: int) -> None:
    """``perf/tokens`` over all processes (it was averaged with the other metrics) and tokens per second; the step
    time is the mean over processes (they synchronise on the gradient all-reduce)."""
    line["perf/tokens"] *= world
    line["perf/tokens_per_second"] = line["perf/tokens"] / max(line["perf/step_seconds"], 1e-9)


def _postfix(metrics: dict[str, float]) -> dict[str, str]:
    shown = {"loss": "loss", "margin": "rewards/margins", "acc": "rewards/accuracies", "reward": "online/reward/mean"}
    return {short: f"{metrics[key]:.4f}" for short, key in shown.items() if key in metrics}


def _log_table(accelerator: Accelerator, path: Path, step: int, table: list[dict]) -> None:
    """A few sampled prompts, completions and rewards: a ``samples`` line in metrics.jsonl and a TensorBoard text."""
    if not accelerator.is_main_process:
        return
    with path.open("a") as handle:
        handle.write(json.dumps({"step": step, "samples": table}) + "\n")
    columns = list(table[0])
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    rows += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in table]
    try:
        accelerator.get_tracker("tensorboard", unwrap=True).add_text("samples", "\n".join(rows), step)
    except (AttributeError, ValueError):  # no TensorBoard tracker
        pass


def _cell(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value).replace("|", "\\|").replace("\n", " ")


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


def _accumulate(accelerator, policy, step_fn: Step, micro_batches: list[list[dict]], step: int):
    """Forward + backward over the micro-batches of one optimizer step (gradients synchronised on the last only).

    A non-finite loss input or value (``losses.NonFiniteError``) does not stop the loop: the micro-batch backpropagates
    a zero through every parameter instead, so all processes run the same collective calls, and the problem is
    returned for the step to be skipped."""
    averager, problem = _Averager(), None
    for m, examples in enumerate(micro_batches):
        last = m == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(policy):
            try:
                if not examples:  # an online micro-batch whose sampled rewards all tied: nothing to learn from
                    raise _Empty
                batch, extra = step_fn.batch(examples, step, m)
                averager.tokens += int(batch.attention_mask.sum())
                out = step_fn(policy, batch.to(accelerator.device), extra)
                loss = out.loss / len(micro_batches)
                averager.add(out)
            except losses.NonFiniteError as error:
                problem = problem or f"a non-finite loss ({error})"
                loss = _zero_loss(policy)
            except _Empty:
                loss = _zero_loss(policy)
            accelerator.backward(loss)
    return averager, problem


class _Empty(Exception):
    pass


def _zero_loss(policy) -> torch.Tensor:
    """A zero that reaches every trainable parameter, so every process still runs the same gradient all-reduce."""
    return sum(p.sum() * 0.0 for p in policy.parameters() if p.requires_grad)


def _grad_norm(accelerator: Accelerator, policy, max_grad_norm: float) -> float:
    """Total gradient norm (clipped to ``max_grad_norm`` when > 0); non-finite norms are reported, not clipped."""
    norm = accelerator.clip_grad_norm_(policy.parameters(), max_grad_norm if max_grad_norm else math.inf)
    return float(norm)


def _agree(accelerator: Accelerator, problem: str | None) -> str | None:
    """Skip the step on every process if any process saw a problem (they must take the same branch)."""
    if accelerator.num_processes == 1:
        return problem
    flag = accelerator.reduce(torch.tensor([float(problem is not None)], device=accelerator.device), "sum")
    return problem or ("a non-finite value on another process" if flag.item() > 0 else None)


def _truncate_metrics(accelerator: Accelerator, path: Path, step: int) -> None:
    """On resume, drop the lines a killed run logged after its checkpoint, so each step is logged once."""
    if not accelerator.is_main_process or not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def _optimizer(tcfg, model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if tcfg.optimizer == "adamw":
        # fused: one kernel per parameter group instead of a dozen per tensor (torch's CPU and CUDA fused AdamW)
        fused = bool(tcfg.get("fused_optimizer", True)) and all(
            p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params
        )
        return torch.optim.AdamW(
            params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=tuple(tcfg.adam_betas), fused=fused or None
        )
    if tcfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    raise ConfigError(f"trainer.optimizer must be adamw or rmsprop, got {tcfg.optimizer!r}")


def _reduce(accelerator: Accelerator, metrics: dict[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    values = accelerator.reduce(torch.tensor([metrics[k] for k in keys], device=accelerator.device), "mean")
    return dict(zip(keys, values.tolist(), strict=True))


def _log(accelerator: Accelerator, path: Path, line: dict[str, Any]) -> None:
    step = line["step"]
    accelerator.log({k: v for k, v in line.items() if k != "step" and isinstance(v, (int, float))}, step=step)
    if accelerator.is_main_process:
        with path.open("a") as handle:
            handle.write(json.dumps(line) + "\n")


@torch.no_grad()
def _evaluate(accelerator, policy, step_fn: Step, examples: list[dict], micro: int, step: int) -> dict[str, float]:
    """The same loss and metrics on the eval split (this process's shard), averaged over micro-batches."""
    policy.eval()
    averager = _Averager()
    shard = examples[accelerator.process_index :: accelerator.num_processes]
    for start in range(0, len(shard), micro):
        batch, extra = step_fn.batch(shard[start : start + micro], step, -1 - start)
        averager.add(step_fn(policy, batch.to(accelerator.device), extra))
    policy.train()
    return _reduce(accelerator, averager.mean())


def _save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, source, keep_last: int | None) -> None:
    """``checkpoints/step-N``: written to a temporary dir, renamed when complete; old ones pruned after."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **source.state()}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            for old in sorted(_checkpoints(root), key=lambda p: int(p.name.split("-")[1]))[:-keep_last]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _checkpoints(root: Path) -> list[Path]:
    return (
        [p for p in root.glob("step-*") if p.is_dir() and (p / "trainer_state.json").exists()] if root.exists() else []
    )


def _resume(accelerator: Accelerator, resume: Any, run_dir: Path, source) -> int:
    """0 for a fresh run; else restore model, optimizer, scheduler, RNG and data position and return the step."""
    if resume in (False, None, "false", "False"):
        return 0
    if resume in (True, "true", "True", "latest"):
        found = _checkpoints(run_dir / "checkpoints")
        if not found:
            log.warning("trainer.resume=true but %s has no checkpoint; starting fresh", run_dir / "checkpoints")
            return 0
        path = max(found, key=lambda p: int(p.name.split("-")[1]))
    else:
        path = Path(str(resume))
        if not (path / "trainer_state.json").exists():
            raise ConfigError(f"trainer.resume={resume}: not a checkpoint directory (no trainer_state.json)")
    accelerator.load_state(str(path))
    state = json.loads((path / "trainer_state.json").read_text())
    source.load_state(state)
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])


def format_summary(summary: dict[str, Any]) -> str:
    """The few lines printed at the end of a run."""
    evaluation, train_metrics = summary.get("eval") or {}, summary.get("train") or {}
    lines = [f"prefopt: trained {summary['loss_name']} for {summary['steps']} steps in {summary['seconds']}s"]
    lines.append(f"  final train loss {train_metrics.get('loss', math.nan):.4f}")
    for key in SUMMARY_KEYS:
        train_value = train_metrics.get(key, train_metrics.get(f"online/{key}", math.nan))
        if key in evaluation or not math.isnan(train_value):
            lines.append(f"  {key}: eval {evaluation.get(key, math.nan):.4f}  train {train_value:.4f}")
    lines.append(f"  model: {summary['model_dir']}")
    lines.append(f"  metrics: {summary['metrics']}")
    lines.append(f"run dir: {summary['run_dir']}")
    return "\n".join(lines)
