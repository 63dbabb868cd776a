"""The online table: prefopt's online GRPO step vs TRL 1.16's ``GRPOTrainer`` on the same model, prompts, k,
``max_new_tokens``, beta, lr and steps, each configuration in its own process (``python -m bench.worker``).

Both sides do the same work per step: ``online_batch`` prompts (in the same order, see
``bench.artifacts._online_prompts``), ``online_k`` completions each sampled at temperature 1 (top-p 1, no top-k) with
at most ``online_max_new_tokens`` new tokens and cut after the first EOS (kept: both keep it in the loss mask), one
reward function (:func:`reward`, the same Python function on both sides: prefopt takes it as ``reward=custom``), the
per-token KL to a reference (``online_beta`` > 0, so both hold a reference model and compute its per-token
log-probs), group advantages (``scale_rewards=group``), GRPO's clipped per-token loss (``loss_type="grpo"``), one
AdamW step, fp32, no gradient checkpointing. Step time is from fetching the step's prompts to the end of the
optimizer step (generation, scoring, reference log-probs, forward/backward and the optimizer step); samples/s =
completions of the measured steps / the sum of their step times.

Each step's time is also split into phases, measured by wrapping the functions that do them (no profiler running):
``generate`` (sampling the completions, decoding them to text), ``score`` (the reward), ``logps`` (forwards
without gradient: the reference's per-token log-probs, and whatever the sampler computes of the policy's) and
``train`` (the rest: the policy's forward with gradient, backward, clipping, optimizer step, batch assembly).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefopt.data.synthetic import LEXICON, words

PHASES = ("generate", "score", "logps", "train")
_ABSENT = object()


# ------------------------------------------------------------------------------------------------------- reward
def reward(prompts, completions, **_: Any) -> list[float]:
    """The online table's reward, one plain Python function for both trainers: the synthetic task's lexicon score
    (+1 per positive, -1 per negative word) plus 0.1 per word, so samples of an untrained model differ in reward."""
    return [sum(LEXICON.get(w, 0.0) for w in words(c)) + 0.1 * len(c.split()) for c in completions]


# -------------------------------------------------------------------------------------------------------- specs
def specs(plan, where: dict, workdir: Path, threads: int, tag: str = "") -> list[dict]:
    """One round of the online table: prefopt's online GRPO and TRL's GRPOTrainer."""
    data, runs = where["online"], workdir / "runs"
    common = {
        "model_dir": where["model_dir"],
        "batch": plan.online_batch,
        "k": plan.online_k,
        "max_new_tokens": plan.online_max_new_tokens,
        "steps": plan.online_steps,
        "beta": plan.online_beta,
        "lr": plan.online_lr,
        "seed": plan.seed,
        "threads": threads,
    }
    run_dir = runs / f"online-prefopt{tag}"
    overrides = [
        "trainer=online",
        "loss=grpo",
        f"loss.beta={plan.online_beta}",
        "reward=custom",
        "reward._target_=bench.online.reward",
        "reward.name=bench_reward",
        f"model.name={where['model_dir']}",
        f"model.tokenizer={where['model_dir']}",
        "model.sft.steps=0",
        "data=local",
        f"data.path={data['train']}",
        f"data.eval_path={data['eval']}",
        f"data.max_length={plan.max_length}",
        f"data.max_prompt_length={plan.max_prompt_length}",
        f"trainer.batch_size={plan.online_batch}",
        f"trainer.max_steps={plan.online_steps}",
        f"trainer.lr={plan.online_lr}",
        "trainer.scheduler=constant_with_warmup",
        "trainer.warmup_steps=0",
        "trainer.eval_every=0",
        "trainer.eval_at_start=false",
        "trainer.progress_bar=false",
        "trainer.report_to=[]",
        f"trainer.seed={plan.seed}",
        f"trainer.online.samples_per_prompt={plan.online_k}",
        f"trainer.online.max_new_tokens={plan.online_max_new_tokens}",
        "trainer.online.temperature=1.0",
        "trainer.online.top_p=1.0",
        "trainer.online.table_every=0",
        "trainer.online.fit_prompts=1",  # setup only (reward statistics, unused by this reward)
        f"cache_dir={run_dir / 'cache'}",
    ]
    return [
        {
            "kind": "prefopt-online",
            "name": "prefopt-grpo",
            "overrides": overrides,
            "run_dir": str(run_dir / "run"),
            **common,
        },
        {
            "kind": "trl-grpo",
            "name": "trl-grpo",
            "rows": data["ordered"],
            "run_dir": str(runs / f"online-trl{tag}"),
            **common,
        },
    ]


# ------------------------------------------------------------------------------------------------------- phases
class Phases:
    """Per-step seconds of the phases (see the module docstring), by wrapping the functions that do them. A call
    nested in another timed call counts only for the outer one. ``begin()`` starts a step's record."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = defaultdict(float)  # before the first step: setup
        self.depth = 0
        self.wrapped: list[tuple[Any, str, Any]] = []

    def begin(self) -> None:
        self.current = defaultdict(float)
        self.steps.append(self.current)

    @contextmanager
    def timed(self, phase: str):
        if self.depth:
            yield
            return
        self.depth += 1
        started = time.perf_counter()
        try:
            yield
        finally:
            self.current[phase] += time.perf_counter() - started
            self.depth -= 1

    def wrap(self, owner: Any, attribute: str, phase: str | None) -> None:
        """Time ``owner.attribute`` as ``phase`` (a callable ``phase(args, kwargs) -> str`` picks it per call)."""
        original = getattr(owner, attribute)

        def wrapper(*args, **kwargs):
            name = phase(args, kwargs) if callable(phase) else phase
            with self.timed(name):
                return original(*args, **kwargs)

        self.wrapped.append((owner, attribute, vars(owner).get(attribute, _ABSENT)))
        setattr(owner, attribute, wrapper)

    def restore(self) -> None:
        """Undo every wrap (--quick runs every configuration in one process)."""
        for owner, attribute, original in reversed(self.wrapped):
            if original is _ABSENT:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)
        self.wrapped.clear()

    def per_step(self, step_seconds: list[float]) -> list[dict[str, float]]:
        """Each step's phases, ``train`` = the step's time minus the other phases."""
        out = []
        for seconds, phases in zip(step_seconds, self.steps, strict=False):
            row = {p: float(phases.get(p, 0.0)) for p in PHASES if p != "train"}
            row["train"] = max(0.0, seconds - sum(row.values()))
            out.append(row)
        return out


