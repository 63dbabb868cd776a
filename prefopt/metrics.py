"""Metrics: averaging over micro-batches, reducing over processes, and writing ``metrics.jsonl`` / TensorBoard lines,
sample tables, the progress-bar postfix and the end-of-run summary."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import torch

from prefopt.memory import peak_rss_mib

__all__ = [
    "Averager",
    "MetricsWriter",
    "reduce_mean",
    "peak_memory_mib",
    "with_perf_totals",
    "format_summary",
    "postfix",
]

SUMMARY_KEYS = ("rewards/accuracies", "rewards/margins", "reward/mean", "kl")


class Averager:
    """Mean of the loss and metrics over micro-batches, kept as tensors: one host transfer per step, not per metric.
    Also counts the non-pad tokens forwarded (``tokens``). A metric a micro-batch does not report (an unpaired
    loss's ``rewards/rejected`` on a micro-batch without undesirable rows) is the mean over those that do."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, int] = {}
        self.count = 0
        self.tokens = 0

    def add(self, out, weight: int = 1) -> None:
        """One micro-batch's loss and metrics, counted ``weight`` times (evaluation: its number of items, so the
        mean is over items however they were split into micro-batches and processes)."""
        self.count += weight
        for key, value in {"loss": out.loss.detach(), **out.metrics}.items():
            value = value.detach().double() * weight
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.weights[key] = self.weights.get(key, 0) + weight

    def mean(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        weights = torch.tensor([max(self.weights[k], 1) for k in keys], dtype=torch.float64)
        values = (torch.stack([self.sums[k] for k in keys]).cpu() / weights).tolist()
        return dict(zip(keys, values, strict=True))


def reduce_mean(accelerator, metrics: dict[str, float], weight: float | None = None) -> dict[str, float]:
    """The mean of each metric over processes (one collective call); with ``weight`` (this process's count of
    items) the mean weighted by it, i.e. the mean over every process's items. A metric only some processes report
    is the mean over those (the processes agree on the keys first when they differ)."""
    if accelerator.num_processes == 1:
        return metrics
    keys = _all_keys(accelerator, metrics)
    if weight is None and all(k in metrics for k in keys) and len(keys) == len(metrics):
        values = accelerator.reduce(torch.tensor([metrics[k] for k in keys], device=accelerator.device), "mean")
        return dict(zip(keys, values.tolist(), strict=True))
    weight = 1.0 if weight is None else weight
    present = [weight if k in metrics else 0.0 for k in keys]
    local = torch.tensor([*(metrics.get(k, 0.0) * w for k, w in zip(keys, present, strict=True)), *present])
    totals = accelerator.reduce(local.double().to(accelerator.device), "sum").tolist()
    sums, weights = totals[: len(keys)], totals[len(keys) :]
    return {k: v / w for k, v, w in zip(keys, sums, weights, strict=True) if w}


def _all_keys(accelerator, metrics: dict[str, float]) -> list[str]:
    """The sorted union of every process's metric names: one small collective (a checksum of the names) when every
    process has the same names, the names themselves gathered only when they differ."""
    keys = sorted(metrics)
    signature = float(zlib.crc32("\n".join(keys).encode()))
    spread = torch.tensor([signature, -signature], dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
    if spread[0].item() == -spread[1].item():  # max == min: the same names everywhere
        return keys
    gathered: list[list[str] | None] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, keys)
    return sorted({k for names in gathered for k in names or ()})


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far: allocated GPU memory on CUDA, else the peak resident set size."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()


def with_perf_totals(line: dict[str, float], world: int) -> dict[str, float]:
    """``perf/tokens`` over all processes (it was averaged with the other metrics) and tokens per second; the step
    time is the mean over processes (they synchronise on the gradient all-reduce)."""
    line["perf/tokens"] *= world
    line["perf/tokens_per_second"] = line["perf/tokens"] / max(line["perf/step_seconds"], 1e-9)
    return line


class MetricsWriter:
    """``metrics.jsonl`` (main process) and the accelerate trackers, one JSON object per line."""

    def __init__(self, accelerator, path: Path):
        self.accelerator, self.path = accelerator, path

    def truncate(self, step: int) -> None:
        """On resume, drop the lines a killed run logged after its checkpoint, so each step is logged once."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in lines))

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        line = {"step": step, **{f"{prefix}{k}": v for k, v in metrics.items()}}
        self.accelerator.log({k: v for k, v in line.items() if k != "step" and isinstance(v, (int, float))}, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps(line) + "\n")

    def table(self, step: int, table: list[dict]) -> None:
        """A few sampled prompts, completions and rewards: a ``samples`` line and a TensorBoard text."""
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, "samples": table}) + "\n")
        columns = list(table[0])
        rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        rows += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in table]
        try:
            self.accelerator.get_tracker("tensorboard", unwrap=True).add_text("samples", "\n".join(rows), step)
        except (AttributeError, ValueError):  # no TensorBoard tracker
            pass


def _cell(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value).replace("|", "\\|").replace("\n", " ")


def postfix(metrics: dict[str, float]) -> dict[str, str]:
    """The progress bar's few numbers."""
    shown = {"loss": "loss", "margin": "rewards/margins", "acc": "rewards/accuracies", "reward": "online/reward/mean"}
    return {short: f"{metrics[key]:.4f}" for short, key in shown.items() if key in metrics}


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
