"""What the benchmark runs: model and data sizes, steps, the configurations compared (full and ``--quick``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Plan:
    quick: bool
    # the model: a Llama from a transformers config, the project's embedded byte-level BPE tokenizer
    model: dict[str, int]
    vocab_size: int  # of the embedded tokenizer (= the model's vocabulary)
    # the main comparison
    batch_size: int  # preference pairs per optimizer step (no accumulation)
    warmup_steps: int  # excluded from the steady state
    measured_steps: int
    min_words: int  # completion length range of the synthetic pairs (words)
    max_words: int
    max_length: int  # prompt + completion tokens; chosen so that nothing is truncated (checked)
    max_prompt_length: int
    lr: float
    beta: float
    # the scaling table (prefopt best): sequence lengths at `scaling_batch`, batch sizes at `scaling_seq`
    scaling_seqs: list[int]
    scaling_batch: int
    scaling_batches: list[int]
    scaling_seq: int
    scaling_warmup: int
    scaling_measured: int
    # selective log-softmax memory check: vocabulary, tokens, hidden size
    memory_vocab: int
    memory_tokens: int
    memory_hidden: int
    memory_chunk: int  # a fixed chunk size (rows) also measured, besides prefopt.logps' default
    # time to first step (prefopt-train on the embedded default, no SFT warm start)
    startup_overrides: list[str] = field(default_factory=list)
    # full fine-tuning vs LoRA: prefopt-train on the embedded synthetic data with a model large enough that weights
    # and optimizer state, not the process's libraries, decide the peak memory
    adapter_overrides: list[str] = field(default_factory=list)
    seed: int = 0
    # the online table: GRPO (prefopt trainer=online loss=grpo vs TRL's GRPOTrainer) on the same model and prompts
    online_batch: int = 8  # prompts per optimizer step (each gives online_k completions; no accumulation)
    online_k: int = 4  # completions per prompt (prefopt samples_per_prompt, TRL num_generations)
    online_max_new_tokens: int = 64  # prefopt max_new_tokens, TRL max_completion_length
    online_warmup: int = 2  # steps excluded from the steady state
    online_measured: int = 8
    online_beta: float = 0.04  # the per-token KL weight: both run a reference (TRL's default 0.0 loads none)
    online_lr: float = 1e-5

    @property
    def online_steps(self) -> int:
        return self.online_warmup + self.online_measured

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.measured_steps

    @property
    def n_train(self) -> int:
        return self.batch_size * self.steps  # exactly one epoch, so every runner sees every pair once

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Plan(
    quick=False,
    model={
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": 1024,
    },
    vocab_size=512,
    batch_size=8,
    warmup_steps=3,
    measured_steps=12,
    min_words=16,
    max_words=80,
    max_length=256,
    max_prompt_length=32,
    lr=1e-4,
    beta=0.1,
    scaling_seqs=[128, 256, 512, 1024],
    scaling_batch=8,
    scaling_batches=[4, 8, 16, 32],
    scaling_seq=256,
    scaling_warmup=1,
    scaling_measured=3,
    memory_vocab=128_256,
    memory_tokens=2048,
    memory_hidden=256,
    memory_chunk=4096,  # prefopt.logps' fixed default before it became vocabulary-aware
    startup_overrides=["model.sft.steps=0", "trainer.max_steps=1", "trainer.eval_every=0"],
    adapter_overrides=[  # a 101M-parameter Llama (404 MB of fp32 weights)
        "model.config.hidden_size=1024",
        "model.config.intermediate_size=2816",
        "model.config.num_hidden_layers=8",
        "model.config.num_attention_heads=16",
        "model.config.num_key_value_heads=16",
        "model.sft.steps=0",
        "data.n_train=64",
        "data.n_eval=8",
        "trainer.batch_size=4",
        "trainer.max_steps=4",
        "trainer.eval_every=0",
    ],
)

QUICK = Plan(
    quick=True,
    model={
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 128,
    },
    vocab_size=512,
    batch_size=2,
    warmup_steps=1,
    measured_steps=2,
    min_words=4,
    max_words=10,
    max_length=80,
    max_prompt_length=16,
    lr=1e-3,
    beta=0.1,
    scaling_seqs=[32, 64],
    scaling_batch=2,
    scaling_batches=[2, 4],
    scaling_seq=32,
    scaling_warmup=1,
    scaling_measured=1,
    memory_vocab=4096,
    memory_tokens=256,
    memory_hidden=32,
    memory_chunk=4096,
    startup_overrides=[
        "model.sft.steps=0",
        "trainer.max_steps=1",
        "trainer.eval_every=0",
        "data.n_train=64",
        "data.n_eval=8",
        "model.config.hidden_size=32",
        "model.config.intermediate_size=64",
        "model.config.num_hidden_layers=1",
        "model.config.num_attention_heads=2",
        "model.config.num_key_value_heads=1",
    ],
    adapter_overrides=[
        "model.sft.steps=0",
        "data.n_train=16",
        "data.n_eval=4",
        "model.config.hidden_size=32",
        "model.config.intermediate_size=64",
        "model.config.num_hidden_layers=1",
        "model.config.num_attention_heads=2",
        "model.config.num_key_value_heads=1",
        "trainer.batch_size=4",
        "trainer.max_steps=3",
        "trainer.eval_every=0",
    ],
    online_batch=2,
    online_k=4,
    online_max_new_tokens=8,
    online_warmup=1,
    online_measured=2,
)

# Configurations of the main table. "harness" settings (batch, steps, lengths, lr, data order, evaluation off) are
# equal for all; what is listed here is what each configuration changes.
# prefopt-train's defaults: precomputed reference, micro-batch = batch, fp32, length buckets, fused AdamW
PREFOPT_DEFAULT: list[str] = []
PREFOPT_BEST = ["trainer.progress_bar=false"]  # nothing faster found among the trainer's settings (see README/report)
# the same padding as TRL and the bare loop (one padded forward per step): prefopt's own overhead over the bare loop
PREFOPT_PADDED = ["trainer.length_buckets=false", "trainer.progress_bar=false"]
# gradient checkpointing, as TRL's default: the memory comparison at equal settings
PREFOPT_CHECKPOINTING = ["trainer.gradient_checkpointing=true", "trainer.progress_bar=false"]
TRL_DEFAULT: dict[str, Any] = {}  # DPOConfig defaults: live reference, gradient checkpointing, bf16 autocast
TRL_BEST = {
    "precompute_ref_log_probs": True,
    "padding_free": True,  # TRL 1.16 warns and falls back to padding (recorded in the notes)
    "gradient_checkpointing": False,
    "bf16": False,  # bf16 autocast is slower on a CPU without native bf16 (checked: see the notes of the report)
}
