"""Tokenizer and model builders from a model config mapping (``conf/model/*.yaml``: OmegaConf DictConfig or dict).

    name: tiny-llama     # "tiny-llama" = a random-init LlamaForCausalLM from `config`; otherwise a hub id / local dir
    tokenizer: embedded  # "embedded" = a byte-level BPE trained in-project on the synthetic corpus;
                         # null = same as name; otherwise a hub id / local dir
    vocab_size: 512      # size of the embedded tokenizer
    config: {hidden_size: 64, ...}   # LlamaConfig fields for tiny-llama
    dtype: float32       # float32 | bfloat16 | float16
    trust_remote_code: false
    init_seed: 0         # tiny-llama weight init seed

The embedded tokenizer does not add BOS/EOS when encoding (``tokenizer(text)`` gives the bare tokens); add
``tokenizer.eos_token_id`` yourself where a sequence should end.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from prefopt.cache import cached, digest
from prefopt.config import plain

TINY_LLAMA = "tiny-llama"
EMBEDDED_TOKENIZER = "embedded"
TOKENIZER_VERSION = "prefopt-bpe-v1"  # bump when the embedded tokenizer's training changes: invalidates caches
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ModelConfig = Mapping[str, Any]


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype named ``name`` ("float32", "bfloat16", "float16"; a ``torch.`` prefix is accepted)."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(_DTYPES)}")
    return _DTYPES[key]


def _trust_remote_code(cfg: ModelConfig, what: str) -> bool:
    """The ``trust_remote_code`` flag of ``cfg``, warning visibly when it is on."""
    trust = bool(cfg.get("trust_remote_code", False))
    if trust:
        warnings.warn(
            f"trust_remote_code=True: loading the {what} runs Python code downloaded with it; "
            "only use it for repositories you trust.",
            UserWarning,
            stacklevel=3,
        )
    return trust


# --------------------------------------------------------------------------------------------------- tokenizer


def _train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a transformers tokenizer with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def embedded_tokenizer_key(vocab_size: int, texts: list[str]) -> str:
    """Cache key of the embedded tokenizer: vocab size, :data:`TOKENIZER_VERSION` and the corpus' sha256."""
    corpus_sha = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    return digest([int(vocab_size), TOKENIZER_VERSION, corpus_sha])[:16]