# ------------------------------------------------------------------------------------------------------ runners
def fingerprint(prompt_ids) -> str:
    """A short digest of one step's prompts (token ids, in order): both trainers must sample the same ones."""
    import hashlib

    return hashlib.sha256(json.dumps([list(map(int, p)) for p in prompt_ids]).encode()).hexdigest()[:12]


def _jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def run_prefopt_online(spec: dict) -> dict:
    """``prefopt.fit`` with ``trainer=online loss=grpo``; per-step numbers from metrics.jsonl, phases by wrapping
    the sampler's generation, scoring and log-prob functions and the reference."""
    import torch

    torch.set_num_threads(int(spec["threads"]))
    import prefopt
    from prefopt import reference, scoring, sources

    phases = Phases()
    draw = sources.OnlineSource.draw

    def draw_and_mark(self, policy, step):
        phases.begin()
        return draw(self, policy, step)

    generate = sources.OnlineSource.generate
    prompts_per_step: list[str] = []

    def generate_and_record(self, model, prompts, k, seed):
        if len(prompts_per_step) < len(phases.steps):  # the step's draw (not the scorer's setup samples)
            prompts_per_step.append(fingerprint(p["prompt_ids"] for p in prompts))
        return generate(self, model, prompts, k, seed)

    sources.OnlineSource.draw = draw_and_mark
    sources.OnlineSource.generate = generate_and_record
    phases.wrap(sources.OnlineSource, "generate", "generate")
    for name in ("logps_of", "token_logps_of"):  # the policy's log-probs at sampling time
        if hasattr(sources, name):
            phases.wrap(sources, name, "logps")
    for name in ("logps", "token_logps", "token_values"):  # every reference forward, at sampling or in the step
        if hasattr(reference.Reference, name):
            phases.wrap(reference.Reference, name, "logps")
    scorer_classes = [getattr(scoring, n) for n in ("RewardScorer", "AlarmScorer") if hasattr(scoring, n)]
    for cls in scorer_classes:
        phases.wrap(cls, "__call__", "score")
    try:
        summary = prefopt.fit(prefopt.compose(spec["overrides"]), run_dir=spec["run_dir"])
    finally:
        phases.restore()
        sources.OnlineSource.draw, sources.OnlineSource.generate = draw, generate
    lines = [line for line in _jsonl(summary["metrics"]) if "perf/step_seconds" in line]
    step_seconds = [line["perf/step_seconds"] for line in lines]
    return {
        "step_seconds": step_seconds,
        "samples": [spec["batch"] * spec["k"]] * len(lines),
        "completion_length": [line.get("online/response_length") for line in lines],
        "eos_frac": [line.get("online/eos_frac") for line in lines],
        "reward": [line.get("online/reward/mean") for line in lines],
        "kl": [line.get("kl") for line in lines],
        "losses": [line["loss"] for line in lines],
        "phases": phases.per_step(step_seconds),
        "prompts": prompts_per_step,
        "setup_seconds": summary.get("seconds_to_first_step"),
    }


