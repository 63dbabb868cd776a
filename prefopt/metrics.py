"""Metrics: averaging over micro-batches, reducing over processes, and writing ``metrics.jsonl`` / TensorBoard lines,
sample tables, the progress-bar postfix and the end-of-run summary."""

from __future__ import annotations

import json
import math
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
    Also counts the non-pad tokens forwarded (``tokens``)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.tokens = 0

    def add(self, out, weight: int = 1) -> None:
        """One micro-batch's loss and metrics, counted ``weight`` times (evaluation: its number of items, so the
        mean is over items however they were split into micro-batches and processes)."""
        self.count += weight
        for key, value in {"loss": out.loss.detach(), **out.metrics}.items():
            value = value.detach().double() * weight
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    def mean(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        values = (torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)).tolist()
        return dict(zip(keys, values, strict=True))


def reduce_mean(accelerator, metrics: dict[str, float], weight: float | None = None) -> dict[str, float]:
    """The mean of each metric over processes (one collective call); with ``weight`` (this process's count of
    items) the mean weighted by it, i.e. the mean over every process's items."""
    if accelerator.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    if weight is None:
        values = accelerator.reduce(torch.tensor([metrics[k] for k in keys], device=accelerator.device), "mean")
        return dict(zip(keys, values.tolist(), strict=True))
    local = torch.tensor([*(metrics.get(k, 0.0) * weight for k in keys), weight], device=accelerator.device)
    totals = accelerator.reduce(local.double(), "sum").tolist()
    return {k: v / totals[-1] for k, v in zip(keys, totals[:-1], strict=True)} if totals[-1] else {}


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
