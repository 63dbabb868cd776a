"""Simple reward functions, the registry and score_completions."""

import pytest
import torch

from prefopt.data.synthetic import gold_reward, make_preference_data
from prefopt.rewards import REWARDS, Reward, get_reward, score_completions, znormalize
from prefopt.rewards.simple import length_reward, lexicon_reward

PROMPTS = ["p1", "p2", "p3"]
COMPLETIONS = ["the kettle was great .", "awful, noisy and broken!", "it came"]


def test_length_reward():
    out = length_reward(PROMPTS, COMPLETIONS)
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert out.tolist() == [5.0, 4.0, 2.0]


def test_lexicon_reward_default_and_custom():
    assert lexicon_reward(PROMPTS, COMPLETIONS).tolist() == [1.0, -3.0, 0.0]
    custom = lexicon_reward(PROMPTS, COMPLETIONS, lexicon={"kettle": 0.5, "came": -2.0})
    assert custom.dtype == torch.float32 and custom.tolist() == [0.5, 0.0, -2.0]


def test_lexicon_reward_is_the_synthetic_gold_reward():
    rows = make_preference_data(20, 0, seed=5)[0]
    texts = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    assert lexicon_reward([""] * len(texts), texts).tolist() == [gold_reward(t) for t in texts]


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 prompts but 3 completions"):
        length_reward(PROMPTS[:2], COMPLETIONS)
    for name in ("length", "lexicon", "repetition"):
        with pytest.raises(ValueError, match="2 prompts but 3 completions"):
            get_reward(name)(PROMPTS[:2], COMPLETIONS)
    with pytest.raises(ValueError, match="3 prompts but 2 completions"):
        score_completions(["length"], PROMPTS, COMPLETIONS[:2])


def test_registry_and_unknown_name():
    expected = {"classifier", "conciseness", "length", "lexicon", "readability", "repetition", "sentiment"}
    assert expected <= set(REWARDS)
    assert all(isinstance(get_reward(name), Reward) for name in expected - {"classifier"})
    assert get_reward("length")(PROMPTS, COMPLETIONS).tolist() == length_reward(PROMPTS, COMPLETIONS).tolist()
    assert get_reward("lexicon")(PROMPTS, COMPLETIONS).tolist() == lexicon_reward(PROMPTS, COMPLETIONS).tolist()
    with pytest.raises(KeyError, match=r"unknown reward 'bleu'.*'conciseness'.*'length', 'lexicon'"):
        get_reward("bleu")
    with pytest.raises(KeyError, match="valid"):
        score_completions(["length", "bleu"], PROMPTS, COMPLETIONS)


def test_score_completions_raw_and_normalised():
    raw = score_completions(["lexicon", "length"], PROMPTS, COMPLETIONS, normalize=False)
    assert raw.shape == (3, 2) and raw.dtype == torch.float32
    assert raw[:, 0].tolist() == [1.0, -3.0, 0.0] and raw[:, 1].tolist() == [5.0, 4.0, 2.0]
    z = score_completions(["lexicon", "length"], PROMPTS, COMPLETIONS)
    expected = (raw - raw.mean(0)) / raw.std(0, correction=0)
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std(0, correction=0), torch.ones(2))


def test_constant_column_and_single_row_are_zeros_not_nan():
    z = score_completions(["length", "lexicon"], ["a", "b"], ["one two", "three four"])
    assert torch.equal(z[:, 0], torch.zeros(2)) and torch.isfinite(z).all()
    assert torch.equal(score_completions(["length"], ["a"], ["one two"]), torch.zeros(1, 1))
    assert torch.equal(znormalize(torch.full((4, 3), 7.0)), torch.zeros(4, 3))


def test_score_completions_batched_matches_the_functions():
    rows = make_preference_data(64, 0, seed=3)[0]
    prompts = [r["prompt"] for r in rows] * 2
    texts = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    raw = score_completions(["lexicon", "length"], prompts, texts, normalize=False)
    expected = torch.stack([lexicon_reward(prompts, texts), length_reward(prompts, texts)], dim=1)
    assert raw.shape == (128, 2) and torch.equal(raw, expected)
    torch.testing.assert_close(score_completions(["lexicon", "length"], prompts, texts), znormalize(expected))


def test_score_completions_accepts_configs_and_reward_objects():
    raw = score_completions(
        [{"name": "conciseness", "target": 3}, get_reward("length"), "lexicon"], PROMPTS, COMPLETIONS, normalize=False
    )
    assert raw.tolist() == [[-2.0, 5.0, 1.0], [-1.0, 4.0, -3.0], [0.0, 2.0, 0.0]]
    assert score_completions("length", PROMPTS, COMPLETIONS, normalize=False).shape == (3, 1)
    assert score_completions([], PROMPTS, COMPLETIONS).shape == (3, 0)


def test_score_completions_reuses_the_default_instance_of_a_name():
    from prefopt import rewards

    score_completions(["sentiment"], PROMPTS, COMPLETIONS)
    first = rewards._SHARED["sentiment"]
    score_completions(["sentiment", "length"], PROMPTS, COMPLETIONS)
    assert rewards._SHARED["sentiment"] is first