def run_trl_grpo(spec: dict) -> dict:
    """TRL's ``GRPOTrainer`` on the same prompts in the same steps (the ordered file, unshuffled), the same model
    directory, k, max_new_tokens, beta, lr, clipping and reward function; generation by ``model.generate`` (no
    vLLM), fp32, no gradient checkpointing (prefopt's settings; TRL's defaults are bf16 autocast and checkpointing)."""
    import torch

    torch.set_num_threads(int(spec["threads"]))
    try:
        import trl
    except ImportError:
        return {"missing": "TRL not installed (pip install -e .[bench])"}
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    phases = Phases()
    record: dict[str, list] = {
        "step_seconds": [],
        "samples": [],
        "completion_length": [],
        "eos_frac": [],
        "prompts": [],
    }
    eos_id: list[int] = []

    class Timed(trl.GRPOTrainer):
        bench_start = 0.0

        def get_batch_samples(self, *args, **kwargs):
            self.bench_start = time.perf_counter()
            phases.begin()
            return super().get_batch_samples(*args, **kwargs)

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            record["prompts"].append(fingerprint(prompt_ids[:: self.num_generations]))
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            record["samples"].append(len(completion_ids))
            record["completion_length"].append(sum(map(len, completion_ids)) / max(len(completion_ids), 1))
            eos = sum(bool(c) and c[-1] in eos_id for c in completion_ids)
            record["eos_frac"].append(eos / max(len(completion_ids), 1))
            return completion_ids, logprobs

    phases.wrap(Timed, "_generate_single_turn", "generate")
    phases.wrap(Timed, "_calculate_rewards", "score")
    # forwards without gradient: the reference's per-token log-probs (and the old policy's when TRL needs them)
    phases.wrap(
        Timed,
        "_get_per_token_logps_and_entropies",
        lambda args, kwargs: "logps" if not torch.is_grad_enabled() else "train",
    )

    class Recorder(TrainerCallback):
        trainer: Timed | None = None

        def on_step_end(self, args, state, control, **kwargs):
            record["step_seconds"].append(time.perf_counter() - self.trainer.bench_start)

    rows = _jsonl(spec["rows"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    eos_id.append(tokenizer.eos_token_id)
    completions = spec["batch"] * spec["k"]
    args = trl.GRPOConfig(
        output_dir=spec["run_dir"],
        per_device_train_batch_size=completions,  # completions per step: one generation per optimizer step
        gradient_accumulation_steps=1,
        num_generations=spec["k"],
        max_completion_length=spec["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=spec["beta"],
        loss_type="grpo",
        scale_rewards="group",
        num_iterations=1,
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=spec["seed"],
        shuffle_dataset=False,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=spec.get("use_cpu", True),
        model_init_kwargs={"dtype": torch.float32},
    )
    recorder = Recorder()
    trainer = Timed(
        model=spec["model_dir"],
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    recorder.trainer = trainer
    trainer.train()
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    notes = [
        f"bf16={args.bf16} gradient_checkpointing={args.gradient_checkpointing} "
        f"ref_model={'yes' if trainer.ref_model is not None else 'no'} use_vllm={args.use_vllm} "
        f"generation_batch_size={args.generation_batch_size} attn={trainer.model.config._attn_implementation} "
        f"optim={getattr(args.optim, 'value', args.optim)}"
    ]
    return {
        **record,
        "losses": losses,
        "reward": [entry.get("reward") for entry in history if "loss" in entry],
        "kl": [entry.get("kl") for entry in history if "loss" in entry],
        "phases": phases.per_step(record["step_seconds"]),
        "notes": notes,
        "trl": trl.__version__,
    }
