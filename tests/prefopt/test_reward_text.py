"""The text rewards on hand-made strings: length, conciseness, lexicon, repetition, sentiment, readability."""

import random

import pytest
import readability
import torch
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from prefopt.data.synthetic import make_preference_data
from prefopt.rewards import get_reward
from prefopt.rewards.flesch import tokenize_for_readability
from prefopt.rewards.simple import lexicon_reward


def scores(name, completions, **kwargs):
    return get_reward(name, **kwargs)(["prompt"] * len(completions), completions).tolist()


def random_pieces(text: str, rng: random.Random) -> list[str]:
    """``text`` cut at random places into pieces (some empty), as a tokenizer's decoded tokens."""
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# ------------------------------------------------------------------------------------------------ length family
def test_length_and_conciseness():
    texts = ["a b  c", "", "one\ntwo three four five"]
    assert scores("length", texts) == [3.0, 0.0, 5.0]
    assert scores("conciseness", texts) == [-3.0, 0.0, -5.0]
    assert scores("conciseness", texts, target=4) == [0.0, 0.0, -1.0]
    assert scores("conciseness", texts, target=0) == [-3.0, 0.0, -5.0]
    assert get_reward("length").higher_is_better and get_reward("conciseness").higher_is_better
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="target"):
            get_reward("conciseness", target=bad)


# ------------------------------------------------------------------------------------------------------ lexicon
def test_lexicon_sequence_scores():
    assert scores("lexicon", ["the kettle was great .", "awful, noisy and broken!", "it came"]) == [1.0, -3.0, 0.0]
    assert scores("lexicon", ["kettle came"], lexicon={"kettle": 0.5, "came": -2.0}) == [-1.5]


def test_lexicon_token_positions():
    reward = get_reward("lexicon")
    text = "the kettle was great , not awful ."
    pieces = ["the", " ket", "tle", " was", " gre", "at", " ,", " not", " aw", "ful", " ."]
    ts = reward.token_scores(["p"], [text], [pieces])
    assert ts.values[0].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, -1, 0]
    assert ts.assigned[0].nonzero().flatten().tolist() == [5, 9]
    both = reward.token_scores(["p", "p", "p"], ["great good", "Great.", ""], [["great good"], ["Gre", "at."], []])
    assert both.values[0].tolist() == [2.0] and both.assigned[0].tolist() == [True]  # two words end on one token
    assert both.values[1].tolist() == [0.0, 1.0] and both.assigned[1].tolist() == [False, True]
    assert both.values[2].shape == (0,) and both.assigned[2].shape == (0,)


def test_lexicon_zero_valued_word_is_assigned():
    reward = get_reward("lexicon", lexicon={"was": 0.0, "nice": 2.0})
    ts = reward.token_scores(["p"], ["it was nice"], [["it", " was", " nice"]])
    assert ts.values[0].tolist() == [0.0, 0.0, 2.0] and ts.assigned[0].tolist() == [False, True, True]


def test_lexicon_token_values_sum_to_the_sequence_score():
    rng = random.Random(0)
    rows = make_preference_data(30, 0, seed=2)[0]
    texts = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    pieces = [random_pieces(t, rng) for t in texts]
    ts = get_reward("lexicon").token_scores([""] * len(texts), texts, pieces)
    sums = [v.sum().item() for v in ts.values]
    assert sums == lexicon_reward([""] * len(texts), texts).tolist()
    assert [len(v) for v in ts.values] == [len(p) for p in pieces]


# --------------------------------------------------------------------------------------------------- repetition
def test_repetition_distinct_2_by_hand():
    texts = ["the cat the cat", "a b c", "hello", "", "Go go GO!", "the cat, the cat. the dog"]
    # bigrams: (the cat)(cat the)(the cat) -> 2/3; 2/2; <2 words -> 1; 1; (go go)(go go) -> 1/2;
    # (the cat)(cat the)(the cat)(cat the)(the dog) -> 3/5
    torch.testing.assert_close(
        get_reward("repetition")(["p"] * 6, texts), torch.tensor([2 / 3, 1.0, 1.0, 1.0, 0.5, 0.6])
    )
    assert scores("repetition", ["a a b", "a"], n=1) == pytest.approx([2 / 3, 1.0])
    assert scores("repetition", ["a b a b"], n=3) == [1.0]
    with pytest.raises(ValueError, match="positive integer"):
        get_reward("repetition", n=0)


