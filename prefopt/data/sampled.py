"""``data=sampled``: preference pairs sampled from the starting policy and labelled by a gold reward.

The DPO paper's controlled-sentiment setup: for each prompt two completions are sampled from the SFT model and the
one the gold reward (``data.reward``: VADER sentiment by default, a reward nobody here wrote) scores higher becomes
``chosen``; ties are dropped and counted. Train prompts ask for reviews of most products, eval prompts of held-out
ones (``data.eval_items``). The pairs are written as JSONL files under ``cache_dir/sampled/<key>/`` (keyed by the
starting weights, the tokenizer and these settings) and then read like ``data=local`` files, through the same
validation and tokenization.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path

import torch

from prefopt.cache import atomic_write, cache_key, entry_lock
from prefopt.config import ConfigError
from prefopt.data import synthetic
from prefopt.generation import sample_completions
from prefopt.rewards import build_reward
from prefopt.settings import DataSettings

__all__ = ["materialize"]

log = logging.getLogger("prefopt.data")


def _prompts(items: list[str], count: int, rng: random.Random) -> list[str]:
    return [synthetic.PROMPT_TEMPLATE.format(item=rng.choice(items)) for _ in range(count)]


@torch.no_grad()
def _pairs(
    policy, tokenizer, prompts: list[str], reward, cfg: DataSettings, seed: str, device
) -> tuple[list[dict], int]:
    """Two samples per prompt, labelled by ``reward``; returns (rows, ties dropped)."""
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"][-cfg.max_prompt_length :] for p in prompts]
    doubled = [ids for ids in prompt_ids for _ in range(2)]
    completions = sample_completions(
        policy,
        tokenizer,
        doubled,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        batch_size=cfg.generation_batch_size,
        seed=seed,
        device=device,
    )
    texts = [t.strip() for t in tokenizer.batch_decode(completions, skip_special_tokens=True)]
    scores = reward([p for p in prompts for _ in range(2)], texts)
    rows, ties = [], 0
    for i, prompt in enumerate(prompts):
        (a, ra), (b, rb) = (texts[2 * i], float(scores[2 * i])), (texts[2 * i + 1], float(scores[2 * i + 1]))
        if ra == rb or not a or not b:
            ties += 1
            continue
        if ra < rb:
            a, b, ra, rb = b, a, rb, ra
        rows.append({"prompt": prompt, "chosen": a, "rejected": b, "chosen_reward": ra, "rejected_reward": rb})
    return rows, ties


def materialize(cfg: DataSettings, policy, tokenizer, *, fingerprint: str, cache_dir: Path, device) -> DataSettings:
    """Sample and label the pairs (or find them cached) and return the equivalent ``data=local`` settings."""
    key = cache_key("sampled", fingerprint, len(tokenizer), cfg.key())
    folder = Path(cache_dir).expanduser() / "sampled" / key
    train_path, eval_path = folder / "train.jsonl", folder / "eval.jsonl"
    with entry_lock(folder, "sampled pairs"):
        if not (train_path.exists() and eval_path.exists()):
            _sample(cfg, policy, tokenizer, folder, train_path, eval_path, device)
    return dataclasses.replace(cfg, source="local", path=str(train_path), eval_path=str(eval_path), on_bad_row="error")


def _sample(cfg: DataSettings, policy, tokenizer, folder: Path, train_path: Path, eval_path: Path, device) -> None:
    """Sample and label the train and eval pairs into ``folder`` (under the entry lock)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = list(synthetic.ITEMS)
    held_out = cfg.eval_items
    if not 0 < held_out < len(items):
        raise ConfigError(f"data.eval_items must lie in [1, {len(items) - 1}], got {held_out}")
    rng = random.Random(cfg.seed)
    rng.shuffle(items)
    train_items, eval_items = items[held_out:], items[:held_out]
    reward = build_reward(cfg.reward).to(device)
    stats = {}
    for split, split_items, count, path in (
        ("train", train_items, cfg.n_train, train_path),
        ("eval", eval_items, cfg.n_eval, eval_path),
    ):
        prompts = _prompts(split_items, count, rng)
        rows, ties = _pairs(policy, tokenizer, prompts, reward, cfg, f"{cfg.seed}/sampled/{split}", device)
        atomic_write(path, lambda tmp, rows=rows: synthetic.write_jsonl(rows, tmp))
        stats[split] = {"prompts": count, "pairs": len(rows), "ties_dropped": ties}
        log.info("sampled %s pairs: %d of %d prompts (%d ties dropped)", split, len(rows), count, ties)
    (folder / "stats.json").write_text(json.dumps({**stats, "eval_items": eval_items}, indent=2))