def _embedded_tokenizer(
    cfg: ModelConfig, cache_dir: str | Path, corpus: Callable[[], Iterable[str]] | None
) -> PreTrainedTokenizerFast:
    """The embedded BPE tokenizer: loaded from ``cache_dir`` when trained before, otherwise trained and cached."""
    if corpus is None:
        from prefopt.data.synthetic import default_corpus

        corpus = default_corpus
    texts = list(corpus())
    if not texts:
        raise ValueError("the corpus for the embedded tokenizer is empty")
    vocab_size = int(cfg.get("vocab_size", 512))
    cache_dir = Path(cache_dir)
    target = cache_dir / f"tokenizer-{embedded_tokenizer_key(vocab_size, texts)}"

    def load(path: Path) -> PreTrainedTokenizerFast:
        if not (path / "tokenizer.json").exists():
            raise ValueError("it has no tokenizer.json")
        return PreTrainedTokenizerFast.from_pretrained(str(path))

    def save(trained: PreTrainedTokenizerFast, tmp: Path) -> None:
        trained.save_pretrained(str(tmp))

    trained = cached(target, lambda: _train_bpe(texts, vocab_size), save=save, load=load, what="embedded tokenizer")
    tokenizer = load(target) if (target / "tokenizer.json").exists() else trained  # as saved, on every path
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tokenizer(
    cfg: ModelConfig, cache_dir: str | Path, corpus: Callable[[], Iterable[str]] | None = None
) -> PreTrainedTokenizerFast:
    """The tokenizer named by ``cfg.tokenizer``.

    ``"embedded"``: a byte-level BPE (``cfg.vocab_size``, special tokens ``<pad> <s> </s> <unk>``, a simple chat
    template) trained on ``corpus()`` (default: :func:`prefopt.synthetic.default_corpus`) and cached under
    ``cache_dir/tokenizer-<key>/``; a later call with the same vocab size and corpus loads the cached one.
    Otherwise ``AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.name)``, with pad set to eos when missing.
    """
    source = cfg.get("tokenizer", EMBEDDED_TOKENIZER)
    if source == EMBEDDED_TOKENIZER:
        return _embedded_tokenizer(cfg, cache_dir, corpus)
    source = source or cfg["name"]
    if source == TINY_LLAMA:
        raise ValueError(f"model {TINY_LLAMA!r} has no tokenizer of its own: set tokenizer: {EMBEDDED_TOKENIZER}")
    tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=_trust_remote_code(cfg, "tokenizer"))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {source!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ------------------------------------------------------------------------------------------------------- model


def _tiny_llama(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast, dtype: torch.dtype) -> PreTrainedModel:
    """A random-init LlamaForCausalLM sized by ``cfg.config``, seeded by ``cfg.init_seed`` without touching the
    caller's RNG stream."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **plain(cfg.get("config") or {}),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.get("init_seed", 0)))
        model = LlamaForCausalLM(config)
    model = model.to(dtype)
    model.config.dtype = dtype
    return model


def _pretrained(cfg: ModelConfig, dtype: torch.dtype, quantization=None) -> PreTrainedModel:
    """A causal LM from a hub id or local directory (safetensors weights only), quantized on load when given a
    ``BitsAndBytesConfig``."""
    extra = {} if quantization is None else {"quantization_config": quantization, "device_map": {"": 0}}
    return AutoModelForCausalLM.from_pretrained(
        str(cfg["name"]),
        dtype=dtype,
        trust_remote_code=_trust_remote_code(cfg, "model"),
        use_safetensors=True,
        **extra,
    )


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast, quantization=None) -> PreTrainedModel:
    """The causal LM named by ``cfg.name`` in ``cfg.dtype``: ``"tiny-llama"`` (random init from ``cfg.config``,
    vocab = ``len(tokenizer)``) or a hub id / local directory (``quantization``: a ``BitsAndBytesConfig``, placed on
    GPU 0). ``model.config.pad_token_id`` is always set."""
    dtype = resolve_dtype(cfg.get("dtype", "float32"))
    if cfg["name"] == TINY_LLAMA:
        if quantization is not None:
            raise ValueError("model.quantization loads a pretrained model; tiny-llama is built in full precision")
        model = _tiny_llama(cfg, tokenizer, dtype)
    else:
        model = _pretrained(cfg, dtype, quantization)
    n_embeddings = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embeddings:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but model {cfg['name']!r} only {n_embeddings} embeddings"
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.pad_token_id
    return model


def _safetensors_stats(directory: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of every ``*.safetensors`` file in ``directory``, sorted by name."""
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.glob("*.safetensors"))]


def model_fingerprint(cfg: ModelConfig, model: PreTrainedModel) -> str:
    """A short stable hash of the model's initial weights, to key caches (e.g. reference log-probs).

    tiny-llama: name, ``cfg.config``, init seed, vocab size and dtype. Local directory: its absolute path, dtype and
    the sizes and mtimes of its ``*.safetensors`` files. Hub id: name, dtype and the resolved commit hash.
    """
    name = str(cfg["name"])
    dtype = str(resolve_dtype(cfg.get("dtype", "float32")))
    if name == TINY_LLAMA:
        payload: list[Any] = [
            name,
            plain(cfg.get("config") or {}),
            int(cfg.get("init_seed", 0)),
            int(model.config.vocab_size),
            dtype,
        ]
    elif Path(name).is_dir():
        directory = Path(name).resolve()
        payload = ["local", str(directory), dtype, _safetensors_stats(directory)]
    else:
        payload = ["hub", name, dtype, getattr(model.config, "_commit_hash", None)]
    return digest(payload)[:16]