def test_repetition_token_scores_mark_repeated_ngrams():
    reward = get_reward("repetition")
    pieces = ["the", " cat", " the", " c", "at", " ."]
    ts = reward.token_scores(["p"], ["the cat the cat ."], [pieces])
    assert ts.values[0].tolist() == [0, 0, -1, -1, -1, 0]  # the 2nd "the cat" only
    assert ts.assigned[0].all() and ts.assigned[0].shape == (6,)
    pieces = [["the cat", " the cat"], ["a b", " c"], []]
    ts = reward.token_scores(["p", "p", "p"], ["the cat the cat", "a b c", ""], pieces)
    assert ts.values[0].tolist() == [0, -1] and ts.values[1].tolist() == [0, 0]
    assert ts.values[2].shape == (0,) and ts.assigned[2].shape == (0,)
    # a third occurrence is marked too, and the words of overlapping repeats
    ts = reward.token_scores(["p"], ["go go go go"], [["go", " go", " go", " go"]])
    assert ts.values[0].tolist() == [0, -1, -1, -1]


# ---------------------------------------------------------------------------------------------------- sentiment
def test_sentiment_sign_and_equality_with_vader():
    positive = "This is a wonderful, amazing product. I love it!"
    negative = "This is terrible and awful. I hate it, it broke on day one."
    texts = [positive, negative, "The box is on the table.", ""]
    reward = get_reward("sentiment")
    out = reward(["Write a review:", "Hated it", "x", "y"], texts)
    assert out[0] > 0.5 and out[1] < -0.5 and out[2] == 0.0 and out[3] == 0.0
    analyzer = SentimentIntensityAnalyzer()
    expected = torch.tensor([analyzer.polarity_scores(t)["compound"] for t in texts], dtype=torch.float32)
    assert torch.equal(out, expected)
    assert torch.equal(reward(["other"] * 4, texts), out)  # the prompt is ignored
    analyzer_before = reward.analyzer
    reward(["p"], ["ok"])
    assert reward.analyzer is analyzer_before and ((-1 <= out) & (out <= 1)).all()


# -------------------------------------------------------------------------------------------------- readability
def test_tokenize_for_readability():
    assert tokenize_for_readability("Hello, world! How are you?") == "Hello , world !\nHow are you ?"
    assert tokenize_for_readability("It's well-known...\n\nNew line") == "It's well-known ...\nNew line"
    assert tokenize_for_readability("  !!! ... ") == "" and tokenize_for_readability("") == ""


def flesch(text: str) -> float:
    return readability.getmeasures(tokenize_for_readability(text), lang="en")["readability grades"]["FleschReadingEase"]


def test_readability_equals_the_package_and_prefers_short_words():
    easy = "The cat sat on the mat. It was a big dog."
    hard = "Unquestionably, extraordinary administrative considerations necessitate comprehensive reorganisation."
    reward = get_reward("readability")
    out = reward(["p", "p"], [easy, hard])
    torch.testing.assert_close(out, torch.tensor([flesch(easy), flesch(hard)], dtype=torch.float32))
    assert out[0] > out[1] and reward.higher_is_better
    scaled = get_reward("readability", scale=0.01)(["p", "p"], [easy, hard])
    torch.testing.assert_close(scaled, out * 0.01)


def test_readability_without_words_is_a_constant():
    texts = ["", "   ", "!!! ...", "\n\n"]
    assert scores("readability", texts) == [0.0] * 4
    assert scores("readability", texts, empty_score=-50.0, scale=0.01) == [-50.0] * 4
    assert scores("readability", ["Hello"]) == pytest.approx([flesch("Hello")])
