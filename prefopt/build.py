"""Config -> a ready :class:`Run`: the only module that reads a composed Hydra config.

:func:`read_settings` turns the config into typed, validated :class:`Settings` once; :func:`build` makes the parts
from them — accelerator, tokenizer, policy (warm-started), data, the one :class:`~prefopt.reference.Reference`,
the providers the loss's declaration calls for (:func:`prefopt.providers.plan`), the batch source, the step, the
evaluation, optimizer and scheduler. The loop (:mod:`prefopt.trainer`) only runs them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_scheduler

import losses
from prefopt import (
    critic,  # noqa: F401 - registers the 'values' provider
    models,
    prefix_reference,  # noqa: F401 - registers the 'reference_shared' provider (LD-DPO)
    reward_model,
)
from prefopt.adapters import AdapterSettings, adapter_state, apply_adapters, quantization_config, read_adapter_settings
from prefopt.cache import cache_key
from prefopt.config import ConfigError, plain
from prefopt.data.prepare import PreparedData, prepare_data
from prefopt.data.sampled import materialize
from prefopt.data.synthetic import default_corpus
from prefopt.metrics import reduce_mean
from prefopt.providers import ProviderContext, plan
from prefopt.reference import Reference
from prefopt.reward_model import RewardLayout
from prefopt.scoring import build_scorer
from prefopt.selection import format_table, select
from prefopt.settings import (
    TRACKERS,
    AuxValueSettings,
    DataSettings,
    ReferenceSettings,
    RegularizationSettings,
    SftDataSettings,
    TrainerSettings,
)
from prefopt.sources import OfflineSource, OnlineSource, unique_prompts
from prefopt.step import LAYOUTS, Step, evaluate_loss
from prefopt.unpaired import UnpairedSource
from prefopt.warm_start import warm_start

__all__ = ["Settings", "Run", "read_settings", "build", "build_loss", "build_policy"]

log = logging.getLogger("prefopt")


@dataclass(frozen=True)
class Settings:
    """A whole run, typed. ``model`` and ``reward`` stay mappings: their schema is open (a hub model's own
    fields, a reward's ``_target_``)."""

    loss: dict[str, Any]  # name + hyper-parameters
    model: dict[str, Any]
    data: DataSettings
    trainer: TrainerSettings
    reference: ReferenceSettings
    regularization: RegularizationSettings
    sft_data: SftDataSettings
    reward: dict[str, Any] | None
    aux_rewards: tuple[str, ...]
    aux_value: AuxValueSettings
    adapters: AdapterSettings  # model.lora / model.adapter / model.quantization
    cache_dir: Path
    resolved: dict[str, Any] = field(repr=False)  # the whole config, for config.yaml


def read_settings(cfg: Any) -> Settings:
    """Typed settings from a composed config (a DictConfig or a plain mapping); one line per bad value."""
    resolved = plain(cfg)
    return Settings(
        loss=dict(resolved["loss"]),
        model=dict(resolved["model"]),
        data=DataSettings.from_mapping(resolved["data"]),
        trainer=TrainerSettings.from_mapping(resolved["trainer"]),
        reference=ReferenceSettings.from_mapping(resolved.get("reference")),
        regularization=RegularizationSettings.from_mapping(resolved.get("regularization")),
        sft_data=SftDataSettings.from_mapping(resolved.get("sft_data")),
        reward=resolved.get("reward"),
        aux_rewards=tuple(resolved.get("aux_rewards") or ()),
        aux_value=AuxValueSettings.from_mapping(resolved.get("aux_value")),
        adapters=read_adapter_settings(resolved["model"]),
        cache_dir=Path(str(resolved.get("cache_dir") or "~/.cache/prefopt")).expanduser(),
        resolved=resolved,
    )


def build_loss(loss: dict[str, Any]) -> losses.BoundLoss:
    """The registered loss ``loss["name"]`` bound to the other keys (its hyper-parameters)."""
    hparams = dict(loss)
    return losses.get(hparams.pop("name"), **hparams)


@dataclass
class Policy:
    """The starting point of a run: tokenizer, warm-started policy, data and the fingerprint of the weights."""

    tokenizer: Any
    model: torch.nn.Module
    data: PreparedData
    fingerprint: str
    adapters: str = "none"  # none | fresh (a new LoRA adapter: reference = adapters disabled) | trained


def build_policy(settings: Settings, device: torch.device) -> Policy:
    """Tokenizer, policy (built, moved, warm-started, then wrapped in its adapter if any) and data; ``data=sampled``
    pairs are sampled from that starting policy, any other data is prepared first so a bad data path fails before the
    warm start."""
    cache_dir = settings.cache_dir
    quantization = quantization_config(settings.adapters, device)  # refused here without CUDA
    tokenizer = models.build_tokenizer(settings.model, cache_dir, corpus=default_corpus)
    policy = models.build_model(settings.model, tokenizer, quantization=quantization)
    policy = policy if quantization is not None else policy.to(device)
    fingerprint = models.model_fingerprint(settings.model, policy)
    sampled = settings.data.source == "sampled"
    data = None if sampled else prepare_data(settings.data, tokenizer, cache_dir=cache_dir)
    fingerprint = warm_start(
        policy, tokenizer, settings.model.get("sft"), fingerprint=fingerprint, cache_dir=cache_dir, device=device
    )
    policy, fingerprint = apply_adapters(policy, settings.adapters, fingerprint)
    if sampled:
        local = materialize(
            settings.data, policy, tokenizer, fingerprint=fingerprint, cache_dir=cache_dir, device=device
        )
        data = prepare_data(local, tokenizer, cache_dir=cache_dir)
    if build_loss(settings.loss).requirements.kind == "reward":  # a reward model: the warm-started decoder + a head
        policy, fingerprint = reward_model.classifier_from(policy, settings.model, fingerprint, settings.adapters)
    return Policy(tokenizer, policy, data, fingerprint, settings.adapters.kind)


@dataclass
class Run:
    """Everything the loop needs, built."""

    settings: Settings
    run_dir: Path
    accelerator: Accelerator
    loss_fn: losses.BoundLoss
    tokenizer: Any
    policy: torch.nn.Module
    data: PreparedData
    reference: Reference | None
    providers: list  # [Provider], in forward order
    source: Any  # OfflineSource | OnlineSource
    step: Step
    evaluate: Callable[[torch.nn.Module, int], dict[str, float]]  # (policy, step) -> eval metrics, all processes
    optimizer: torch.optim.Optimizer
    scheduler: Any
    summary: dict[str, Any]


def build(cfg: Any, run_dir: str | Path) -> Run:
    """Read the settings and build every part of the run (see the module docstring)."""
    settings = cfg if isinstance(cfg, Settings) else read_settings(cfg)
    tcfg, online = settings.trainer, settings.trainer.source == "online"
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    loss_fn = build_loss(settings.loss)
    layout = _layout(loss_fn, tcfg)
    required, optional = plan(loss_fn, layout.names)  # an input nobody supplies fails before anything is built
    accelerator = _accelerator(tcfg, run_dir)
    device = accelerator.device
    req = loss_fn.requirements
    split = tcfg.batch_size > tcfg.micro_batch_size  # several calls per step, whose statistics the loss must share
    if req.kind == "token" and "advantages" not in req.inputs and not loss_fn.spec.step_sums and split:
        log.warning(  # its own advantages from the rewards: statistics of the call, i.e. of one micro-batch
            "loss '%s' builds its advantages from the micro-batch it is given: with %d micro-batches per step "
            "(accumulation x processes) its normalisation is per micro-batch, not over the step's batch; set "
            "trainer.micro_batch_size=%d for one call per step",
            loss_fn.name, tcfg.batch_size // tcfg.micro_batch_size, tcfg.batch_size,
        )  # fmt: skip
    set_seed(tcfg.seed)
    start = build_policy(settings, device)
    if isinstance(layout, RewardLayout):  # completions are scored without the EOS the data appends
        layout.eos_id = start.tokenizer.eos_token_id
    _check_data_kind(loss_fn, layout, start.data)
    reference = _reference(settings, loss_fn, start, device, needs_model=online or tcfg.sample_eval)
    _check_sync(settings, loss_fn, reference)
    ctx = ProviderContext(
        loss=loss_fn,
        policy=start.model,
        tokenizer=start.tokenizer,
        data=start.data,
        reference=reference,
        device=device,
        cache_dir=settings.cache_dir,
        fingerprint=start.fingerprint,
        settings=settings,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
    )
    factories = required + [f for f in optional if f.when_optional(ctx)]
    providers = [factory.build(ctx) for factory in factories]
    sampler = None
    if online or tcfg.sample_eval:
        observers = [p.on_sample for p in providers if p.on_sample is not None]
        sampler = _sampler(settings, start, reference, layout.kind, accelerator, run_dir, observers)
    source = (
        sampler
        if online
        else OFFLINE_SOURCES.get(layout.kind, OfflineSource)(
            start.data.train,
            batch_size=tcfg.batch_size,
            micro_batch_size=tcfg.micro_batch_size,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            seed=tcfg.seed,
        )
    )
    _performance_settings(tcfg, start.model, device)
    optimizer = _optimizer(tcfg, start.model)
    scheduler = get_scheduler(
        tcfg.scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps, num_training_steps=tcfg.max_steps
    )
    policy, optimizer, scheduler = accelerator.prepare(start.model, optimizer, scheduler)
    step = Step(loss_fn, layout, providers, pad_id=start.tokenizer.pad_token_id, buckets=tcfg.buckets, device=device)
    with_pairs = getattr(layout, "eval_items", None)  # unpaired rows: with their mismatched pairs
    eval_items = [] if online else with_pairs(start.data.eval, tcfg.batch_size) if with_pairs else start.data.eval
    evaluation = Evaluation(accelerator, step, eval_items, tcfg.micro_batch_size, sampler)
    names = [f.name for f in factories]
    log.info(
        "loss %s (%s): source=%s reference=%s providers=%s",
        loss_fn.name,
        layout.kind,
        tcfg.source,
        "none" if reference is None else ("table" if reference.table else "live"),
        names,
    )
    summary = {
        "loss_name": loss_fn.name,
        "source": tcfg.source,
        "distributed": f"{accelerator.distributed_type.value} x {accelerator.num_processes}",
        "reference_model": "reference" in names and not online and reference.is_live,  # a second forward per step
        "adapters": start.adapters,
        **adapter_state(start.model),
        **_data_summary(settings, start.data, source, online),
        **{k: v for provider in providers for k, v in provider.summary().items()},
    }
    return Run(
        settings, run_dir, accelerator, loss_fn, start.tokenizer, policy, start.data, reference, providers, source,
        step, evaluation, optimizer, scheduler, summary,
    )  # fmt: skip


def _check_sync(settings: Settings, loss_fn: losses.BoundLoss, reference: Reference | None) -> None:
    """``reference.sync`` moves the reference model: it needs one the loss uses, live, and not the policy itself."""
    if not settings.reference.sync.every:
        return
    if reference is None or not loss_fn.requirements.needs_reference:
        raise ConfigError(f"reference.sync: loss '{loss_fn.name}' uses no reference model to move")
    if not reference.is_live:
        raise ConfigError(
            "reference.sync moves the reference during training, so it cannot be a precomputed table: "
            "set reference.mode=live"
        )
    if reference.adapter_off:
        raise ConfigError(
            "reference.sync: with a fresh LoRA adapter the reference is the base model under the adapter, which "
            "training never moves; start from a trained adapter (model.adapter=PATH: its reference is a copy) or "
            "train without LoRA"
        )


def _layout(loss_fn: losses.BoundLoss, settings: TrainerSettings):
    """The step's layout for the loss's kind (pairs, groups or per-token groups); group and token losses sample
    their groups online."""
    kind, online = loss_fn.requirements.kind, settings.source == "online"
    if kind not in LAYOUTS:
        raise ConfigError(f"loss '{loss_fn.name}' is of kind {kind!r}, which no step trains")
    sampling = settings.online
    if online and kind != "token":
        for name, value, default in (
            ("steps_per_generation", sampling.steps_per_generation, 1),
            ("mask_truncated_completions", sampling.mask_truncated_completions, False),
            ("early_stopping", sampling.early_stopping, False),
        ):
            if value != default:
                raise ConfigError(
                    f"trainer.online.{name}={value} needs a token loss (grpo, dapo, ppo, ...: old log-probs and "
                    f"per-token masks); loss '{loss_fn.name}' is a {kind} loss"
                )
    if online and kind == "pair" and sampling.dynamic_sampling:
        raise ConfigError(
            f"trainer.online.dynamic_sampling is for group and token losses; loss '{loss_fn.name}' builds pairs, "
            "which already skip prompts whose rewards tie"
        )
    if kind in ("group", "token") and not online:
        raise ConfigError(
            f"loss '{loss_fn.name}' is a {kind} loss (k sampled completions per prompt); train it with trainer=online"
        )
    if kind == "unpaired" and online:
        raise ConfigError(
            f"loss '{loss_fn.name}' is an unpaired loss (single completions labelled desirable or undesirable); "
            "train it offline (trainer=default) on unpaired data"
        )
    if kind == "token":
        return LAYOUTS[kind](settings.online.scale_rewards, width=settings.online.max_new_tokens)
    if kind == "reward":
        reward_model.check_reward_run(loss_fn.name, settings)  # no sampling
    return LAYOUTS[kind]()


OFFLINE_SOURCES = {"unpaired": UnpairedSource}  # layout kind -> offline batch source (else OfflineSource)


def _check_data_kind(loss_fn: losses.BoundLoss, layout, data: PreparedData) -> None:
    """Pairs for a pairwise loss, unpaired rows for an unpaired one (online sources sample their own)."""
    wanted = "pair" if layout.kind == "reward" else layout.kind  # a reward model trains on pairs
    if wanted not in ("pair", "unpaired") or data.kind == wanted:
        return
    if layout.kind == "unpaired":
        raise ConfigError(
            f"loss '{loss_fn.name}' trains on unpaired rows (prompt, completion, label) but the data are pairs; "
            "set data.unpair=true to split each pair into a desirable and an undesirable row"
        )
    raise ConfigError(
        f"loss '{loss_fn.name}' trains on pairs but the data are unpaired rows (prompt, completion, label); "
        "use an unpaired loss (kto, apo_zero_unpaired) or paired data"
    )


def _accelerator(tcfg: TrainerSettings, run_dir: Path) -> Accelerator:
    from accelerate.utils import ProjectConfiguration

    _check_trackers(tcfg.report_to)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun (and accelerate launch's multi-process modes)
    accelerator = Accelerator(  # the scheduler steps once per optimizer step, not once per process
        mixed_precision=tcfg.mixed_precision,
        # several processes without CUDA: gloo on the CPU (accelerate would otherwise run each process alone)
        cpu=tcfg.cpu or (world > 1 and not torch.cuda.is_available()),
        log_with=list(tcfg.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
        step_scheduler_with_optimizer=False,
    )
    _shard_on_cpus(accelerator)
    if accelerator.num_processes != world:
        raise ConfigError(
            f"launched as {world} processes but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}); on a CPU use torchrun --nproc_per_node N -m prefopt.train"
        )
    micro, world = tcfg.micro_batch_size, accelerator.num_processes
    if tcfg.batch_size % (micro * world):
        raise ConfigError(
            f"trainer.batch_size={tcfg.batch_size} must be a multiple of micro_batch_size={micro} x {world} process(es)"
        )
    return accelerator


def _shard_on_cpus(accelerator: Accelerator) -> None:
    """FSDP launched on CPUs (``accelerate launch --config_file conf/accelerate/fsdp.yaml`` on a machine without
    GPUs, or torchrun with ``ACCELERATE_USE_FSDP=true FSDP_VERSION=2``): accelerate sets the gloo processes up as
    plain ``MULTI_CPU`` and drops its FSDP plugin, since it shards only accelerator devices. torch's ``fully_shard``
    (FSDP2) does run over gloo, so the run is switched to FSDP with the plugin the launch's ``FSDP_*`` variables
    describe; ``prepare`` then shards the model and optimizer as it would on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wanted or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables
    if plugin.fsdp_version != 2:
        raise ConfigError("FSDP on CPUs runs FSDP2 only: set fsdp_version: 2 in the accelerate config (FSDP_VERSION=2)")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def _check_trackers(report_to: Sequence[str]) -> None:
    """Every tracker of ``trainer.report_to`` importable, else one line naming the extra that installs it."""
    import importlib.util

    for name in report_to:
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            hint = f"pip install 'prefopt[{extra}]'" if extra else f"pip install {module}"
            raise ConfigError(f"trainer.report_to: {name} is not installed ({hint})")


def _data_summary(settings: Settings, data: PreparedData, source, online: bool) -> dict[str, Any]:
    if online:
        reward = (settings.reward or {}).get("name")
        return {"train_prompts": len(source.prompts), "eval_prompts": len(source.eval_prompts), "reward": reward}
    return {"train_pairs": len(data.train), "eval_pairs": len(data.eval)}


class Evaluation:
    """The loss and metrics on the eval pairs (offline) and, with a sampler, reward and KL of samples on the eval
    prompts (online runs, ``trainer.sample_eval``): ``evaluation(policy, step)`` on every process."""

    def __init__(self, accelerator, step: Step, pairs: list[dict], micro_batch_size: int, sampler):
        self.accelerator, self.step, self.pairs = accelerator, step, pairs
        self.micro_batch_size, self.sampler = micro_batch_size, sampler

    def __call__(self, policy: torch.nn.Module, at: int) -> dict[str, float]:
        accelerator, metrics = self.accelerator, {}
        if self.pairs:
            averager = evaluate_loss(
                policy,
                self.step,
                self.pairs,
                micro_batch_size=self.micro_batch_size,
                rank=accelerator.process_index,
                world=accelerator.num_processes,
                step=at,
            )
            metrics = reduce_mean(accelerator, averager.mean(), weight=averager.count)
        if self.sampler is not None:
            metrics.update(reduce_mean(accelerator, self.sampler.evaluate(accelerator.unwrap_model(policy))))
        return metrics


def _reference(
    settings: Settings, loss_fn: losses.BoundLoss, start: Policy, device, *, needs_model: bool
) -> Reference | None:
    """The run's one reference: precomputed (a table, plus a frozen copy when sampling needs one), live, or none
    (a reference-free loss that samples nothing)."""
    pad_id, adapters = start.tokenizer.pad_token_id, start.adapters
    if not loss_fn.requirements.needs_reference:
        return Reference.live(start.model, pad_id=pad_id, device=device, adapters=adapters) if needs_model else None
    if settings.reference.mode == "live" or settings.trainer.source == "online":
        return Reference.live(start.model, pad_id=pad_id, device=device, adapters=adapters)
    splits = []
    for split, examples in (("train", start.data.train), ("eval", start.data.eval)):
        key = cache_key("ref", start.fingerprint, start.data.fingerprint, split)
        splits.append((examples, settings.cache_dir / "reference" / f"{key}.safetensors"))
    return Reference.precomputed(
        start.model,
        splits,
        pad_id=pad_id,
        batch_size=2 * settings.trainer.micro_batch_size,
        device=device,
        keep_model=needs_model,
        adapters=adapters,
    )


def _sampler(
    settings: Settings, start: Policy, reference: Reference, kind: str, accelerator, run_dir: Path, observers
) -> OnlineSource:
    """An :class:`OnlineSource` over the data's prompts, scored by ``reward``, with its scorer prepared: the batch
    source of online runs and the sampling evaluator of ``trainer.sample_eval``."""
    tcfg = settings.trainer
    if not settings.reward:
        raise ConfigError("sampling needs a reward: add reward=NAME (conf/reward/)")
    scorer = build_scorer(settings.reward).to(accelerator.device)
    source = OnlineSource(
        unique_prompts(start.data.train),
        unique_prompts(start.data.eval),
        tokenizer=start.tokenizer,
        scorer=scorer,
        reference=reference,
        kind=kind,
        settings=tcfg.online,
        batch_size=tcfg.batch_size,
        micro_batch_size=tcfg.micro_batch_size,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        seed=tcfg.seed,
        device=accelerator.device,
        observers=observers,
    )
    _prepare_scorer(settings, source, scorer, reference, accelerator, run_dir)
    return source


def _prepare_scorer(settings: Settings, source: OnlineSource, scorer, reference: Reference, accelerator, run_dir):
    """Before training: ``reward.select: auto`` runs ALaRM's aspect selection on reference samples
    (``reward_selection.json``), then the scorer's statistics (ALaRM's z-normalisation) are estimated on reference
    samples (``reward_stats.json``). A resumed run reloads both from the run dir instead."""
    stats_path, selection_path = run_dir / "reward_stats.json", run_dir / "reward_selection.json"
    resuming = settings.trainer.resume is not None
    if settings.reward.get("select", "none") == "auto":
        if resuming and selection_path.exists():
            result = json.loads(selection_path.read_text())
        else:
            with reference.off():
                result = select(settings.reward, source, reference.model, scorer)
            if accelerator.is_main_process:
                selection_path.write_text(json.dumps(result, indent=2))
            log.info("reward selection:\n%s", format_table(result))
        scorer.set_weights(result["weights"])
    if resuming and stats_path.exists():
        scorer.load_stats(json.loads(stats_path.read_text()))
        return
    with reference.off():
        stats = source.fit_scorer(reference.model)
    if accelerator.is_main_process and stats:
        stats_path.write_text(json.dumps(stats, indent=2))


def _performance_settings(tcfg: TrainerSettings, policy, device: torch.device) -> None:
    """``trainer.flush_denormal``: on a CPU, flush fp32 denormals to zero. Saturated sigmoids (MPO's σ(ΔS) on summed
    log-probs, DPO late in training) give gradients around 1e-40, and arithmetic on denormals is 10-100x slower on
    x86: single steps took 3-10x their median before this. ``trainer.gradient_checkpointing``: recompute each
    decoder layer in backward (less activation memory, ~1/3 more compute)."""
    if device.type == "cpu" and tcfg.flush_denormal and not torch.set_flush_denormal(True):
        log.info("trainer.flush_denormal: this CPU cannot flush denormals (no SSE3); left as is")
    if tcfg.gradient_checkpointing:
        if not getattr(policy, "supports_gradient_checkpointing", False):
            raise ConfigError(f"trainer.gradient_checkpointing: {type(policy).__name__} does not support it")
        kwargs = {"use_reentrant": False}
        if hasattr(policy, "activation_checkpointing_enable"):  # transformers >= 5.x name
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _optimizer(tcfg: TrainerSettings, model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if tcfg.optimizer == "adamw":
        # fused: one kernel per parameter group instead of a dozen per tensor (torch's CPU and CUDA fused AdamW)
        fused = tcfg.fused_optimizer and all(
            p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params
        )
        return torch.optim.AdamW(
            params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=tuple(tcfg.adam_betas), fused=fused or None
        )
    return torch.optim.RMSprop(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
