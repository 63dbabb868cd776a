"""The embedded synthetic preference task: determinism, gold reward, chosen beats rejected, spread."""

import json

import pytest

from prefopt.data import synthetic
from prefopt.data.synthetic import LEXICON, corpus, gold_reward, make_preference_data, write_jsonl


@pytest.fixture(scope="module")
def data() -> tuple[list[dict], list[dict]]:
    return make_preference_data(300, 50, seed=0)


def test_word_lists_are_disjoint_and_sized():
    pos, neg, neu, items = map(set, (synthetic.POSITIVE, synthetic.NEGATIVE, synthetic.NEUTRAL, synthetic.ITEMS))
    assert len(pos) >= 35 and len(neg) >= 35 and len(neu) >= 100 and len(items) >= 25
    assert not pos & neg and not (pos | neg) & neu and not (pos | neg | neu) & items
    assert LEXICON == {**{w: 1.0 for w in pos}, **{w: -1.0 for w in neg}}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the kettle was great .", 1.0),
        ("Great, EXCELLENT! but broken.", 1.0),
        ("awful noisy broken lid .", -3.0),
        ("it arrived on monday .", 0.0),
        ("", 0.0),
        ("great great great", 3.0),
    ],
)
def test_gold_reward_hand_examples(text, expected):
    assert gold_reward(text) == expected
    assert isinstance(gold_reward(text), float)


def test_deterministic_for_a_seed(data):
    assert make_preference_data(300, 50, seed=0) == data
    assert make_preference_data(300, 50, seed=1)[0] != data[0]


def test_rows_are_well_formed(data):
    for row in data[0] + data[1]:
        assert set(row) == {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}
        assert row["prompt"].startswith("Write a review of the ") and row["prompt"].endswith(":")
        assert row["prompt"][len("Write a review of the ") : -1] in synthetic.ITEMS
        for key in ("chosen", "rejected"):
            text = row[key]
            assert text.endswith(" .") and text == text.strip() and "  " not in text and text == text.lower()
            assert 6 <= len(text.split()) - 1 <= 14
            assert row[f"{key}_reward"] == gold_reward(text)


def test_chosen_strictly_better_and_rewards_spread(data):
    rows = data[0] + data[1]
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    rewards = [r[k] for r in rows for k in ("chosen_reward", "rejected_reward")]
    assert min(rewards) <= -3 and max(rewards) >= 3
    assert len(set(rewards)) >= 7


def test_eval_differs_from_train(data):
    train, evaluation = data
    train_pairs = {(r["prompt"], r["chosen"]) for r in train}
    assert not any((r["prompt"], r["chosen"]) in train_pairs for r in evaluation)
    assert make_preference_data(10, 10, seed=3)[1] == make_preference_data(10, 0, seed=4)[0]


def test_word_bounds_are_validated():
    with pytest.raises(ValueError, match="min_words"):
        make_preference_data(1, 1, min_words=5, max_words=4)
    short, _ = make_preference_data(20, 0, min_words=2, max_words=2)
    assert all(len(r["chosen"].split()) == 3 for r in short)


def test_corpus_and_write_jsonl(data, tmp_path):
    rows = data[0][:4]
    texts = corpus(rows)
    assert texts[:3] == [rows[0]["prompt"], rows[0]["chosen"], rows[0]["rejected"]] and len(texts) == 12
    path = write_jsonl(rows, tmp_path / "sub" / "train.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
