"""One benchmark configuration per process: ``python -m bench.worker SPEC.json OUT.json`` (``--batch`` runs a list
of specs in one process, for ``--quick``). Every runner returns per-step wall times and non-pad token counts of its
measured loop, the losses, and the peak resident memory of the process.

Step time, for every runner, is the wall time from fetching the step's batch to the end of the optimizer step:
prefopt's ``perf/step_seconds`` (trainer metric), TRL from ``get_batch_samples`` to ``on_step_end``, the bare loop
around its loop body. Logging, evaluation and checkpointing between steps are not in it.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from prefopt.memory import current_rss_mib, peak_rss_mib


# --------------------------------------------------------------------------------------------------- memory
def reset_peak() -> bool:
    """Reset the process's peak RSS (Linux ``/proc/self/clear_refs``); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _threads(spec: dict) -> None:
    import torch

    torch.set_num_threads(int(spec["threads"]))


def _jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


# --------------------------------------------------------------------------------------------------- runners
def run_artifacts(spec: dict) -> dict:
    from bench.artifacts import build
    from bench.plan import Plan

    return {"manifest": build(Plan(**spec["plan"]), Path(spec["workdir"]))}


def run_prefopt(spec: dict) -> dict:
    """``prefopt.fit`` through the public API; per-step numbers from the ``perf/*`` metrics in metrics.jsonl."""
    _threads(spec)
    import prefopt

    cfg = prefopt.compose(spec["overrides"])
    summary = prefopt.fit(cfg, run_dir=spec["run_dir"])
    lines = [line for line in _jsonl(summary["metrics"]) if "perf/step_seconds" in line]
    return {
        "step_seconds": [line["perf/step_seconds"] for line in lines],
        "tokens": [line["perf/tokens"] for line in lines],
        "losses": [line["loss"] for line in lines],
        "logps_chosen": [line.get("logps/chosen") for line in lines],
        "setup_seconds": summary.get("seconds_to_first_step"),
        "reference_model": summary.get("reference_model"),
        "trainable_params": summary.get("trainable_params"),
        "total_params": summary.get("total_params"),
        "peak_gpu_mib": _peak_gpu_mib(),
    }


