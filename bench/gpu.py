"""``python -m bench.gpu`` (``make gpu-check``): the GPU check, in one run.

A Qwen2.5-0.5B-shaped model built from its config (random init, bf16 weights; 24 layers, hidden 896, vocabulary
151,936) trains DPO on synthetic pairs of ~2k tokens, each configuration in its own process, and the script prints:

* prefopt full fine-tuning, LoRA (r 16, all linear layers) and QLoRA (4-bit NF4 base + LoRA): tokens/s, MFU (6·N·tokens
  per second over the GPU's dense bf16 peak), step time, peak GPU memory (``torch.cuda.max_memory_allocated``);
* TRL's ``DPOTrainer`` on the same model, pairs, batches and lengths with its best settings (precomputed reference
  log-probs, bf16, no gradient checkpointing), and prefopt's tokens/s ratio to it;
* a 2-process FSDP2 run (``conf/accelerate/fsdp.yaml``) when more than one GPU is visible.

    python -m bench.gpu                 # on a GPU machine (not yet run on one)
    python -m bench.gpu --tiny          # a seconds-long smoke run of the same script on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.__main__ import ROOT, Runner

QWEN25_05B = {  # Qwen/Qwen2.5-0.5B's config.json
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}
TINY = {**QWEN25_05B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY.update(num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512)
PEAK_BF16_FLOPS = {"H200": 989.5e12, "H100": 989.5e12, "A100": 312e12}  # dense, no sparsity


def build(workdir: Path, shape: dict, *, pairs: int, seq: int, seed: int = 0) -> dict:
    """The model dir (Qwen2 from ``shape``, bf16 on a GPU, fp32 on a CPU, prefopt's embedded tokenizer) and the
    pairs (jsonl, prompt ~1/8 of ``seq``, completions filling the rest); returns sizes."""
    import random

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prefopt import models
    from prefopt.data.synthetic import NEGATIVE, NEUTRAL, POSITIVE

    vocabulary = [*POSITIVE, *NEGATIVE, *NEUTRAL]

    tokenizer = models.build_tokenizer({"name": "tiny-llama", "tokenizer": "embedded", "vocab_size": 512}, workdir)
    config = Qwen2Config(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model_dir = workdir / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(seed)
    sample = " ".join(vocabulary[i % len(vocabulary)] for i in range(400))
    per_word = len(tokenizer(sample)["input_ids"]) / 400
    prompt_words, completion_words = int(seq / 8 / per_word), int(seq * 7 / 16 / per_word * 0.95)
    text = lambda n: " ".join(rng.choice(vocabulary) for _ in range(n))  # noqa: E731
    rows = [
        {"prompt": text(prompt_words), "chosen": text(completion_words), "rejected": text(completion_words)}
        for _ in range(pairs)
    ]
    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    n_params = sum(p.numel() for p in model.parameters())  # tied LM head counted once: it runs as a matmul too
    return {"model_dir": str(model_dir), "data": str(data), "n_params": n_params, "rows": str(data)}


def specs(built: dict, workdir: Path, *, batch: int, steps: int, seq: int, cuda: bool) -> list[dict]:
    common = [
        f"model.name={built['model_dir']}",
        f"model.tokenizer={built['model_dir']}",
        "model.sft.steps=0",
        f"model.dtype={'bfloat16' if cuda else 'float32'}",
        "data=local",
        f"data.path={built['data']}",
        "data.eval_fraction=0.0001",
        f"data.max_length={seq}",
        f"data.max_prompt_length={seq // 4}",
        f"trainer.batch_size={batch}",
        f"trainer.max_steps={steps}",
        "trainer.eval_every=0",
        "trainer.lr=1e-6",
        "trainer.scheduler=constant_with_warmup",
        "trainer.warmup_steps=0",
        "trainer.progress_bar=false",
        "trainer.report_to=[]",
        f"trainer.mixed_precision={'bf16' if cuda else 'no'}",
        "loss=dpo",
    ]
    lora = ["model.lora.r=16", "model.lora.alpha=32"]
    configs = {"prefopt-full": [], "prefopt-lora": lora, "prefopt-qlora": [*lora, "model.quantization=4bit"]}
    out = [
        {
            "kind": "prefopt",
            "name": name,
            "overrides": [*common, *extra, f"cache_dir={workdir / 'cache' / name}"],
            "run_dir": str(workdir / "runs" / name),
            "threads": 8,
        }
        for name, extra in configs.items()
    ]
    rows = Path(built["data"])  # every pair has the same word counts, so batches of any order cost the same
    out.append(
        {
            "kind": "trl",
            "name": "trl-best",
            "model_dir": built["model_dir"],
            "rows": str(rows),
            "batch_size": batch,
            "steps": steps,
            "lr": 1e-6,
            "beta": 0.1,
            "max_length": seq,
            "seed": 0,
            "threads": 8,
            "run_dir": str(workdir / "runs" / "trl-best"),
            "use_cpu": not cuda,
            "knobs": {
                "precompute_ref_log_probs": True,
                "gradient_checkpointing": False,
                "bf16": cuda,
                "padding_free": False,
            },
        }
    )
    return out


def _tokens_per_second(result: dict, warmup: int) -> float:
    seconds, tokens = result.get("step_seconds", [])[warmup:], result.get("tokens", [])[warmup:]
    return sum(tokens) / sum(seconds) if seconds and sum(seconds) > 0 else float("nan")


def report(results: list[dict], built: dict, *, warmup: int, peak: float | None, device: str) -> str:
    lines = [
        f"GPU check on {device}: Qwen2.5-0.5B-shaped model, {built['n_params'] / 1e6:.2f}M parameters",
        "config          tokens/s     MFU   step s  peak GiB  step-1 loss  status",
    ]
    speeds = {}
    for r in results:
        tps = _tokens_per_second(r, warmup) if r.get("ok") else float("nan")
        speeds[r["name"]] = tps
        mfu = 6 * built["n_params"] * tps / peak if peak and tps == tps else float("nan")
        step = (
            statistics.fmean(r["step_seconds"][warmup:]) if r.get("ok") and r["step_seconds"][warmup:] else float("nan")
        )
        memory = (r.get("peak_gpu_mib") or float("nan")) / 1024
        loss = (r.get("losses") or [float("nan")])[0]
        status = "ok" if r.get("ok") else (r.get("missing") or r.get("error", "failed"))[:90]
        lines.append(f"{r['name']:<14} {tps:>9.0f} {mfu:>7.1%} {step:>8.3f} {memory:>9.2f} {loss:>12.4f}  {status}")
    full, trl = speeds.get("prefopt-full", float("nan")), speeds.get("trl-best", float("nan"))
    lines.append(f"ratio prefopt-full / trl-best tokens/s: {full / trl:.3f}" if trl == trl and trl else "ratio: n/a")
    return "\n".join(lines)


def fsdp_run(built: dict, workdir: Path, runner: Runner, *, batch: int, steps: int, seq: int) -> str:
    """A 2-process FSDP2 run when more than one GPU is visible; one line either way."""
    import torch

    if torch.cuda.device_count() < 2:
        return f"FSDP: {torch.cuda.device_count()} GPU(s) visible, the 2-process FSDP run needs 2: not run"
    spec = specs(built, workdir, batch=batch, steps=steps, seq=seq, cuda=True)[0]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "conf/accelerate/fsdp.yaml"),
        "--num_processes", "2", "-m", "prefopt.train", *spec["overrides"], f"hydra.run.dir={workdir / 'runs/fsdp'}",
    ]  # fmt: skip
    code = runner.launch(command, workdir / "fsdp.log")
    summary = workdir / "runs" / "fsdp" / "summary.json"
    if code or not summary.exists():
        return f"FSDP: failed (exit {code}); log {workdir / 'fsdp.log'}"
    done = json.loads(summary.read_text())
    return (
        f"FSDP: {done['distributed']}, {done['steps']} steps, final loss {done['train'].get('loss', float('nan')):.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short pairs: a CPU smoke run")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (prompt + completion)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    shape = TINY if args.tiny else QWEN25_05B
    steps = args.steps or (3 if args.tiny else 12)
    batch, seq = args.batch or (2 if args.tiny else 8), args.seq or (128 if args.tiny else 2048)
    warmup = 1 if args.tiny else 3
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="prefopt-gpu-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    built = build(workdir, shape, pairs=batch * steps + 2, seq=seq)
    runner = Runner(workdir, quick=False, timeout=900)
    results = [runner.run(spec) for spec in specs(built, workdir, batch=batch, steps=steps, seq=seq, cuda=cuda)]
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device), None)
    print(report(results, built, warmup=warmup, peak=peak, device=device))
    print(fsdp_run(built, workdir, runner, batch=batch, steps=steps, seq=seq) if cuda else "FSDP: no GPU, not run")
    print(
        f"(batch {batch} pairs of {seq} tokens, {steps} steps, {warmup} warm-up; {time.perf_counter() - started:.0f}s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"built": built, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
