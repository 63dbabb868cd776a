"""Built once per benchmark, before any measured run: the model and tokenizer (saved to a directory that every run
loads, so the initial weights are identical), the synthetic preference data as files, and the order in which
prefopt's sampler draws the pairs (TRL and the bare loop get the same pairs in the same batches)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.plan import Plan

SCALING_MIN_TOKENS_PER_WORD = 1.0  # the embedded tokenizer gives >= 1 token per word: enough words to fill a length


def _rows(n: int, seed: int, min_words: int, max_words: int) -> list[dict]:
    """Synthetic pairs; completions get a leading space so that prompt + completion tokenizes as prompt tokens +
    completion tokens (TRL tokenizes the concatenation, prefopt the parts: with the space both give the same ids)."""
    from prefopt.data import synthetic

    train, _ = synthetic.make_preference_data(n, 0, seed=seed, min_words=min_words, max_words=max_words)
    return [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in train]


def _write(rows: list[dict], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def scaling_points(plan: Plan) -> list[tuple[int, int]]:
    """(sequence length, batch size) of the scaling table: the lengths at one batch size, the batch sizes at one
    length."""
    points = {(seq, plan.scaling_batch) for seq in plan.scaling_seqs}
    return sorted(points | {(plan.scaling_seq, batch) for batch in plan.scaling_batches})


def layout(workdir: Path) -> dict[str, Any]:
    """Where the artifacts go: fixed paths under ``workdir``, so runs can be planned before they are built."""
    data = workdir / "data"

    def files(name: str) -> dict[str, str]:
        return {k: str(data / name / f"{k}.jsonl") for k in ("train", "eval", "ordered")}

    return {
        "model_dir": str(workdir / "model"),
        "tokenizer_cache": str(workdir / "cache"),
        "main": files("main"),
        "online": files("online"),
        "scaling": lambda seq, batch: files(f"scaling-{seq}-{batch}"),
    }


def _data_set(tokenizer, paths: dict, *, n_train: int, batch: int, steps: int, seed: int, words, lengths) -> dict:
    """train/eval files, the per-step order of prefopt's sampler, the rows in that order, tokens per step."""
    from prefopt.data import tokenize_pairs
    from prefopt.sources import Order

    max_length, max_prompt_length = lengths
    train = _rows(n_train, seed, *words)
    evaluation = _rows(batch, seed + 1, *words)
    tokenized, stats = tokenize_pairs(train, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    if stats["kept"] != len(train):
        raise RuntimeError(f"tokenization dropped pairs: {stats}")
    order = Order(len(train), seed)
    steps_idx = [order.take(batch) for _ in range(steps)]
    ordered = [train[i] for idx in steps_idx for i in idx]

    def pair_tokens(i: int) -> int:
        t = tokenized[i]
        return 2 * len(t["prompt_ids"]) + len(t["chosen_ids"]) + len(t["rejected_ids"])

    def positions(idx: list[int]) -> tuple[int, int]:
        """Token positions one step computes: one forward padded to the longest row (TRL, the bare loop), and
        prefopt's length buckets (CPU default)."""
        from prefopt.logps import bucket_overhead, plan_buckets

        rows = [
            len(tokenized[i]["prompt_ids"]) + len(tokenized[i][k]) for k in ("chosen_ids", "rejected_ids") for i in idx
        ]
        groups = plan_buckets(rows, bucket_overhead("cpu"))
        return len(rows) * max(rows), sum(len(g) * max(rows[r] for r in g) for g in groups)

    per_step = [positions(idx) for idx in steps_idx]
    return {
        "padded_per_step": [padded for padded, _ in per_step],
        "bucketed_per_step": [bucketed for _, bucketed in per_step],
        "train": _write(train, Path(paths["train"])),
        "eval": _write(evaluation, Path(paths["eval"])),
        "ordered": _write(ordered, Path(paths["ordered"])),
        "tokens_per_step": [sum(pair_tokens(i) for i in idx) for idx in steps_idx],
        "truncated": stats["truncated"],
        "lengths": [len(t["prompt_ids"]) + max(len(t["chosen_ids"]), len(t["rejected_ids"])) for t in tokenized],
    }


def _online_prompts(tokenizer, plan: Plan, paths: dict) -> dict:
    """The online table's prompts: the distinct prompts of the synthetic task (one row each, with its pair, as
    ``data=local`` reads them; online training uses only the prompts), and the prompts of every step in the order
    prefopt's sampler draws them (``ordered``: TRL's GRPOTrainer reads them in that order, unshuffled), so both sample
    the same prompts in the same steps. Nothing is truncated (checked)."""
    from prefopt.data import tokenize_pairs
    from prefopt.sources import Order

    rows, seen = [], set()
    for row in _rows(64 * plan.online_batch, plan.seed + 7, plan.min_words, plan.max_words):
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    tokenized, stats = tokenize_pairs(
        rows, tokenizer, max_length=plan.max_length, max_prompt_length=plan.max_prompt_length
    )
    if stats["kept"] != len(rows) or any(t["truncated"] for t in tokenized):
        raise RuntimeError(f"online prompts: tokenization dropped or truncated rows: {stats}")
    if len({tuple(t["prompt_ids"]) for t in tokenized}) != len(rows):
        raise RuntimeError("online prompts: two distinct prompts tokenize the same")
    order = Order(len(rows), plan.seed)  # as prefopt's OnlineSource draws over the distinct prompts
    steps_idx = [order.take(plan.online_batch) for _ in range(plan.online_steps)]
    prompt_tokens = [len(t["prompt_ids"]) for t in tokenized]
    return {
        "train": _write(rows, Path(paths["train"])),
        "eval": _write(rows[: plan.online_batch], Path(paths["eval"])),
        "ordered": _write([{"prompt": rows[i]["prompt"]} for idx in steps_idx for i in idx], Path(paths["ordered"])),
        "prompts": len(rows),
        "prompt_tokens": [min(prompt_tokens), max(prompt_tokens), round(sum(prompt_tokens) / len(rows), 1)],
    }


def build(plan: Plan, workdir: Path) -> dict[str, Any]:
    """Everything the runs need, under ``workdir``; returns the manifest (paths, sizes, tokens per step)."""
    import torch

    from prefopt import models

    where = layout(workdir)
    cache = Path(where["tokenizer_cache"])
    model_cfg = {"name": "tiny-llama", "tokenizer": "embedded", "vocab_size": plan.vocab_size, "init_seed": 0}
    model_cfg["config"] = dict(plan.model)
    tokenizer = models.build_tokenizer(model_cfg, cache)
    model = models.build_model(model_cfg, tokenizer)
    model_dir = Path(where["model_dir"])
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())

    main = _data_set(
        tokenizer,
        where["main"],
        n_train=plan.n_train,
        batch=plan.batch_size,
        steps=plan.steps,
        seed=plan.seed,
        words=(plan.min_words, plan.max_words),
        lengths=(plan.max_length, plan.max_prompt_length),
    )
    if main["truncated"]:
        raise RuntimeError("main data: pairs were truncated; raise Plan.max_length (TRL truncates differently)")

    scaling: dict[str, dict] = {}
    steps = plan.scaling_warmup + plan.scaling_measured
    for seq, batch in scaling_points(plan):
        words = math.ceil(seq / SCALING_MIN_TOKENS_PER_WORD)  # long enough that every sequence is cut to `seq`
        data = _data_set(
            tokenizer,
            where["scaling"](seq, batch),
            n_train=batch * steps,
            batch=batch,
            steps=steps,
            seed=plan.seed,
            words=(words, words),
            lengths=(seq, min(plan.max_prompt_length, seq // 2)),
        )
        data.pop("lengths")
        scaling[f"{seq}x{batch}"] = {"seq": seq, "batch": batch, **data}

    online = _online_prompts(tokenizer, plan, where["online"])
    main_lengths = main.pop("lengths")
    return {
        "workdir": str(workdir),
        "model_dir": str(model_dir),
        "tokenizer_cache": str(cache),
        "n_params": n_params,
        "vocab": len(tokenizer),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "torch": torch.__version__,
        "main": main,
        "main_seq_lengths": [min(main_lengths), max(main_lengths), round(sum(main_lengths) / len(main_lengths))],
        "scaling": scaling,
        "online": online,
    }
