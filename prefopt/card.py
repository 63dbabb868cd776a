"""``final/README.md``: a model card for every run — base model, full or adapter, the loss (formula, paper,
hyper-parameters), the data, final metrics and the command that reproduces the run."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

import losses

__all__ = ["model_card"]


def _metrics(values: Mapping[str, Any], split: str, limit: int = 12) -> list[str]:
    rows = [(k, v) for k, v in values.items() if isinstance(v, (int, float)) and not k.startswith("perf/")]
    return [f"| `{split} {k}` | {v:.4g} |" for k, v in rows[:limit]]


_REWARD_MODEL = [
    "- **Reward model**: an `AutoModelForSequenceClassification` with one label (the score of a prompt + completion, "
    "read at the completion's last token); score online samples with it: "
    "`prefopt-train trainer=online reward=classifier reward.model=<this directory>`",
]


def model_card(resolved: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    """The Markdown card of a finished run (``resolved``: the run's whole config; ``summary``: its summary;
    its ``command`` is the ``prefopt-train`` command line that made it, None when it was started from Python)."""
    overrides = summary.get("command")
    loss = dict(resolved["loss"])
    name = loss.pop("name")
    spec = losses.spec(name)
    model, data, trainer = resolved["model"], resolved["data"], resolved["trainer"]
    adapters = summary.get("adapters", "none")
    lora = model.get("lora") or {}
    kind = {
        "none": "full fine-tuning",
        "fresh": f"LoRA adapter (r {lora.get('r')}, alpha {lora.get('alpha')}, targets {lora.get('target_modules')})",
        "trained": f"continued adapter from `{model.get('adapter')}`",
    }[adapters]
    base = (
        model["name"] if model["name"] != "tiny-llama" else f"tiny-llama (built from its config: {model.get('config')})"
    )
    if model.get("sft", {}).get("steps"):
        base += f", SFT warm start {model['sft']['steps']} steps on the embedded synthetic reviews"
    source = data.get("source")
    where = {"local": data.get("path"), "hub": data.get("name")}.get(source)
    counts = ", ".join(
        f"{summary[k]} {k.replace('_', ' ')}" for k in ("train_pairs", "eval_pairs", "train_prompts") if k in summary
    )
    command = "prefopt-train " + " ".join(shlex.quote(o) for o in overrides) if overrides is not None else None
    lines = [
        "---",
        "library_name: " + ("peft" if adapters != "none" else "transformers"),
        "tags: [prefopt, preference-optimization, " + name + "]",
        "---",
        "",
        f"# {name} — trained with prefopt",
        "",
        f"- **Base model**: {base}",
        f"- **Weights**: {kind}; {summary.get('trainable_params', '?')} of {summary.get('total_params', '?')} "
        "parameters trained",
        f"- **Loss**: `{name}` — {spec.summary} ({spec.paper}); log-probs: {spec.aggregation}",
        f"- **Hyper-parameters**: {', '.join(f'{k}={v}' for k, v in loss.items()) or 'none'}",
        *(_REWARD_MODEL if spec.kind == "reward" else []),
        f"- **Data**: `{source}`" + (f" ({where})" if where else "") + (f"; {counts}" if counts else ""),
        f"- **Training**: {trainer.get('source')}, {summary.get('steps')} steps of {trainer.get('batch_size')}, "
        f"lr {trainer.get('lr')} ({trainer.get('scheduler')}), seed {trainer.get('seed')}, "
        f"{summary.get('seconds')} s",
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        *_metrics(summary.get("train") or {}, "train"),
        *_metrics(summary.get("eval") or {}, "eval"),
        "",
        "## Reproduce",
        "",
        "```bash",
        command if command is not None else "# the run's resolved config is config.yaml in its run dir",
        "```",
        "",
        "The run's resolved config is `config.yaml` and its metrics `metrics.jsonl`, both in the run dir.",
    ]
    return "\n".join(lines) + "\n"
