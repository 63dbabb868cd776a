"""The printed report: sizes, the main table, checks, scaling, time to first step, the log-softmax memory check and,
last, the ratios line.

Definitions
* steady-state tokens/s = non-pad tokens of prompt + completion of chosen and rejected of the measured steps (the
  same pairs for every configuration: ``pair tok/step``) / the sum of their step times; warm-up steps excluded.
  ``fwd tok/step`` is what each runner itself counted as forwarded through the policy (MPO adds its regularisation
  samples), a check that every DPO configuration does the same work.
* step time: from fetching the step's batch to the end of the optimizer step (see bench/worker.py); ``step s`` is
  the mean over the measured steps (what the ratios use), ``median s`` shows whether a few steps were disturbed.
* ratio_vs_trl_default = prefopt-default / trl-default tokens/s; ratio_vs_trl_best = prefopt-best / trl-best;
  overhead_vs_bare = 1 - prefopt-best / bare-pytorch tokens/s (negative: prefopt is faster than the bare loop,
  whose every step is one forward padded to its longest row); mpo_vs_dpo = prefopt-dpo-live step time /
  prefopt-mpo step time (> 1: MPO steps are faster); overhead_vs_bare_same_padding = 1 - prefopt-padded /
  bare-pytorch tokens/s: the trainer's own cost at the bare loop's padding (length buckets off).
* online table (bench/online.py): prefopt's online GRPO step vs TRL's GRPOTrainer; samples/s = completions of the
  measured steps / the sum of their step times (generation included); online_ratio_vs_trl = prefopt-grpo /
  trl-grpo samples/s. The phases split each step's time (generate, score, logps = forwards without gradient,
  train = the rest).
* peak RSS is compared at equal settings too: prefopt-ckpt (gradient checkpointing) vs trl-default (TRL turns it
  on by default).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

DPO_ROWS = (
    "prefopt-default",
    "prefopt-best",
    "prefopt-padded",
    "prefopt-ckpt",
    "trl-default",
    "trl-best",
    "bare-pytorch",
    "prefopt-dpo-live",
)
NAN = float("nan")


def _measured(result: dict, warmup: int, key: str) -> list[float]:
    return [float(v) for v in (result.get(key) or [])[warmup:]]


def tokens_per_second(result: dict, warmup: int, pair_tokens: list[int] | None = None) -> float:
    seconds = _measured(result, warmup, "step_seconds")
    if not result.get("ok") or not seconds:
        return NAN
    tokens = pair_tokens[warmup : warmup + len(seconds)] if pair_tokens else _measured(result, warmup, "tokens")
    return sum(tokens) / sum(seconds)


def step_seconds(result: dict, warmup: int) -> float:
    seconds = _measured(result, warmup, "step_seconds")
    return statistics.fmean(seconds) if result.get("ok") and seconds else NAN


def samples_per_second(result: dict, warmup: int) -> float:
    seconds = _measured(result, warmup, "step_seconds")
    if not result.get("ok") or not seconds:
        return NAN
    return sum(_measured(result, warmup, "samples")[: len(seconds)]) / sum(seconds)


def best_online(rounds: list[list[dict]], warmup: int) -> list[dict]:
    """Per online configuration, the round with the highest samples/s: the online table."""
    best = []
    for runs in zip(*rounds, strict=True):
        finite = [(s, i) for i, r in enumerate(runs) if math.isfinite(s := samples_per_second(r, warmup))]
        best.append(runs[max(finite)[1]] if finite else runs[0])
    return best


def online_ratios(plan, online: list[dict]) -> dict[str, float]:
    sps = {r["name"]: samples_per_second(r, plan.online_warmup) for r in online}
    return {"online_ratio_vs_trl": _ratio(sps.get("prefopt-grpo", NAN), sps.get("trl-grpo", NAN))}


def best_of(rounds: list[list[dict]], warmup: int) -> list[dict]:
    """Per configuration, the round with the highest tokens/s (least disturbed by other load): the main table."""
    best = []
    for runs in zip(*rounds, strict=True):
        scored = [(tokens_per_second(r, warmup), i) for i, r in enumerate(runs)]
        finite = [(s, i) for s, i in scored if math.isfinite(s)]
        best.append(runs[max(finite)[1]] if finite else runs[0])
    return best


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else NAN


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(
        str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )  # noqa: E501, E731
    return [line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]]


def _status(result: dict) -> str:
    if result.get("ok"):
        return ""
    return result.get("missing") or f"FAILED: {result.get('error', '?')}"[:200]


def ratios(plan, manifest: dict, main: list[dict]) -> dict[str, float]:
    by_name = {r["name"]: r for r in main}
    pair_tokens = manifest["main"]["tokens_per_step"]
    tps = {name: tokens_per_second(r, plan.warmup_steps, pair_tokens) for name, r in by_name.items()}
    get = lambda name: tps.get(name, NAN)  # noqa: E731
    live, mpo = (step_seconds(by_name.get(n, {}), plan.warmup_steps) for n in ("prefopt-dpo-live", "prefopt-mpo"))
    return {
        "ratio_vs_trl_default": _ratio(get("prefopt-default"), get("trl-default")),
        "ratio_vs_trl_best": _ratio(get("prefopt-best"), get("trl-best")),
        "overhead_vs_bare": 1 - _ratio(get("prefopt-best"), get("bare-pytorch")),
        "mpo_vs_dpo": _ratio(live, mpo),
        "overhead_vs_bare_same_padding": 1 - _ratio(get("prefopt-padded"), get("bare-pytorch")),
    }


Spread = tuple[float, float, float]  # (median, min, max) over rounds


def ratio_spread(plan, manifest: dict, rounds: list[list[dict]], of=None) -> dict[str, Spread]:
    """Every ratio computed within each round (configurations of one round ran back to back), then its median and
    range over the rounds. ``of(runs) -> {name: ratio}``: the ratios (default: the main table's)."""
    of = of or (lambda runs: ratios(plan, manifest, runs))
    per_round = [of(runs) for runs in rounds if runs]
    out = {}
    for key in per_round[0] if per_round else ():
        values = [r[key] for r in per_round if math.isfinite(r[key])]
        out[key] = (statistics.median(values), min(values), max(values)) if values else (NAN, NAN, NAN)
    return out


def render(plan, manifest: dict, results: dict[str, list[dict]], *, threads: int, repeats: int, elapsed: float) -> str:
    out: list[str] = []
    model = plan.model
    trl_version = next((r.get("trl") for r in [*results["main"], *results.get("online", [])] if r.get("trl")), None)
    lengths = manifest["main_seq_lengths"]
    out.append(f"prefopt bench ({'quick' if plan.quick else 'full'} mode, {elapsed:.0f}s)")
    out.append(
        f"model: Llama hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, "
        f"{model['num_attention_heads']} heads ({model['num_key_value_heads']} kv), intermediate "
        f"{model['intermediate_size']}, vocab {manifest['vocab']} (prefopt's embedded byte-level BPE), "
        f"{manifest['n_params'] / 1e6:.2f}M params, fp32, attention {manifest['attn_implementation']}"
    )
    out.append(
        f"data: synthetic pairs ({plan.min_words}-{plan.max_words} words per completion), prompt+completion "
        f"{lengths[0]}-{lengths[1]} tokens (mean {lengths[2]}), max_length {plan.max_length} (nothing truncated); "
        f"batch {plan.batch_size} pairs, {plan.warmup_steps} warm-up + {plan.measured_steps} measured steps, "
        f"lr {plan.lr} constant, clip 1.0, AdamW; torch threads {threads}; torch {manifest['torch']}, "
        f"trl {trl_version or 'not installed'}"
        + (f"; {repeats} interleaved rounds (table: each configuration's best round)" if repeats > 1 else "")
    )
    if plan.quick:
        out.append(
            "--quick: every configuration ran in ONE worker process; peak RSS includes every import (not comparable)"
        )

    if results["main"]:
        out += ["", *_main_table(plan, manifest, results["main"])]
    if results.get("online"):
        out += ["", *_online_table(plan, manifest, results["online"])]
    if results["scaling"]:
        out += ["", *_scaling_table(plan, manifest, results["scaling"])]
    if results["startup"]:
        out += ["", *_startup_table(plan, results["startup"])]
    if results["memory"]:
        out += ["", *_memory_check(plan, results["memory"])]
    if results.get("adapters"):
        out += ["", *_adapter_table(plan, manifest, results["adapters"])]
    spread: dict[str, Spread] = {}
    counts = []
    if results["main"]:
        main_rounds = results.get("main_rounds") or [results["main"]]
        spread |= ratio_spread(plan, manifest, main_rounds)
        counts.append(len(main_rounds))
    if results.get("online"):
        online_rounds = results.get("online_rounds") or [results["online"]]
        spread |= ratio_spread(plan, manifest, online_rounds, of=lambda runs: online_ratios(plan, runs))
        counts.append(len(online_rounds))
    if spread:
        out += ["", ("(--quick: sizes too small to mean anything) " if plan.quick else "") + _targets(spread, results)]
        rounds = "/".join(map(str, sorted(set(counts))))
        out += [
            "",
            f"ratios, median [min, max] over {rounds} round(s): "
            + "; ".join(
                f"{k} {_fmt(m, '.3f')} [{_fmt(lo, '.3f')}, {_fmt(hi, '.3f')}]" for k, (m, lo, hi) in spread.items()
            ),
        ]
        out += ["", " ".join(f"{k}={_fmt(m, '.3f') if math.isfinite(m) else 'n/a'}" for k, (m, _, _) in spread.items())]
    return "\n".join(out)


def verdict(value: Spread | float, bound: float, at_least: bool) -> str:
    """``met`` / ``NOT met`` when every round falls on one side of ``bound``, ``within noise`` when the rounds'
    range straddles it, ``n/a`` without a number."""
    median, lo, hi = value if isinstance(value, tuple) else (value, value, value)
    if not all(math.isfinite(v) for v in (median, lo, hi)):
        return "n/a"
    worst, best = (lo, hi) if at_least else (hi, lo)
    meets = (lambda v: v >= bound) if at_least else (lambda v: v <= bound)
    if meets(worst):
        return "met"
    if not meets(best):
        return "NOT met"
    return f"within noise ({_fmt(lo, '.3f')}..{_fmt(hi, '.3f')})"


def _targets(values: dict[str, Spread], results: dict[str, list[dict]]) -> str:
    """One line: which of the project's performance targets this run meets (ratios over the rounds' range)."""
    rss = {r["name"]: r.get("peak_rss_mib", NAN) if r.get("ok") else NAN for r in results["main"]}
    memory = {r["name"]: r.get("peak_delta_mib", NAN) if r.get("ok") else NAN for r in results["memory"]}
    naive = memory.pop("logsoftmax-naive", NAN)

    check = verdict
    items = []
    if "ratio_vs_trl_default" in values:  # the main table ran
        items += _main_targets(values, rss, memory, naive)
    if "online_ratio_vs_trl" in values:
        items.append(("online samples/s >= 1.5x trl-grpo", check(values["online_ratio_vs_trl"], 1.5, True)))
    return "targets: " + "; ".join(f"{label}: {outcome}" for label, outcome in items)


def _main_targets(values: dict[str, Spread], rss: dict, memory: dict, naive: float) -> list[tuple[str, str]]:
    check = verdict
    items = [
        ("tokens/s >= 1.3x trl-default", check(values["ratio_vs_trl_default"], 1.3, True)),
        ("tokens/s >= 1.1x trl-best", check(values["ratio_vs_trl_best"], 1.1, True)),
        (
            "peak RSS <= trl-default",
            check(_ratio(rss.get("prefopt-default", NAN), rss.get("trl-default", NAN)), 1.0, False),
        ),
        (
            "peak RSS with gradient checkpointing (prefopt-ckpt) <= trl-default",
            check(_ratio(rss.get("prefopt-ckpt", NAN), rss.get("trl-default", NAN)), 1.0, False),
        ),
        ("peak RSS <= trl-best", check(_ratio(rss.get("prefopt-best", NAN), rss.get("trl-best", NAN)), 1.0, False)),
        ("overhead vs bare <= 5%", check(values["overhead_vs_bare"], 0.05, False)),
        ("overhead vs bare at the same padding <= 5%", check(values["overhead_vs_bare_same_padding"], 0.05, False)),
        # MPO saves the reference forward but adds ~14% regularisation tokens: ~1.15-1.2x is its limit here
        ("mpo >= 1.15x dpo-live step speed", check(values["mpo_vs_dpo"], 1.15, True)),
    ]
    if "logsoftmax-selective" in memory:  # the default chunking (the fixed-chunk row is there for comparison only)
        delta = memory["logsoftmax-selective"]
        items.append(("selective log-softmax <= 1/4 of naive memory", check(_ratio(delta, naive), 0.25, False)))
    return items


def _online_table(plan, manifest: dict, online: list[dict]) -> list[str]:
    """prefopt's online GRPO vs TRL's GRPOTrainer: samples/s, step time, the phases, and whether both did the same
    work (completion lengths, EOS)."""
    from bench.online import PHASES

    warmup = plan.online_warmup
    header = ["config", "generation", "samples/step", "new tok/sample", "EOS frac", "samples/s", "step s",
              "median s", *(f"{p} s" for p in PHASES), "peak RSS MiB", "step-1 loss", "note"]  # fmt: skip
    generation = {"prefopt-grpo": "prefopt sampler", "trl-grpo": "model.generate"}
    rows = []
    for r in online:
        seconds = _measured(r, warmup, "step_seconds")
        lengths = [v for v in _measured_any(r, warmup, "completion_length") if v is not None]
        eos = [v for v in _measured_any(r, warmup, "eos_frac") if v is not None]
        phases = (r.get("phases") or [])[warmup:]
        losses = r.get("losses") or []
        rows.append(
            [
                r["name"],
                generation.get(r["name"], ""),
                _fmt(statistics.fmean(_measured(r, warmup, "samples")) if r.get("samples") else None, ".0f"),
                _fmt(statistics.fmean(lengths) if lengths else None, ".1f"),
                _fmt(statistics.fmean(eos) if eos else None, ".2f"),
                _fmt(samples_per_second(r, warmup), ".1f"),
                _fmt(statistics.fmean(seconds) if r.get("ok") and seconds else None, ".3f"),
                _fmt(statistics.median(seconds) if r.get("ok") and seconds else None, ".3f"),
                *(_fmt(statistics.fmean(p[name] for p in phases) if phases else None, ".3f") for name in PHASES),
                _fmt(r.get("peak_rss_mib"), ".0f"),
                _fmt(losses[0] if losses else None, ".4f"),
                _status(r),
            ]
        )
    prompts = manifest.get("online", {})
    out = [
        f"online table: GRPO (beta {plan.online_beta}, k {plan.online_k}, max_new_tokens "
        f"{plan.online_max_new_tokens}, temperature 1, {plan.online_batch} prompts/step of "
        f"{_fmt_range(prompts.get('prompt_tokens'))} tokens, lr {plan.online_lr}), {plan.online_warmup} warm-up + "
        f"{plan.online_measured} measured steps; the same prompts per step, reward function and model",
        *_table(header, rows),
        "phases (s/step): generate = sampling + decoding; score = the reward; logps = forwards without gradient "
        "(reference per-token log-probs, the sampler's own policy log-probs); train = the rest (policy forward "
        "with gradient, backward, optimizer step)",
        "EOS: both cut a completion after its first EOS and keep the EOS in the loss; new tok/sample counts it",
    ]
    lengths = {
        r["name"]: statistics.fmean(v for v in _measured_any(r, warmup, "completion_length") if v is not None)
        for r in online
        if r.get("ok") and any(v is not None for v in _measured_any(r, warmup, "completion_length"))
    }
    fingerprints = {r["name"]: r.get("prompts") for r in online if r.get("ok")}
    if len(fingerprints) == 2:
        (a, fa), (b, fb) = fingerprints.items()
        same = bool(fa) and fa == fb
        out.append(f"check: {a} and {b} sampled the same prompts in every step: {'yes' if same else 'NO'}")
    if len(lengths) == 2:
        (a, la), (b, lb) = lengths.items()
        out.append(f"check: mean completion length {a} {la:.1f} vs {b} {lb:.1f} tokens ({la / lb - 1:+.1%})")
    for r in online:
        for note in r.get("notes") or []:
            out.append(f"  {r['name']}: {note}")
    return out


def _measured_any(result: dict, warmup: int, key: str) -> list:
    return list((result.get(key) or [])[warmup:])


def _fmt_range(values) -> str:
    return f"{values[0]}-{values[1]}" if values else "?"


def _main_table(plan, manifest: dict, main: list[dict]) -> list[str]:
    warmup = plan.warmup_steps
    pair_tokens = manifest["main"]["tokens_per_step"]
    measured_pairs = pair_tokens[warmup:]
    header = [
        "config",
        "reference",
        "pair tok/step",
        "fwd tok/step",
        "tokens/s",
        "step s",
        "median s",
        "sd",
        "peak RSS MiB",
        "step-1 loss",
        "step-1 logps/chosen",
        "note",
    ]
    reference = {
        "prefopt-default": "precomputed",
        "prefopt-best": "precomputed",
        "prefopt-padded": "precomputed",
        "prefopt-ckpt": "precomputed",
        "trl-default": "live model",
        "trl-best": "precomputed",
        "bare-pytorch": "precomputed",
        "prefopt-mpo": "precomputed + reg.",
        "prefopt-dpo-live": "live model",
    }
    rows = []
    for r in main:
        seconds = _measured(r, warmup, "step_seconds")
        fwd = _measured(r, warmup, "tokens")
        losses, logps = r.get("losses") or [], r.get("logps_chosen") or []
        rows.append(
            [
                r["name"],
                reference.get(r["name"], ""),
                _fmt(statistics.fmean(measured_pairs), ".0f"),
                _fmt(statistics.fmean(fwd) if fwd else None, ".0f"),
                _fmt(tokens_per_second(r, warmup, pair_tokens), ".0f"),
                _fmt(step_seconds(r, warmup), ".3f"),
                _fmt(statistics.median(seconds) if seconds else None, ".3f"),
                _fmt(statistics.stdev(seconds) if len(seconds) > 1 else None, ".3f"),
                _fmt(r.get("peak_rss_mib"), ".0f"),
                _fmt(losses[0] if losses and r["name"] not in ("trl-default", "trl-best") else None, ".6f"),
                _fmt(logps[0] if logps else None, ".4f"),
                _status(r),
            ]
        )
    out = ["main table: DPO (beta 0.1) on the same pairs in the same batches", *_table(header, rows)]
    padded, bucketed = (manifest["main"].get(k, [])[warmup:] for k in ("padded_per_step", "bucketed_per_step"))
    if padded and bucketed:
        real = statistics.fmean(measured_pairs)
        out.append(
            f"padding: one padded forward per step (trl-*, bare-pytorch, prefopt-padded) computes "
            f"{statistics.fmean(padded):.0f} token positions per step for {real:.0f} real tokens "
            f"({1 - real / statistics.fmean(padded):.0%} padding); prefopt's length buckets compute "
            f"{statistics.fmean(bucketed):.0f} ({1 - real / statistics.fmean(bucketed):.0%} padding)"
        )
    out += _checks(plan, manifest, main)
    for r in main:
        for note in r.get("notes") or []:
            out.append(f"  {r['name']}: {note}")
    return out


def _checks(plan, manifest: dict, main: list[dict]) -> list[str]:
    """Is it the same work? Forwarded tokens per step, step-1 policy log-probs, bare vs prefopt losses."""
    warmup, out = plan.warmup_steps, []
    expected = manifest["main"]["tokens_per_step"]
    by_name = {r["name"]: r for r in main if r.get("ok")}
    same = [n for n in DPO_ROWS if n in by_name and [int(t) for t in by_name[n]["tokens"]] == expected]
    differ = [n for n in DPO_ROWS if n in by_name and n not in same]
    out.append(
        f"check: forwarded tokens == pair tokens at every step for {', '.join(same) or 'none'}"
        + (f"; DIFFERENT for {', '.join(differ)}" if differ else "")
    )
    logps = {n: by_name[n]["logps_chosen"][0] for n in DPO_ROWS if n in by_name and by_name[n].get("logps_chosen")}
    if logps:
        ref = logps.get("prefopt-default", next(iter(logps.values())))
        diffs = ", ".join(f"{n} {v - ref:+.2e}" for n, v in logps.items() if n != "prefopt-default")
        out.append(f"check: step-1 mean chosen log-prob vs prefopt-default: {diffs} (TRL default runs bf16 autocast)")
    if "bare-pytorch" in by_name and "prefopt-default" in by_name:
        bare, pre = by_name["bare-pytorch"]["losses"], by_name["prefopt-default"]["losses"]
        diff = max(abs(a - b) for a, b in zip(bare, pre, strict=False))
        out.append(
            f"check: bare vs prefopt-default DPO loss, max |diff| over {min(len(bare), len(pre))} steps: {diff:.2e}"
        )
    threads = sorted({r.get("threads") for r in main if r.get("ok") and r.get("threads")})
    out.append(f"check: torch threads at the end of every run: {', '.join(map(str, threads)) or '?'}")
    slow = []
    for r in main:
        seconds = _measured(r, warmup, "step_seconds")
        median = statistics.median(seconds) if seconds else NAN
        steps = [f"{warmup + i + 1} ({s:.1f}s)" for i, s in enumerate(seconds) if s > 3 * median]
        if steps:
            slow.append(f"{r['name']} step {', '.join(steps)} vs median {median:.2f}s")
    out.append("check: measured steps > 3x their run's median: " + ("; ".join(slow) if slow else "none"))
    return out


def _scaling_table(plan, manifest: dict, scaling: list[dict]) -> list[str]:
    header = ["seq len", "batch pairs", "tok/step", "tokens/s", "step s", "peak RSS MiB", "note"]
    rows = []
    for r in scaling:
        point = manifest["scaling"].get(r["name"].removeprefix("scaling-"), {})
        pairs = point.get("tokens_per_step")
        rows.append(
            [
                str(point.get("seq", "?")),
                str(point.get("batch", "?")),
                _fmt(statistics.fmean(pairs) if pairs else None, ".0f"),
                _fmt(tokens_per_second(r, plan.scaling_warmup, pairs), ".0f"),
                _fmt(step_seconds(r, plan.scaling_warmup), ".3f"),
                _fmt(r.get("peak_rss_mib"), ".0f"),
                _status(r),
            ]
        )
    title = (
        f"scaling: prefopt-best DPO, every sequence cut to the length; lengths at batch {plan.scaling_batch}, "
        f"batch sizes at length {plan.scaling_seq}; {plan.scaling_warmup} warm-up + {plan.scaling_measured} "
        "measured steps"
    )
    return [title, *_table(header, rows)]


def _startup_table(plan, startup: list[dict]) -> list[str]:
    from bench.startup import STARTUP_RUNS

    overrides = " ".join(plan.startup_overrides)
    describe = lambda r: STARTUP_RUNS.get(r.get("cache"), r["name"])  # noqa: E731
    if plan.quick:
        header = ["run", "train() to first step s", "note"]
        rows = [[describe(r), _fmt(r.get("setup_seconds"), ".2f"), _status(r)] for r in startup]
        return [
            f"time to first step (--quick: in process, imports excluded): prefopt.fit {overrides}",
            *_table(header, rows),
        ]
    header = ["run", "command -> first step s", "imports+Hydra s", "setup s", "note"]
    rows = [
        [
            describe(r),
            _fmt(r.get("to_first_step"), ".1f"),
            _fmt(r.get("launch_seconds"), ".1f"),
            _fmt(r.get("setup_seconds"), ".1f"),
            _status(r),
        ]
        for r in startup
    ]
    return [
        f"time to first step: prefopt-train {overrides} (the embedded default: 2,000 synthetic pairs); setup = "
        "train() until its first step (tokenizer, model, data, reference)",
        *_table(header, rows),
    ]


def _adapter_table(plan, manifest: dict, runs: list[dict]) -> list[str]:
    """Full fine-tuning vs LoRA (r 16, all linear layers), precomputed vs live reference: trainable share, peak RSS
    (each in its own process) and its difference from full fine-tuning with precomputed log-probs, tokens/s."""
    base = next((r.get("peak_rss_mib") for r in runs if r["name"] == "adapters-full" and r.get("ok")), None)
    rows = []
    for r in runs:
        trainable, total = r.get("trainable_params"), r.get("total_params")
        share = f"{trainable / total:.1%}" if trainable and total else "n/a"
        peak = r.get("peak_rss_mib") if r.get("ok") else None
        rows.append(
            [
                r["name"].removeprefix("adapters-"),
                "live" if r.get("reference_model") else "precomputed",
                _fmt(trainable, ".0f") if trainable else "n/a",
                share,
                _fmt(peak, ".0f"),
                _fmt(peak - base, "+.0f") if peak is not None and base is not None else "n/a",
                _fmt(step_seconds(r, 1), ".2f") if r.get("ok") else _status(r),
            ]
        )
    header = ["adapters", "reference", "trainable params", "share", "peak RSS MiB", "vs full", "step s"]
    note = " (--quick: one process, peak RSS not comparable)" if plan.quick else ""
    total = next((r.get("total_params") for r in runs if r["name"] == "adapters-full"), None)
    size = f"{total / 1e6:.1f}M-parameter Llama" if total else "Llama"
    return [
        f"full fine-tuning vs LoRA (r 16, all linear layers), DPO on a {size}, fp32{note}:",
        *_table(header, rows),
    ]


def _memory_check(plan, memory: list[dict]) -> list[str]:
    by_name = {r["name"]: r for r in memory}
    naive = by_name.get("logsoftmax-naive", {})
    base = naive.get("peak_delta_mib", NAN) if naive.get("ok") else NAN
    header = ["variant", "peak MiB (fwd+bwd)", "ratio vs naive", "seconds", "note"]
    rows = []
    for r in memory:
        delta = r.get("peak_delta_mib", NAN) if r.get("ok") else NAN
        rows.append(
            [
                r["name"],
                _fmt(delta, ".0f"),
                _fmt(_ratio(delta, base), ".3f"),
                _fmt(r.get("seconds"), ".1f"),
                _status(r),
            ]
        )
    method = next((r.get("method") for r in memory if r.get("method")), "?")
    title = (
        f"selective log-softmax memory: vocab {plan.memory_vocab}, {plan.memory_tokens} tokens, hidden "
        f"{plan.memory_hidden}, fp32; {'one process (--quick)' if plan.quick else 'each variant in its own process'}"
        f"; peak = peak RSS ({method}) - RSS before the call (inputs and LM head allocated before); forward + "
        "backward; target ratio <= 0.25"
    )
    checks = [r.get("checksum") for r in memory if r.get("ok")]
    agree = all(
        all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3) for a, b in zip(c, checks[0], strict=True)) for c in checks
    )
    return [
        title,
        *_table(header, rows),
        f"check: all variants give the same log-probs and gradients: {'yes' if agree else 'NO'}",
    ]
