"""Resumable checkpoints: ``checkpoints/step-N/`` holds the model, optimizer, scheduler and RNG states (accelerate's
``save_state``, safetensors and weights-only files) and ``trainer_state.json`` (the step and the batch source's data
position). A checkpoint is written to a temporary dir and renamed when complete, so a kill during a save never leaves
the latest one unusable; old ones are pruned only after the new one is complete."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from prefopt.config import ConfigError
from prefopt.settings import Resume

__all__ = ["save_checkpoint", "checkpoints", "resume"]

log = logging.getLogger("prefopt")


def save_checkpoint(
    accelerator, run_dir: Path, step: int, source, keep_last: int | None, providers=(), reference=None
) -> Path:
    """``checkpoints/step-N``: written to a temporary dir, renamed when complete; old ones pruned after.
    ``providers``: their :meth:`~prefopt.providers.Provider.state` goes into ``trainer_state.json``; ``reference``:
    a reference model that moves during training (TR-DPO), saved as ``reference.safetensors``."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    own = source.process_state()  # e.g. the online source's held draw, one file per process
    if own is not None:
        (tmp / f"source_state_{accelerator.process_index}.json").write_text(json.dumps(own))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if reference is not None:
            from safetensors.torch import save_file

            # cloned: tied weights (embeddings = LM head) share storage, which safetensors refuses
            weights = {k: v.detach().cpu().clone() for k, v in reference.state_dict().items()}
            save_file(weights, str(tmp / "reference.safetensors"))
        states = [provider.state() for provider in providers]
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **source.state(), "providers": states}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            for old in sorted(checkpoints(root), key=_step_of)[:-keep_last]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (a temporary dir of an interrupted save is never one)."""
    if not root.exists():
        return []
    return [p for p in root.glob("step-*") if p.is_dir() and (p / "trainer_state.json").exists()]


def resume(accelerator, where: Resume, run_dir: Path, source, providers=(), reference=None) -> int:
    """0 for a fresh run; else restore model, optimizer, scheduler, RNG, data position, the providers' states and a
    moving reference's weights, and return the step."""
    if where is None:
        return 0
    if where == "latest":
        found = checkpoints(run_dir / "checkpoints")
        if not found:
            log.warning("trainer.resume=true but %s has no checkpoint; starting fresh", run_dir / "checkpoints")
            return 0
        path = max(found, key=_step_of)
    else:
        path = Path(where)
        if not (path / "trainer_state.json").exists():
            raise ConfigError(f"trainer.resume={where}: not a checkpoint directory (no trainer_state.json)")
    accelerator.load_state(str(path))
    state = json.loads((path / "trainer_state.json").read_text())
    source.load_state(state)
    if reference is not None:
        from safetensors.torch import load_file

        weights = path / "reference.safetensors"
        if not weights.exists():
            raise ConfigError(
                f"trainer.resume={path}: reference.sync is on but the checkpoint has no reference weights"
            )
        reference.load_state_dict(load_file(str(weights), device=str(next(reference.parameters()).device)))
    for provider, saved in zip(providers, state.get("providers") or [None] * len(providers), strict=False):
        if saved is not None:
            provider.load_state(saved)
    own = path / f"source_state_{accelerator.process_index}.json"
    source.load_process_state(json.loads(own.read_text()) if own.exists() else None)
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])