def _peak_gpu_mib() -> float | None:
    """This process's peak allocated GPU memory (None without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def run_trl(spec: dict) -> dict:
    """TRL's ``DPOTrainer`` on the same pairs in the same batches (sequential sampler over the rows in prefopt's
    draw order), the same model directory, tokenizer, lengths, lr and clipping; ``spec["knobs"]`` are the DPOConfig
    fields this configuration changes."""
    _threads(spec)
    try:
        import trl
    except ImportError:
        return {"missing": "TRL not installed (pip install -e .[bench])"}
    import logging

    notes: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            if "padding_free" in record.getMessage():
                notes.append("padding_free=True: " + record.getMessage().split(".")[0])

    capture = Capture()
    logging.getLogger("trl").addHandler(capture)
    try:
        return _train_trl(spec, trl, notes)
    finally:
        logging.getLogger("trl").removeHandler(capture)


def _train_trl(spec: dict, trl, notes: list[str]) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    class Timed(trl.DPOTrainer):
        bench_start = 0.0
        bench_tokens = 0

        def get_batch_samples(self, *args, **kwargs):
            self.bench_start, self.bench_tokens = time.perf_counter(), 0
            return super().get_batch_samples(*args, **kwargs)

        def training_step(self, model, inputs, *args, **kwargs):
            self.bench_tokens += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *args, **kwargs)

    record: dict[str, list] = {"step_seconds": [], "tokens": [], "logps_chosen": [], "losses": []}

    class Recorder(TrainerCallback):
        trainer: Timed | None = None

        def on_step_end(self, args, state, control, **kwargs):
            trainer = self.trainer
            record["step_seconds"].append(time.perf_counter() - trainer.bench_start)
            record["tokens"].append(trainer.bench_tokens)
            metrics = getattr(trainer, "_metrics", {}).get("train", {})
            record["logps_chosen"].append((metrics.get("logps/chosen") or [None])[-1])

    rows = _jsonl(spec["rows"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    args = trl.DPOConfig(
        output_dir=spec["run_dir"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=spec["beta"],
        max_length=spec["max_length"],
        seed=spec["seed"],
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=spec.get("use_cpu", True),
        train_sampling_strategy="sequential",
        **spec["knobs"],
    )
    recorder = Recorder()
    trainer = Timed(
        model=spec["model_dir"],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    recorder.trainer = trainer
    output = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    notes.append(
        f"bf16={args.bf16} gradient_checkpointing={args.gradient_checkpointing} "
        f"precompute_ref_log_probs={args.precompute_ref_log_probs} padding_free(effective)={trainer.padding_free} "
        f"ref_model={'yes' if trainer.ref_model is not None else 'no'} "
        f"attn={trainer.model.config._attn_implementation} optim={getattr(args.optim, 'value', args.optim)}"
    )
    return {
        **record,
        "losses": losses,
        "train_loss": output.training_loss,
        "notes": notes,
        "trl": trl.__version__,
        "peak_gpu_mib": _peak_gpu_mib(),
    }


def run_bare(spec: dict) -> dict:
    """The same DPO step written as plainly as possible: one forward of chosen + rejected through the HF model,
    ``log_softmax(logits).gather`` on completion tokens, reference log-probs computed before the loop, fused AdamW.
    Every step is one forward padded to its longest row."""
    _threads(spec)
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]

    def encode(row: dict) -> tuple[list[int], list[int], list[int]]:  # prefopt's rules (no truncation needed here)
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        prompt = [bos, *prompt] if adds_bos else prompt
        chosen, rejected = (
            tokenizer(row[k], add_special_tokens=False)["input_ids"] + [eos] for k in ("chosen", "rejected")
        )
        return prompt, chosen, rejected

    pairs = [encode(row) for row in _jsonl(spec["rows"])]
    batch_size, beta = spec["batch_size"], spec["beta"]

    def collate(batch):
        sequences = [(p, c) for p, c, _ in batch] + [(p, r) for p, _, r in batch]
        width = max(len(p) + len(c) for p, c in sequences)
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        completion = torch.zeros((len(sequences), width), dtype=torch.float32)
        for row, (p, c) in enumerate(sequences):
            ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            attention[row, : len(p) + len(c)] = 1
            completion[row, len(p) : len(p) + len(c)] = 1
        return ids, attention, completion

    def sequence_logps(ids, attention, completion):
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (token_logps * completion[:, 1:]).sum(dim=-1)

    batches = [pairs[s * batch_size : (s + 1) * batch_size] for s in range(spec["steps"])]
    model.eval()
    with torch.no_grad():
        reference = [sequence_logps(*collate(batch)) for batch in batches]
    model.train()
    optimizer = torch.optim.AdamW(  # fused, as TRL's adamw_torch_fused and prefopt's default
        model.parameters(), lr=spec["lr"], betas=(0.9, 0.999), weight_decay=0.0, fused=True
    )
    record: dict[str, list] = {"step_seconds": [], "tokens": [], "losses": [], "logps_chosen": []}
    for step, batch in enumerate(batches):
        start = time.perf_counter()
        ids, attention, completion = collate(batch)
        logps = sequence_logps(ids, attention, completion)
        b = len(batch)
        ref = reference[step]
        loss = -F.logsigmoid(beta * ((logps[:b] - ref[:b]) - (logps[b:] - ref[b:]))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        record["step_seconds"].append(time.perf_counter() - start)
        record["tokens"].append(int(attention.sum()))
        record["losses"].append(loss.item())
        record["logps_chosen"].append(logps[:b].mean().item())
    return record


def run_startup_inprocess(spec: dict) -> dict:
    """--quick only: ``prefopt.fit`` setup time (imports excluded) with a cold or a warm data cache."""
    _threads(spec)
    import prefopt
    from bench.startup import prepare_startup_cache

    prepare_startup_cache(Path(spec["tokenizer_cache"]), Path(spec["startup_cache"]), spec["cache"])
    summary = prefopt.fit(prefopt.compose(spec["overrides"]), run_dir=spec["run_dir"])
    return {"cache": spec["cache"], "setup_seconds": summary["seconds_to_first_step"]}


def run_logsoftmax(spec: dict) -> dict:
    """Peak memory of forward + backward of per-token log-probs through an LM head: ``prefopt.logps``'s selective
    log-softmax vs ``log_softmax(head(h)).gather``. Peak = VmHWM (reset just before) - VmRSS before."""
    _threads(spec)
    import torch

    from prefopt.logps import selective_log_softmax

    torch.manual_seed(0)
    vocab, tokens, hidden_size = spec["vocab"], spec["tokens"], spec["hidden"]
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    targets = torch.randint(vocab, (tokens,))
    gc.collect()
    exact = reset_peak()
    before = current_rss_mib()
    start = time.perf_counter()
    if spec["variant"] == "naive":
        out = torch.log_softmax(head(hidden).float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    elif spec["chunk_size"] is None:  # as the trainer calls it
        out = selective_log_softmax(hidden, targets, head)
    else:
        out = selective_log_softmax(hidden, targets, head, chunk_size=spec["chunk_size"])
    out.sum().backward()
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    return {
        "chunk_rows": None if spec["variant"] == "naive" else (spec["chunk_size"] or _default_chunk_rows(vocab)),
        "peak_delta_mib": peak - before,
        "method": "VmHWM reset" if exact else "ru_maxrss",
        "seconds": seconds,
        "checksum": [float(out.detach().sum()), float(hidden.grad.norm()), float(head.weight.grad.norm())],
    }


def _default_chunk_rows(vocab: int) -> int | None:
    """The rows per chunk ``prefopt.logps.selective_log_softmax`` uses when not told (its signature's default, or
    ``auto_chunk_size(vocab)`` where the default is vocabulary-aware)."""
    import inspect

    from prefopt import logps

    default = inspect.signature(logps.selective_log_softmax).parameters["chunk_size"].default
    if default is None and hasattr(logps, "auto_chunk_size"):
        return logps.auto_chunk_size(vocab)
    return default


def run_prefopt_online(spec: dict) -> dict:
    from bench.online import run_prefopt_online as run

    return run(spec)


def run_trl_grpo(spec: dict) -> dict:
    from bench.online import run_trl_grpo as run

    return run(spec)


RUNNERS = {
    "artifacts": run_artifacts,
    "prefopt-online": run_prefopt_online,
    "trl-grpo": run_trl_grpo,
    "prefopt": run_prefopt,
    "trl": run_trl,
    "bare": run_bare,
    "startup": run_startup_inprocess,
    "logsoftmax": run_logsoftmax,
}


def run_spec(spec: dict, *, shared: bool = False) -> dict[str, Any]:
    """Run one spec; never raises (the error goes into the result). ``shared``: other specs ran in this process
    before (``--batch``), so the peak RSS is reset first and includes their imports."""
    if shared:
        gc.collect()
        reset_peak()
        _reset_accelerate()
    try:
        result = RUNNERS[spec["kind"]](spec)
        result["ok"] = "missing" not in result
    except Exception as error:  # noqa: BLE001 - reported in the table, the other configurations still run
        result = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    result["name"] = spec["name"]
    if "torch" in sys.modules:  # did anything change the thread count the spec asked for?
        result["threads"] = sys.modules["torch"].get_num_threads()
    # own process: ru_maxrss, the peak since the process started; shared: VmHWM, reset before this spec
    result["peak_rss_mib"] = peak_rss_mib() if shared else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_scope"] = "shared process (--quick)" if shared else "own process"
    return result


def _reset_accelerate() -> None:
    """Several trainers in one process (--quick) each build an Accelerator: drop the shared state in between."""
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


def main(argv: list[str]) -> None:
    batch = argv[:1] == ["--batch"]
    spec_path, out_path = argv[1:3] if batch else argv[:2]
    specs = json.loads(Path(spec_path).read_text())
    if batch:
        results = []
        for spec in specs:
            print(f"[bench] {spec['name']}", file=sys.stderr, flush=True)
            results.append(run_spec(spec, shared=bool(results)))
            Path(out_path).write_text(json.dumps(results))
            if spec["kind"] == "artifacts" and not results[-1]["ok"]:
                break  # nothing else can run
    else:
        Path(out_path).write_text(json.dumps(run_spec(specs)))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1:])
