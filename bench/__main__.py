"""``python -m bench`` (``make bench``): prefopt vs TRL's DPOTrainer vs a bare PyTorch loop, side by side; online,
prefopt's GRPO step vs TRL's GRPOTrainer (bench/online.py).

    python -m bench                                   # full: 3 interleaved rounds, ~22 min on 2 CPU cores
    python -m bench --rounds 5 --skip scaling,startup,memory   # the ratios only, 5 rounds
    python -m bench --skip main,scaling,startup,memory,adapters --rounds 6   # the online table alone
    python -m bench --quick                           # tiny sizes, one worker process, seconds

Every configuration trains the same model (saved once, loaded by every run) on the same pairs in the same batches
for the same steps with the same threads, each in its own process (peak RSS = that process's). The configurations
of the main and the online table run in ``--rounds`` interleaved rounds (each round runs every configuration once,
in an order rotated by one per round), so slow phases of a shared machine fall on all of them; every ratio is
computed per round and printed as its median with the spread over the rounds. See bench/report.py for what is
printed and how the ratios are defined.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import online as online_bench
from bench import plan as plans
from bench import report
from bench.artifacts import layout, scaling_points
from bench.startup import STARTUP_RUNS, prepare_startup_cache

ROOT = Path(__file__).resolve().parent.parent


PARTS = ("main", "online", "scaling", "startup", "memory", "adapters")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("PREFOPT_BENCH_QUICK") == "1")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of every run")
    parser.add_argument(
        "--rounds",
        "--repeats",
        type=int,
        default=3,
        help="interleaved rounds of the main and online tables (--quick: 1)",
    )
    parser.add_argument("--workdir", help="where models, data and runs go (default: a temporary dir, removed)")
    parser.add_argument("--json", help="also write every raw result to this JSON file")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated parts to leave out: main, online, scaling, startup, memory, adapters",
    )
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed to each run")
    args = parser.parse_args(argv)
    unknown = {s.strip() for s in args.skip.split(",") if s.strip()} - set(PARTS)
    if unknown:
        parser.error(f"--skip: unknown part(s) {', '.join(sorted(unknown))}")
    return args


class Runner:
    """Runs specs in worker processes (one per spec; ``--quick``: all in one) with a controlled environment."""

    def __init__(self, workdir: Path, quick: bool, timeout: int):
        self.workdir, self.quick, self.timeout = workdir, quick, timeout
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "HF_DATASETS_CACHE": str(workdir / "hf-datasets"),
            "HF_HUB_OFFLINE": "1",
            "HF_UPDATE_DOWNLOAD_COUNTS": "0",
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.count = 0

    def launch(self, args: list[str], log: Path) -> int:
        with log.open("w") as handle:
            try:
                return subprocess.run(
                    args, cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT, timeout=self.timeout
                ).returncode
            except subprocess.TimeoutExpired:
                return -9

    def run(self, spec: dict) -> dict:
        self.count += 1
        base = self.workdir / "specs" / f"{self.count:02d}-{spec['name']}"
        base.parent.mkdir(parents=True, exist_ok=True)
        spec_path, out_path = base.with_suffix(".spec.json"), base.with_suffix(".out.json")
        spec_path.write_text(json.dumps(spec))
        _progress(f"{spec['name']} ...")
        started = time.perf_counter()
        code = self.launch(
            [sys.executable, "-m", "bench.worker", str(spec_path), str(out_path)], base.with_suffix(".log")
        )
        if out_path.exists():
            result = json.loads(out_path.read_text())
        else:
            result = {
                "name": spec["name"],
                "ok": False,
                "error": f"worker exited {code}: {_tail(base.with_suffix('.log'))}",
            }
        result["wall_seconds"] = time.perf_counter() - started
        _progress(
            f"{spec['name']}: {'ok' if result.get('ok') else result.get('missing') or result.get('error')}"
            f" ({result['wall_seconds']:.0f}s)"
        )
        return result

    def run_all(self, specs: list[dict]) -> list[dict]:
        if not self.quick:
            return [self.run(spec) for spec in specs]
        base = self.workdir / "specs" / "batch"
        base.parent.mkdir(parents=True, exist_ok=True)
        spec_path, out_path = base.with_suffix(".spec.json"), base.with_suffix(".out.json")
        spec_path.write_text(json.dumps(specs))
        _progress(f"{len(specs)} configurations in one worker process (--quick) ...")
        code = self.launch(
            [sys.executable, "-m", "bench.worker", "--batch", str(spec_path), str(out_path)], base.with_suffix(".log")
        )
        results = json.loads(out_path.read_text()) if out_path.exists() else []
        done = {r["name"] for r in results}
        error = f"worker exited {code}: {_tail(base.with_suffix('.log'))}"
        return results + [{"name": s["name"], "ok": False, "error": error} for s in specs if s["name"] not in done]


def _interleaved(runner: Runner, specs: list[dict], round_index: int) -> list[dict]:
    """One round: every configuration once, starting at a different one each round; results in ``specs`` order."""
    if not specs:
        return []
    shift = round_index % len(specs)
    order = specs[shift:] + specs[:shift]
    by_name = {r["name"]: r for r in runner.run_all(order)}
    return [by_name[s["name"]] for s in specs]


def _tail(path: Path, lines: int = 5) -> str:
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) if path.exists() else ""


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- the specs
def _prefopt_overrides(plan, where, data, run_dir: Path, *, batch, steps, max_length, max_prompt_length):
    return [
        f"model.name={where['model_dir']}",
        f"model.tokenizer={where['model_dir']}",
        "model.sft.steps=0",
        "data=local",
        f"data.path={data['train']}",
        f"data.eval_path={data['eval']}",
        f"data.max_length={max_length}",
        f"data.max_prompt_length={max_prompt_length}",
        f"trainer.batch_size={batch}",
        f"trainer.max_steps={steps}",
        "trainer.eval_every=0",
        f"trainer.lr={plan.lr}",
        "trainer.scheduler=constant_with_warmup",
        "trainer.warmup_steps=0",
        f"trainer.seed={plan.seed}",
        f"cache_dir={run_dir / 'cache'}",  # every run starts cold: its own reference precompute, as TRL's does
    ]


def main_specs(plan, where, workdir: Path, threads: int, tag: str = "") -> list[dict]:
    data = where["main"]
    runs = workdir / "runs"

    def prefopt_spec(name: str, extra: list[str]) -> dict:
        run_dir = runs / f"{name}{tag}"
        overrides = _prefopt_overrides(
            plan,
            where,
            data,
            run_dir,
            batch=plan.batch_size,
            steps=plan.steps,
            max_length=plan.max_length,
            max_prompt_length=plan.max_prompt_length,
        )
        return {
            "kind": "prefopt",
            "name": name,
            "overrides": [*overrides, *extra],
            "run_dir": str(run_dir / "run"),
            "threads": threads,
        }

    common = {
        "model_dir": where["model_dir"],
        "rows": data["ordered"],
        "batch_size": plan.batch_size,
        "steps": plan.steps,
        "lr": plan.lr,
        "beta": plan.beta,
        "max_length": plan.max_length,
        "seed": plan.seed,
        "threads": threads,
    }
    beta = f"loss.beta={plan.beta}"
    trl_default = {"kind": "trl", "name": "trl-default", "knobs": plans.TRL_DEFAULT, **common}
    trl_best = {"kind": "trl", "name": "trl-best", "knobs": plans.TRL_BEST, **common}
    return [
        prefopt_spec("prefopt-default", ["loss=dpo", beta, *plans.PREFOPT_DEFAULT]),
        prefopt_spec("prefopt-best", ["loss=dpo", beta, *plans.PREFOPT_BEST]),
        prefopt_spec("prefopt-padded", ["loss=dpo", beta, *plans.PREFOPT_PADDED]),
        prefopt_spec("prefopt-ckpt", ["loss=dpo", beta, *plans.PREFOPT_CHECKPOINTING]),
        {**trl_default, "run_dir": str(runs / f"trl-default{tag}")},
        {**trl_best, "run_dir": str(runs / f"trl-best{tag}")},
        {"kind": "bare", "name": "bare-pytorch", **common},
        prefopt_spec("prefopt-mpo", ["loss=mpo", *plans.PREFOPT_BEST]),
        prefopt_spec("prefopt-dpo-live", ["loss=dpo", beta, "reference.mode=live", *plans.PREFOPT_BEST]),
    ]


def scaling_specs(plan, where, workdir: Path, threads: int) -> list[dict]:
    specs = []
    for seq, batch in scaling_points(plan):
        run_dir = workdir / "runs" / f"scaling-{seq}x{batch}"
        overrides = _prefopt_overrides(
            plan,
            where,
            where["scaling"](seq, batch),
            run_dir,
            batch=batch,
            steps=plan.scaling_warmup + plan.scaling_measured,
            max_length=seq,
            max_prompt_length=min(plan.max_prompt_length, seq // 2),
        )
        extra = ["loss=dpo", f"loss.beta={plan.beta}", *plans.PREFOPT_BEST]
        specs.append(
            {
                "kind": "prefopt",
                "name": f"scaling-{seq}x{batch}",
                "overrides": [*overrides, *extra],
                "run_dir": str(run_dir / "run"),
                "threads": threads,
            }
        )
    return specs


ADAPTER_CONFIGS = {  # name -> overrides: full fine-tuning vs LoRA, each with a precomputed and a live reference
    "full": [],
    "full-live": ["reference.mode=live"],
    "lora": ["model.lora.r=16", "model.lora.alpha=32"],
    "lora-live": ["model.lora.r=16", "model.lora.alpha=32", "reference.mode=live"],
}


def adapter_specs(plan, workdir: Path, threads: int) -> list[dict]:
    """DPO under full fine-tuning and LoRA, each with precomputed and live reference log-probs, on a model large
    enough for weights and optimizer state to decide the peak memory (``plan.adapter_overrides``); one process each,
    one shared cache (the tokenizer), each its own reference precompute."""
    specs = []
    for name, extra in ADAPTER_CONFIGS.items():
        run_dir = workdir / "runs" / f"adapters-{name}"
        overrides = [
            *plan.adapter_overrides,
            "loss=dpo",
            f"loss.beta={plan.beta}",
            f"trainer.seed={plan.seed}",
            f"cache_dir={workdir / 'adapters-cache' / name}",
            *plans.PREFOPT_BEST,
            *extra,
        ]
        specs.append(
            {
                "kind": "prefopt",
                "name": f"adapters-{name}",
                "overrides": overrides,
                "run_dir": str(run_dir / "run"),
                "threads": threads,
            }
        )
    return specs


def memory_specs(plan, threads: int) -> list[dict]:
    common = {
        "kind": "logsoftmax",
        "vocab": plan.memory_vocab,
        "tokens": plan.memory_tokens,
        "hidden": plan.memory_hidden,
        "threads": threads,
    }
    return [
        {**common, "name": "logsoftmax-naive", "variant": "naive"},
        {**common, "name": "logsoftmax-selective", "variant": "selective", "chunk_size": None},  # the default
        {
            **common,
            "name": f"logsoftmax-selective-{plan.memory_chunk}",
            "variant": "selective",
            "chunk_size": plan.memory_chunk,
        },
    ]


def startup_overrides(plan, cache: Path) -> list[str]:
    return [*plan.startup_overrides, f"cache_dir={cache}", "trainer.progress_bar=false"]


def startup_inprocess_specs(plan, workdir: Path, threads: int) -> list[dict]:
    """--quick: the startup runs inside the worker (imports excluded)."""
    cache = workdir / "startup-cache"
    return [
        {
            "kind": "startup",
            "name": f"startup-{name}",
            "cache": name,
            "overrides": startup_overrides(plan, cache),
            "run_dir": str(workdir / "runs" / f"startup-{name}"),
            "tokenizer_cache": str(workdir / "cache"),
            "startup_cache": str(cache),
            "threads": threads,
        }
        for name in STARTUP_RUNS
    ]


def startup_cli_runs(plan, where, workdir: Path, runner: Runner) -> list[dict]:
    """``prefopt-train`` (``python -m prefopt.train``) on the embedded default without SFT warm start: a first run
    on an empty cache, then with a cold and with a warm data cache (see ``STARTUP_RUNS``).
    Command -> first step = command wall time - (train()'s seconds - its seconds_to_first_step): imports and Hydra
    plus setup; the interpreter's exit after train() returns is the only other thing counted in it."""
    cache = workdir / "startup-cache"
    results = []
    for name in STARTUP_RUNS:
        prepare_startup_cache(Path(where["tokenizer_cache"]), cache, name)
        run_dir = workdir / "runs" / f"startup-{name}"
        _progress(f"prefopt-train ({STARTUP_RUNS[name]}) ...")
        args = [sys.executable, "-m", "prefopt.train", *startup_overrides(plan, cache), f"hydra.run.dir={run_dir}"]
        started = time.perf_counter()
        log = workdir / "specs" / f"startup-{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        code = runner.launch(args, log)
        wall = time.perf_counter() - started
        summary_path = run_dir / "summary.json"
        if code != 0 or not summary_path.exists():
            results.append({"name": f"startup-{name}", "ok": False, "error": f"exit {code}: {_tail(log)}"})
            continue
        summary = json.loads(summary_path.read_text())
        after_first = summary["seconds"] - summary["seconds_to_first_step"]  # steps + saving, inside train()
        results.append(
            {
                "name": f"startup-{name}",
                "ok": True,
                "cache": name,
                "command_seconds": wall,
                "to_first_step": wall - after_first,
                "setup_seconds": summary["seconds_to_first_step"],
                "launch_seconds": wall - summary["seconds"],
            }
        )
        _progress(f"prefopt-train ({name}): {wall - after_first:.1f}s to the first step")
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    plan = plans.QUICK if args.quick else plans.FULL
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="prefopt-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    runner = Runner(workdir, plan.quick, args.timeout)
    where = layout(workdir)
    started = time.perf_counter()
    artifacts = {"kind": "artifacts", "name": "artifacts", "plan": plan.as_dict(), "workdir": str(workdir)}
    rounds = 1 if plan.quick else max(1, args.rounds)
    parts = {
        "main": [main_specs(plan, where, workdir, args.threads, f"-r{r}") for r in range(rounds)],
        "online": [online_bench.specs(plan, where, workdir, args.threads, f"-r{r}") for r in range(rounds)],
        "scaling": scaling_specs(plan, where, workdir, args.threads),
        "memory": memory_specs(plan, args.threads),
        "adapters": adapter_specs(plan, workdir, args.threads),
        "startup": startup_inprocess_specs(plan, workdir, args.threads) if plan.quick else [],
    }
    for name in skip:
        parts[name] = [] if name not in ("main", "online") else [[]]
    try:
        if plan.quick:  # everything in one worker process, in this order
            flat = [
                artifacts,
                *parts["main"][0],
                *parts["online"][0],
                *parts["scaling"],
                *parts["startup"],
                *parts["memory"],
                *parts["adapters"],
            ]
            by_name = {r["name"]: r for r in runner.run_all(flat)}
            built = by_name["artifacts"]
            main = [by_name[s["name"]] for s in parts["main"][0]]
            online = [by_name[s["name"]] for s in parts["online"][0]]
            results = {
                "main": main,
                "main_rounds": [main],
                "online": online,
                "online_rounds": [online] if online else [],
                **{k: [by_name[s["name"]] for s in parts[k]] for k in ("scaling", "startup", "memory", "adapters")},
            }
        else:
            built = runner.run(artifacts)
            if built.get("ok"):
                measured = [_interleaved(runner, specs, r) for r, specs in enumerate(parts["main"])]
                results = {
                    "main": report.best_of(measured, plan.warmup_steps) if parts["main"][0] else [],
                    "main_rounds": measured if parts["main"][0] else [],
                }
                online = [_interleaved(runner, specs, r) for r, specs in enumerate(parts["online"])]
                results |= {
                    "online": report.best_online(online, plan.online_warmup) if parts["online"][0] else [],
                    "online_rounds": online if parts["online"][0] else [],
                    "scaling": runner.run_all(parts["scaling"]),
                    "startup": startup_cli_runs(plan, where, workdir, runner) if "startup" not in skip else [],
                    "memory": runner.run_all(parts["memory"]),
                    "adapters": runner.run_all(parts["adapters"]),
                }
        if not built.get("ok"):
            print(f"bench: building the model and data failed: {built.get('error')}", file=sys.stderr)
            print(built.get("traceback", ""), file=sys.stderr)
            return 1
        manifest = built["manifest"]
        elapsed = time.perf_counter() - started
        if args.json:
            payload = {"plan": plan.as_dict(), "manifest": manifest, "threads": args.threads, **results}
            Path(args.json).write_text(json.dumps(payload, indent=1))
        print(report.render(plan, manifest, results, threads=args.threads, repeats=rounds, elapsed=elapsed))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
