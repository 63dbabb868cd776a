"""LoRA adapters (peft) and quantized loading: ``model.lora``, ``model.adapter``, ``model.quantization``.

``model.lora.r > 0`` wraps the warm-started policy in a fresh LoRA adapter (peft's ``LoraConfig``: ``r``, ``alpha``,
``dropout``, ``target_modules``, all linear layers but the LM head by default); only the adapter trains. A fresh
adapter starts as the identity (B = 0), so the reference is the same model with its adapters disabled: no second
copy is held (:class:`prefopt.reference.Reference` runs under ``disable_adapter()``), and precomputed reference
log-probs equal the base model's. ``model.adapter=PATH`` continues a trained adapter (peft's format, e.g. an SFT
adapter): the reference is then the model *with that adapter* — precomputed from it, or a frozen copy of it when
live — never the bare base.

``model.quantization`` (``4bit`` / ``8bit``, bitsandbytes: QLoRA with an adapter) needs CUDA; elsewhere it is refused
with one line.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefopt.cache import digest
from prefopt.config import ConfigError

__all__ = [
    "LoraSettings",
    "AdapterSettings",
    "read_adapter_settings",
    "apply_adapters",
    "adapter_state",
    "save_final",
    "quantization_config",
]

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LoraSettings:
    """``model.lora``: peft ``LoraConfig`` fields (``r`` = 0: no adapter, full fine-tuning)."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Any = ALL_LINEAR  # "all-linear" | a list of module names
    merge: bool = False  # also write the merged model to final/merged
    init_seed: int = 0  # initialisation of the A matrices (B starts at zero)


@dataclass(frozen=True)
class AdapterSettings:
    """The adapter part of ``model``: ``lora``, ``adapter`` and ``quantization``."""

    lora: LoraSettings
    adapter: Path | None
    quantization: str | None

    @property
    def kind(self) -> str:
        """``none`` (full fine-tuning), ``fresh`` (a new LoRA adapter) or ``trained`` (``model.adapter``)."""
        return "trained" if self.adapter else ("fresh" if self.lora.r else "none")


def read_adapter_settings(model: dict[str, Any]) -> AdapterSettings:
    """Validate ``model.lora``, ``model.adapter`` and ``model.quantization``; one line per bad value."""
    raw = dict(model.get("lora") or {})
    known = {f.name for f in dataclasses.fields(LoraSettings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"model.lora has no setting {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    lora = LoraSettings(**raw)
    if not isinstance(lora.r, int) or isinstance(lora.r, bool) or lora.r < 0:
        raise ConfigError(f"model.lora.r must be an integer >= 0 (0 = no adapter), got {lora.r!r}")
    if not isinstance(lora.alpha, (int, float)) or not lora.alpha > 0:
        raise ConfigError(f"model.lora.alpha must be > 0, got {lora.alpha!r}")
    if not isinstance(lora.dropout, (int, float)) or not 0 <= lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout must be in [0, 1), got {lora.dropout!r}")
    targets = lora.target_modules
    names = isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets)
    if not (targets == ALL_LINEAR or names):
        raise ConfigError(f"model.lora.target_modules must be 'all-linear' or a list of module names, got {targets!r}")
    adapter = model.get("adapter")
    if adapter is not None:
        adapter = Path(str(adapter)).expanduser()
        if not (adapter / "adapter_config.json").is_file():
            raise ConfigError(
                f"model.adapter={str(adapter)!r} is not a peft adapter directory (no adapter_config.json)"
            )
        if lora.r:
            raise ConfigError(
                "model.adapter continues a trained adapter and model.lora.r configures a fresh one: set one of them"
            )
    quantization = model.get("quantization")
    if quantization not in (None, "4bit", "8bit"):
        raise ConfigError(f"model.quantization must be null, 4bit or 8bit, got {quantization!r}")
    return AdapterSettings(lora, adapter, quantization)


def quantization_config(settings: AdapterSettings, device: torch.device):
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization`` (None without); refuses without CUDA."""
    if settings.quantization is None:
        return None
    if device.type != "cuda":
        raise ConfigError(
            f"model.quantization={settings.quantization} needs a CUDA GPU (bitsandbytes); this run is on {device.type}"
        )
    if settings.kind == "none":
        raise ConfigError("model.quantization trains adapters only (QLoRA): set model.lora.r > 0 or model.adapter")
    from transformers import BitsAndBytesConfig

    if settings.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def apply_adapters(model: torch.nn.Module, settings: AdapterSettings, fingerprint: str) -> tuple[torch.nn.Module, str]:
    """The policy to train and the fingerprint of its initial function: unchanged without an adapter; a fresh LoRA
    adapter (identity at start, so the fingerprint stays the base model's); or a trained adapter loaded trainable
    (its files join the fingerprint)."""
    if settings.kind == "none":
        return model, fingerprint
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if settings.quantization is not None:
        model = prepare_model_for_kbit_training(model)
    if settings.kind == "trained":
        directory = settings.adapter.resolve()
        files = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir()) if p.is_file()]
        return PeftModel.from_pretrained(model, str(directory), is_trainable=True), digest(
            [fingerprint, "adapter", str(directory), files]
        )[:16]
    lora = settings.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules if lora.target_modules == ALL_LINEAR else list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora.init_seed)
        return get_peft_model(model, config), fingerprint


def adapter_state(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (for the summary)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": sum(p.numel() for p in model.parameters())}


def save_final(
    model: torch.nn.Module, final_dir: Path, settings: AdapterSettings, state_dict: dict | None = None
) -> None:
    """``final/``: the model (full) or the adapter in peft's format (loadable by ``PeftModel.from_pretrained``),
    plus ``final/merged`` (adapter merged into the base) when ``model.lora.merge``. ``state_dict``: the full weights
    when the model's own are shards (FSDP), gathered beforehand."""
    if state_dict is None:
        model.save_pretrained(final_dir, safe_serialization=True)
        if settings.kind != "none" and settings.lora.merge:
            copy.deepcopy(model).merge_and_unload().save_pretrained(final_dir / "merged", safe_serialization=True)
        return
    model.save_pretrained(final_dir, state_dict=state_dict, safe_serialization=True)
    if settings.kind != "none" and settings.lora.merge:
        _unsharded(model, state_dict).merge_and_unload().save_pretrained(final_dir / "merged", safe_serialization=True)


def _unsharded(model: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """A plain (unsharded) copy of the peft ``model`` holding the gathered ``state_dict``."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_config(model.get_base_model().config)
    plain = get_peft_model(base, copy.deepcopy(model.peft_config["default"]))
    plain.load_state_dict(state_dict)
    return plain
