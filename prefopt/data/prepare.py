"""Data config -> tokenized train/eval pairs: the embedded synthetic task, a local file, or a hub dataset, through
``prefopt.data`` (format conversion, validation with row/field errors, tokenization and truncation rules).

With a ``cache_dir``, the tokenized pairs are cached as ``cache_dir/data/<key>.json``, keyed by everything that
decides them: the data config, the tokenizer (its serialised model, special tokens, chat template and how it encodes
a probe), the code of the data pipeline and, for local files, each file's path, size and modification time. A hit
skips loading and tokenizing. The file is written atomically (temporary file + rename) and carries a checksum of its
body: an unreadable, truncated or altered file is ignored with a warning and rebuilt, never used. Hub data sets are
not cached (the same name can change upstream; ``datasets`` caches the download itself).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt.cache import cached, digest
from prefopt.config import ConfigError
from prefopt.data import synthetic
from prefopt.data.loading import load_hub_pairs, load_pairs
from prefopt.data.tokenize import tokenize_pairs
from prefopt.data.unpaired import check_labels, example_kind, tokenize_unpaired, unpair
from prefopt.settings import DataSettings

__all__ = ["PreparedData", "prepare_data", "load_standard_rows", "data_cache_key", "tokenizer_fingerprint"]

log = logging.getLogger("prefopt.data")


@dataclass
class PreparedData:
    # tokenized pairs: prompt_ids, chosen_ids, rejected_ids (+ prompt/chosen/rejected strings), or unpaired rows:
    # prompt_ids, completion_ids, label (+ prompt/completion strings)
    train: list[dict]
    eval: list[dict]
    fingerprint: str  # hash of the tokenized ids: keys the reference and regularisation caches
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``"pair"`` or ``"unpaired"`` (single completions labelled desirable or not)."""
        return example_kind(self.train[0]) if self.train else "pair"


def _ids(example: dict) -> list[Any]:
    """What identifies a tokenized example: its token ids (and an unpaired row's label)."""
    if example_kind(example) == "unpaired":
        return [example["prompt_ids"], example["completion_ids"], bool(example["label"])]
    return [example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]]


