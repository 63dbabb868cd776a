"""The training loop: draw -> forward/backward over micro-batches -> optimizer step -> log / evaluate / checkpoint.

Everything is built beforehand by :func:`prefopt.build.build` from the loss's declaration; nothing here knows a loss,
an input or a reference mode by name.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prefopt.adapters import save_final
from prefopt.build import Run, build
from prefopt.card import model_card
from prefopt.checkpoint import resume, save_checkpoint
from prefopt.config import ConfigError, to_yaml
from prefopt.logps import is_sharded
from prefopt.metrics import MetricsWriter, peak_memory_mib, postfix, reduce_mean, with_perf_totals
from prefopt.step import NonFiniteGuard, NonFiniteTraining, forward_backward

__all__ = ["train", "loop", "NonFiniteTraining"]

log = logging.getLogger("prefopt")


def train(cfg: Any, run_dir: str | Path | None = None, command: list[str] | None = None) -> dict[str, Any]:
    """Train ``cfg.loss`` on ``cfg.data`` with ``cfg.model``; writes the run dir and returns the summary.
    ``command``: the ``prefopt-train`` overrides that made ``cfg``, for the model card."""
    started = time.time()
    run = build(cfg, run_dir or "outputs/run")
    run.summary["command"] = command
    return loop(run, started)


def loop(run: Run, started: float) -> dict[str, Any]:
    """Run the built ``run`` to ``trainer.max_steps`` (resuming when asked); returns the summary."""
    tcfg, accelerator, policy, source = run.settings.trainer, run.accelerator, run.policy, run.source
    writer = MetricsWriter(accelerator, run.run_dir / "metrics.jsonl")
    step = resume(accelerator, tcfg.resume, run.run_dir, source, run.providers, moving_reference(run))
    writer.truncate(step)
    (run.run_dir / "config.yaml").write_text(to_yaml(run.settings.resolved))
    start_trackers(run)
    guard, last_train, last_eval = NonFiniteGuard(tcfg.max_nonfinite_steps), {}, {}
    bar = tqdm(
        total=tcfg.max_steps,
        initial=step,
        desc=run.loss_fn.name,
        disable=not accelerator.is_main_process or not tcfg.progress_bar,
    )
    if tcfg.eval_at_start and tcfg.eval_every and step == 0:  # the starting point of the curves
        writer.log(0, run.evaluate(policy, 0), "eval/")
    policy.train()
    run.summary["seconds_to_first_step"] = round(time.time() - started, 2)
    while step < tcfg.max_steps:
        step_started = time.perf_counter()
        draw = source.draw(accelerator.unwrap_model(policy), step)
        averager, problem = forward_backward(accelerator, policy, run.step, draw.micro_batches, step, draw.inputs)
        empty = _agree(accelerator, None if averager.count else "no training items (every sampled reward tied)")
        grad_norm = None
        if problem is None and empty is None:
            grad_norm = float(accelerator.clip_grad_norm_(policy.parameters(), tcfg.max_grad_norm or math.inf))
            if not math.isfinite(grad_norm):
                problem = f"non-finite gradient norm ({grad_norm})"
        problem = _agree(accelerator, problem)
        step += 1
        if problem is None and empty is None:
            run.optimizer.step()
            run.scheduler.step()
            guard.ok()
            sync = run.settings.reference.sync
            if sync.every and step % sync.every == 0:  # TR-DPO: the reference moves towards the policy
                run.reference.sync(accelerator.unwrap_model(policy), sync.alpha)
            perf = {"perf/step_seconds": time.perf_counter() - step_started, "perf/tokens": float(averager.tokens)}
            line = last_train = with_perf_totals(
                {**reduce_mean(accelerator, {**averager.mean(), **draw.metrics, **perf}), "grad_norm": grad_norm},
                accelerator.num_processes,
            )
            line["perf/peak_memory_mib"] = peak_memory_mib(accelerator.device)
            for observer in (*run.providers, source):  # e.g. the adaptive KL coefficient, early stopping
                if hasattr(observer, "on_metrics"):
                    observer.on_metrics(step, line)
        elif problem is None:
            log.warning("step %d skipped: %s", step, empty)
            line = {"skipped": 1, **reduce_mean(accelerator, draw.metrics)}
        elif guard.skip(step, problem):
            run.optimizer.zero_grad()
            saved = save_checkpoint(
                accelerator, run.run_dir, step, source, tcfg.keep_last, run.providers, moving_reference(run)
            )
            raise NonFiniteTraining(
                f"stopped at step {step}: {guard.consecutive} steps in a row had {problem}; checkpoint saved in {saved}"
            )
        else:
            line = {"skipped": 1}
        run.optimizer.zero_grad()
        line.update(lr=run.scheduler.get_last_lr()[0], nonfinite_steps=guard.total, epoch=source.order.epochs)
        if step % tcfg.log_every == 0 or step == tcfg.max_steps or "skipped" in line:
            writer.log(step, line)
        if draw.table:
            writer.table(step, draw.table)
        if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == tcfg.max_steps):
            last_eval = run.evaluate(policy, step)
            if last_eval:
                writer.log(step, last_eval, "eval/")
        if tcfg.save_every and step % tcfg.save_every == 0 and step < tcfg.max_steps:
            save_checkpoint(
                accelerator, run.run_dir, step, source, tcfg.keep_last, run.providers, moving_reference(run)
            )
        bar.update(1)
        bar.set_postfix(postfix(last_train))
    bar.close()
    return _finish(run, step, started, guard, last_train, last_eval, writer)


def moving_reference(run: Run) -> torch.nn.Module | None:
    """The reference model when ``reference.sync`` moves it (its weights are then part of the checkpoint)."""
    return run.reference.model if run.settings.reference.sync.every else None


def start_trackers(run: Run) -> None:
    """``trainer.report_to``'s trackers (accelerate's), with the resolved config as their parameters (dotted keys)
    and the run dir's name as the run's name; wandb writes under the run dir."""
    tcfg = run.settings.trainer
    name = run.run_dir.name
    run.accelerator.init_trackers(
        tcfg.project,
        config=flat_config(run.settings.resolved),
        init_kwargs={
            "wandb": {"name": name, "dir": str(run.run_dir)},
            "mlflow": {"run_name": name},
            "trackio": {"name": name},
        },
    )


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"beta": 0.1}}`` -> ``{"loss.beta": 0.1}``; values other than numbers, strings and booleans as
    strings (what every tracker accepts as a parameter)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _agree(accelerator, problem: str | None) -> str | None:
    """Skip the step on every process if any process saw a problem (they must take the same branch)."""
    if accelerator.num_processes == 1:
        return problem
    flag = accelerator.reduce(torch.tensor([float(problem is not None)], device=accelerator.device), "sum")
    return problem or ("a non-finite value on another process" if flag.item() > 0 else None)


def _finish(run: Run, step: int, started: float, guard, last_train, last_eval, writer) -> dict[str, Any]:
    """Save ``final/`` (model or adapter + tokenizer, ``save_pretrained``, and the model card) and ``summary.json``;
    return the summary. Every process waits for the main one's writes before accelerate tears the process group
    down, so all of them leave together: a gloo group whose peer has already exited can hang its process's teardown
    (seen with DDP on CPUs)."""
    accelerator, final_dir = run.accelerator, run.run_dir / "final"
    accelerator.wait_for_everyone()
    summary = {
        **run.summary,
        "nonfinite_steps": guard.total,
        "steps": step,
        "seconds": round(time.time() - started, 1),
        "train": last_train,
        "eval": last_eval,
        "run_dir": str(run.run_dir),
        "model_dir": str(final_dir),
        "metrics": str(writer.path),
        "data_stats": run.data.stats,
    }
    # a sharded model's full weights are gathered by every process; others pass None (each process's own)
    state = accelerator.get_state_dict(run.policy) if is_sharded(run.policy) else None
    if accelerator.is_main_process:
        save_final(accelerator.unwrap_model(run.policy), final_dir, run.settings.adapters, state_dict=state)
        run.tokenizer.save_pretrained(final_dir)
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (final_dir / "README.md").write_text(model_card(run.settings.resolved, summary))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process and run.settings.trainer.push_to_hub:
        push_to_hub(final_dir, run.settings.trainer.push_to_hub)
    return summary


def push_to_hub(final_dir: Path, repo_id: str) -> None:
    """Upload ``final/`` to the Hub; a failure (no network, no token) is one line, the run itself is saved."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(final_dir))
    except Exception as error:  # noqa: BLE001 - any failure to reach the Hub is reported the same way
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"trainer.push_to_hub={repo_id}: could not upload {final_dir} ({first}); the run is saved there"
        ) from None
