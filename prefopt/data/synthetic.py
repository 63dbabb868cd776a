"""An embedded synthetic preference task with a known gold reward.

Each example asks for a review of a product; a completion is a sentence of plain lowercase words (neutral filler
mixed with some positive and negative words) ending with " .". The gold reward of a text is the number of positive
words minus the number of negative words, so a small model trained by DPO on ``chosen`` vs ``rejected`` visibly
learns to prefer positive words, and its samples can be scored exactly with :func:`gold_reward`.

    train, eval_ = make_preference_data(n_train=2000, n_eval=200, seed=0)
    train[0]  # {"prompt": "Write a review of the kettle:", "chosen": "...", "rejected": "...", ...}
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

POSITIVE: tuple[str, ...] = (
    "great", "excellent", "lovely", "reliable", "fantastic", "wonderful", "superb", "brilliant", "sturdy", "perfect",
    "amazing", "awesome", "delightful", "elegant", "solid", "smooth", "quiet", "fast", "comfortable", "beautiful",
    "impressive", "outstanding", "pleasant", "handy", "durable", "charming", "flawless", "terrific", "nice", "good",
    "helpful", "convenient", "gorgeous", "clever", "recommended", "happy", "satisfying", "robust", "crisp", "bright",
)  # fmt: skip

NEGATIVE: tuple[str, ...] = (
    "awful", "broken", "noisy", "terrible", "horrible", "bad", "poor", "flimsy", "faulty", "useless",
    "disappointing", "cheap", "ugly", "slow", "defective", "annoying", "unreliable", "fragile", "clunky", "dreadful",
    "mediocre", "overpriced", "leaky", "buggy", "sloppy", "uncomfortable", "dull", "rough", "dirty", "scratched",
    "worthless", "frustrating", "unusable", "shoddy", "unpleasant", "awkward", "weak", "dead", "rattly", "wobbly",
)  # fmt: skip

NEUTRAL: tuple[str, ...] = (
    "the", "a", "an", "it", "this", "that", "was", "is", "and", "but", "so", "very", "quite", "really", "rather",
    "my", "our", "its", "with", "for", "of", "on", "in", "at", "to", "from", "after", "before", "during", "about",
    "battery", "screen", "delivery", "colour", "box", "price", "size", "weight", "handle", "button", "cable",
    "charger", "lid", "strap", "manual", "packaging", "finish", "sound", "display", "material", "design", "shape",
    "plug", "switch", "setting", "mode", "fabric", "surface", "edge", "corner", "week", "month", "day", "year",
    "morning", "evening", "kitchen", "office", "home", "car", "garden", "desk", "bag", "shelf", "table", "drawer",
    "i", "we", "they", "he", "she", "you", "bought", "used", "tried", "opened", "returned", "kept", "found",
    "noticed", "felt", "looked", "seemed", "arrived", "came", "worked", "ran", "held", "gave", "took", "made",
    "first", "second", "every", "each", "some", "most", "all", "two", "three", "few", "more", "less", "also",
    "then", "now", "still", "again", "once", "twice", "overall", "honestly", "basically", "mostly", "usually",
)  # fmt: skip

ITEMS: tuple[str, ...] = (
    "kettle", "toaster", "blender", "headphones", "speaker", "keyboard", "mouse", "monitor", "laptop", "tablet",
    "phone", "camera", "lamp", "backpack", "umbrella", "jacket", "sneakers", "watch", "printer", "router",
    "vacuum", "fan", "heater", "mug", "chair", "mattress", "pillow", "bicycle", "drill", "microwave",
)  # fmt: skip

LEXICON: dict[str, float] = {**{w: 1.0 for w in POSITIVE}, **{w: -1.0 for w in NEGATIVE}}

PROMPT_TEMPLATE = "Write a review of the {item}:"
_OPENERS: tuple[str, ...] = ("the", "this", "it", "my", "i", "we", "overall", "honestly")
_MAX_SENTIMENT_WORDS = 6
_WORD_RE = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """Lowercase words of ``text``, split on whitespace and punctuation."""
    return _WORD_RE.findall(text.lower())


def gold_reward(text: str) -> float:
    """The gold reward: the sum of :data:`LEXICON` values of the words of ``text`` (integer-valued)."""
    return float(sum(LEXICON.get(w, 0.0) for w in words(text)))


def _completion(rng: random.Random, min_words: int, max_words: int) -> str:
    """One review sentence: random length, a random sentiment bias, neutral filler, ending with " ."."""
    n_words = rng.randint(min_words, max_words)
    bias = rng.uniform(-1.0, 1.0)  # per-completion sentiment: P(positive word) = (1 + bias) / 2
    n_sentiment = rng.randint(0, min(_MAX_SENTIMENT_WORDS, n_words - 1))
    sentiment = [rng.choice(POSITIVE) if rng.random() < (1.0 + bias) / 2.0 else rng.choice(NEGATIVE)
                 for _ in range(n_sentiment)]  # fmt: skip
    body = sentiment + [rng.choice(NEUTRAL) for _ in range(n_words - 1 - n_sentiment)]
    rng.shuffle(body)
    return " ".join([rng.choice(_OPENERS), *body, "."])


def _row(rng: random.Random, min_words: int, max_words: int) -> dict:
    """One preference row: a prompt and two completions with different gold rewards, the better one chosen."""
    prompt = PROMPT_TEMPLATE.format(item=rng.choice(ITEMS))
    while True:
        a, b = _completion(rng, min_words, max_words), _completion(rng, min_words, max_words)
        ra, rb = gold_reward(a), gold_reward(b)
        if ra != rb:
            break
    if ra < rb:
        a, b, ra, rb = b, a, rb, ra
    return {"prompt": prompt, "chosen": a, "rejected": b, "chosen_reward": ra, "rejected_reward": rb}


def _rows(n: int, seed: int, min_words: int, max_words: int) -> list[dict]:
    """``n`` rows drawn from the RNG stream ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [_row(rng, min_words, max_words) for _ in range(n)]


def make_preference_data(
    n_train: int, n_eval: int, seed: int = 0, min_words: int = 6, max_words: int = 14
) -> tuple[list[dict], list[dict]]:
    """Train and eval preference rows, deterministic for ``seed``.

    Each row is ``{"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}`` with
    ``chosen_reward > rejected_reward`` (gold rewards). ``min_words``/``max_words`` bound the number of words of a
    completion, not counting the final ".". Train uses the RNG stream ``seed``, eval the stream ``seed + 1``.
    """
    if not 2 <= min_words <= max_words:
        raise ValueError(f"need 2 <= min_words <= max_words, got min_words={min_words}, max_words={max_words}")
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train}, {n_eval}")
    return _rows(n_train, seed, min_words, max_words), _rows(n_eval, seed + 1, min_words, max_words)


def corpus(rows: Iterable[dict]) -> list[str]:
    """Every prompt, chosen and rejected text of ``rows`` (e.g. to train a tokenizer)."""
    return [row[key] for row in rows for key in ("prompt", "chosen", "rejected")]


def default_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """The corpus of a default-sized synthetic data set (the fallback for training the embedded tokenizer)."""
    train, eval_ = make_preference_data(n, n // 10, seed=seed)
    return corpus(train + eval_)


def write_jsonl(rows: Sequence[dict], path: str | Path) -> Path:
    """Write ``rows`` as JSON lines to ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