def _split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not 0 < fraction < 1:
        raise ConfigError(f"data.eval_fraction must lie in (0, 1), got {fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def load_standard_rows(cfg: DataSettings, tokenizer) -> tuple[list[dict], list[dict], dict]:
    """(train rows, eval rows, stats) as standard ``prompt``/``chosen``/``rejected`` strings."""
    source = cfg.source
    if source == "synthetic":
        train, evaluation = synthetic.make_preference_data(cfg.n_train, cfg.n_eval, seed=cfg.seed)
        return train, evaluation, {"source": "synthetic", "rows": len(train) + len(evaluation)}
    if source == "local":
        if not cfg.path:
            raise ConfigError("data=local needs data.path=FILE (jsonl, json, parquet or csv)")
        train, stats = load_pairs(cfg.path, tokenizer=tokenizer, on_bad_row=cfg.on_bad_row)
        if cfg.eval_path:
            evaluation, eval_stats = load_pairs(cfg.eval_path, tokenizer=tokenizer, on_bad_row=cfg.on_bad_row)
            stats = {"train": stats, "eval": eval_stats}
        else:
            train, evaluation = _split(train, cfg.eval_fraction, cfg.seed)
        return train, evaluation, stats
    if source == "hub":
        train = load_hub_pairs(cfg.name, cfg.train_split, tokenizer=tokenizer, on_bad_row=cfg.on_bad_row)
        evaluation = load_hub_pairs(cfg.name, cfg.eval_split, tokenizer=tokenizer, on_bad_row=cfg.on_bad_row)
        return train[0], evaluation[0], {"train": train[1], "eval": evaluation[1]}
    raise ConfigError(f"data.source must be synthetic, local or hub, got {source!r}")


def _limit(rows: list[dict], limit: int | None) -> list[dict]:
    return rows[:limit] if limit else rows


def prepare_data(cfg: DataSettings, tokenizer, cache_dir: str | Path | None = None) -> PreparedData:
    """Load, convert, validate and tokenize; rows left with an empty completion are dropped and counted.

    With ``cache_dir``, the result is read from / written to ``cache_dir/data/<key>.json`` (see the module
    docstring); without it nothing is cached."""
    key = data_cache_key(cfg, tokenizer) if cache_dir is not None else None
    if key is None:
        return _prepare(cfg, tokenizer)
    path = Path(cache_dir).expanduser() / "data" / f"{key}.json"
    return cached(
        path,
        lambda: _prepare(cfg, tokenizer),
        save=lambda prepared, tmp: _write_cache(tmp, key, prepared),
        load=lambda file: _read_cache(file, key),
        what="data",
        logger=log,
    )


def _prepare(cfg: DataSettings, tokenizer) -> PreparedData:
    train_rows, eval_rows, load_stats = load_standard_rows(cfg, tokenizer)
    train_rows, eval_rows = _limit(train_rows, cfg.max_train_rows), _limit(eval_rows, cfg.max_eval_rows)
    lengths = {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length}
    train, train_stats = _tokenize(train_rows, tokenizer, cfg.unpair, lengths)
    evaluation, eval_stats = _tokenize(eval_rows, tokenizer, cfg.unpair, lengths)
    if not train:
        raise ConfigError("no training pairs left after tokenization (check data.max_length / max_prompt_length)")
    kinds = {example_kind(e) for e in train + evaluation}
    if len(kinds) > 1:
        raise ConfigError(
            "data: the train and eval data mix pairs and unpaired rows; set data.unpair=true to split the pairs"
        )
    if kinds == {"unpaired"}:
        check_labels(train, "data (train)")
    hasher = hashlib.sha256()
    for example in train + evaluation:
        hasher.update(json.dumps(_ids(example)).encode())
    stats = {"load": load_stats, "tokenize_train": train_stats, "tokenize_eval": eval_stats}
    what = "unpaired rows" if kinds == {"unpaired"} else "pairs"
    log.info("data: %d train %s, %d eval %s", len(train), what, len(evaluation), what)
    return PreparedData(train, evaluation, hasher.hexdigest()[:16], stats)


def _tokenize(rows: list[dict], tokenizer, unpaired: bool, lengths: dict[str, int]) -> tuple[list[dict], dict]:
    """Tokenized pairs, or unpaired rows (rows that are unpaired already, or pairs split by ``data.unpair``)."""
    if rows and "completion" in rows[0]:
        return tokenize_unpaired(rows, tokenizer, **lengths)
    pairs, stats = tokenize_pairs(rows, tokenizer, **lengths)
    return (unpair(pairs), {**stats, "unpaired_rows": 2 * len(pairs)}) if unpaired else (pairs, stats)


# ------------------------------------------------------------------------------------------------------ the cache
CACHE_FORMAT = "prefopt-data-v1"  # bump when the cached layout changes
_PIPELINE_FILES = ("prepare.py", "synthetic.py", "formats.py", "loading.py", "tokenize.py")
_pipeline_sha: str | None = None


def _pipeline_fingerprint() -> str:
    """Hash of the source of the modules that load and tokenize data: editing them invalidates cached pairs."""
    global _pipeline_sha
    if _pipeline_sha is None:
        root = Path(__file__).resolve().parent
        hasher = hashlib.sha256()
        for name in _PIPELINE_FILES:
            file = root / name
            hasher.update(name.encode() + b"\0" + (file.read_bytes() if file.exists() else b"") + b"\0")
        _pipeline_sha = hasher.hexdigest()
    return _pipeline_sha


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides how ``tokenizer`` encodes: its serialised fast tokenizer (vocabulary, merges,
    normaliser, pre-tokeniser, post-processor, added tokens; padding/truncation settings left out, prefopt encodes
    without them) or, for a slow tokenizer, its vocabulary; the special tokens, the chat template, and the ids it gives
    a probe with and without special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        model = digest(state)
    else:
        model = digest(sorted(tokenizer.get_vocab().items()))
    probe = "Hello world: a probe, 123."
    payload = {
        "class": type(tokenizer).__name__,
        "model": model,
        "special_tokens": {name: str(value) for name, value in tokenizer.special_tokens_map.items()},
        "special_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "chat_template": getattr(tokenizer, "chat_template", None),
        "probe": [tokenizer(probe)["input_ids"], tokenizer(probe, add_special_tokens=False)["input_ids"]],
    }
    return digest(payload)[:16]


def _file_stat(path: Any) -> list[Any] | None:
    """(resolved path, size, mtime in ns) of a local data file, or None when it does not exist (then loading raises
    the usual error and nothing is cached)."""
    if not path:
        return None
    file = Path(str(path)).expanduser().resolve()
    if not file.is_file():
        return None
    stat = file.stat()
    return [str(file), stat.st_size, stat.st_mtime_ns]


def data_cache_key(cfg: DataSettings, tokenizer) -> str | None:
    """The cache key of ``prepare_data(cfg, tokenizer)``, or None when the source is not cached (hub data sets)."""
    source = cfg.source
    if source not in ("synthetic", "local"):
        return None
    files = [_file_stat(cfg.path), _file_stat(cfg.eval_path)] if source == "local" else []
    payload = [CACHE_FORMAT, cfg.key(), tokenizer_fingerprint(tokenizer), _pipeline_fingerprint(), files]
    return digest(payload)[:24]


def _read_cache(path: Path, key: str) -> PreparedData:
    """The cached data at ``path``; raises ValueError when the file fails any check (then it is rebuilt)."""
    header_line, _, body = path.read_bytes().partition(b"\n")
    header = json.loads(header_line)
    if header.get("format") != CACHE_FORMAT or header.get("key") != key:
        raise ValueError("its header does not match")
    if hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise ValueError("checksum mismatch")
    payload = json.loads(body)
    train, evaluation = payload["train"], payload["eval"]
    for example in train + evaluation:
        if not all(isinstance(ids, list) for ids in _ids(example)[:-1]):
            raise ValueError("an example has no token ids")
    prepared = PreparedData(train, evaluation, str(payload["fingerprint"]), payload["stats"])
    log.info("data: %d train pairs, %d eval pairs (cached: %s)", len(train), len(evaluation), path)
    _replay_warnings(prepared.stats)
    return prepared


def _write_cache(path: Path, key: str, prepared: PreparedData) -> None:
    """The header line (format, key, checksum of the body), then the body: JSON of the tokenized pairs."""
    payload = {"train": prepared.train, "eval": prepared.eval, "fingerprint": prepared.fingerprint}
    try:
        body = json.dumps({**payload, "stats": prepared.stats}, allow_nan=True).encode("utf-8")
    except (TypeError, ValueError) as error:  # a field of the data that JSON cannot hold
        raise OSError(f"a field cannot be stored as JSON ({error})") from None
    header = json.dumps({"format": CACHE_FORMAT, "key": key, "sha256": hashlib.sha256(body).hexdigest()})
    path.write_bytes(header.encode("utf-8") + b"\n" + body)


def _counts(stats: Any, name: str) -> int:
    """The sum of every ``name`` count in a nested stats dict."""
    if isinstance(stats, Mapping):
        return sum(_counts(v, name) if k != name else int(v or 0) for k, v in stats.items())
    return 0


def _replay_warnings(stats: dict[str, Any]) -> None:
    """A cache hit skips loading and tokenizing, so repeat (in one line) what they warned about."""
    skipped, dropped, truncated = (_counts(stats, n) for n in ("skipped", "dropped_empty_completion", "truncated"))
    if skipped or dropped or truncated:
        log.warning(
            "cached data: skipped %d rows with bad data, dropped %d pairs with an empty completion, truncated %d",
            skipped,
            dropped,
            truncated,
        )
