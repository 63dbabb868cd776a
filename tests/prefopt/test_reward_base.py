"""The Reward interface: input/output validation, default token scores, FunctionReward, the registry decorator."""

import math

import pytest
import torch

from prefopt.rewards import REWARDS, FunctionReward, Reward, TokenScores, get_reward, register_reward
from prefopt.rewards.base import char_to_token, token_ends


class Fixed(Reward):
    name = "fixed"

    def __init__(self, values):
        self.values = values

    def score(self, prompts, completions):
        return self.values


def test_call_returns_float32_cpu():
    out = Fixed(torch.tensor([1, 2], dtype=torch.int64))(["a", "b"], ["x", "y"])
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.tolist() == [1.0, 2.0]
    assert Fixed([0.5, 1.5])(("a", "b"), ("x", "y")).tolist() == [0.5, 1.5]


def test_mismatched_lengths_name_both_counts():
    with pytest.raises(ValueError, match="got 1 prompts but 2 completions"):
        Fixed(torch.zeros(2))(["a"], ["x", "y"])
    with pytest.raises(TypeError, match="not a single string"):
        Fixed(torch.zeros(1))(["a"], "x")


def test_wrong_shape_raises():
    with pytest.raises(ValueError, match=r"'fixed' returned shape \(2, 1\), expected \(2,\)"):
        Fixed(torch.zeros(2, 1))(["a", "b"], ["x", "y"])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_score_names_reward_and_row(bad):
    with pytest.raises(ValueError, match=r"reward 'fixed' gave a non-finite score .* at row 2"):
        Fixed(torch.tensor([0.0, 1.0, bad, bad]))(["a"] * 4, ["x"] * 4)


def test_non_finite_from_function_reward():
    reward = FunctionReward(lambda p, c: [1.0, float("nan")], name="broken")
    with pytest.raises(ValueError, match="reward 'broken'.*row 1"):
        reward(["a", "b"], ["x", "y"])


def test_default_token_scores_put_the_score_on_the_last_token():
    reward = Fixed(torch.tensor([2.0, -1.0, 0.0]))
    ts = reward.token_scores(["a"] * 3, ["ab c", "", "x"], [["ab", " c"], [], ["x"]])
    assert isinstance(ts, TokenScores) and len(ts) == 3
    assert ts.values[0].tolist() == [0.0, 2.0] and ts.assigned[0].tolist() == [False, True]
    assert ts.values[1].shape == (0,) and ts.assigned[1].shape == (0,)
    assert ts.values[1].dtype == torch.float32 and ts.assigned[1].dtype == torch.bool
    assert ts.values[2].tolist() == [0.0] and ts.assigned[2].tolist() == [True]  # a raw 0 is assigned


def test_token_scores_validate_token_lists():
    reward = Fixed(torch.zeros(2))
    with pytest.raises(ValueError, match="2 completions but 1 token lists"):
        reward.token_scores(["a", "b"], ["x", "y"], [["x"]])
    with pytest.raises(TypeError, match="tokens\\[1\\]"):
        reward.token_scores(["a", "b"], ["x", "y"], [["x"], "y"])


def test_token_scores_dataclass_checks():
    with pytest.raises(ValueError, match="row 0"):
        TokenScores([torch.zeros(2)], [torch.zeros(3, dtype=torch.bool)])
    with pytest.raises(ValueError, match="float32"):
        TokenScores([torch.zeros(2, dtype=torch.float64)], [torch.zeros(2, dtype=torch.bool)])
    with pytest.raises(ValueError, match="row 0: non-finite"):
        TokenScores([torch.tensor([math.nan])], [torch.ones(1, dtype=torch.bool)])


def test_function_reward_wraps_lists_and_tensors():
    def my_len(prompts, completions):
        return [len(c) for c in completions]

    reward = FunctionReward(my_len)
    assert reward.name == "my_len" and reward.higher_is_better
    assert reward(["a", "b"], ["xyz", ""]).tolist() == [3.0, 0.0]
    column = FunctionReward(lambda p, c: torch.ones(len(c), 1), name="col", higher_is_better=False)
    assert column(["a", "b"], ["x", "y"]).tolist() == [1.0, 1.0] and not column.higher_is_better
    assert column.to("cpu") is column
    with pytest.raises(TypeError, match="callable"):
        FunctionReward(3)


def test_register_reward():
    @register_reward("_test_constant")
    class Constant(Reward):
        def score(self, prompts, completions):
            return torch.full((len(completions),), 7.0)

    try:
        assert REWARDS["_test_constant"] is Constant and Constant.name == "_test_constant"
        assert get_reward("_test_constant")(["a"], ["b"]).tolist() == [7.0]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("length")(Constant)
        with pytest.raises(TypeError, match="Reward subclass"):
            register_reward("_test_fn")(lambda p, c: p)
    finally:
        REWARDS.pop("_test_constant")


def test_get_reward_wrong_keyword_lists_arguments():
    with pytest.raises(TypeError, match=r"reward 'repetition'.*accepted arguments: \['n'\]"):
        get_reward("repetition", order=3)


def test_char_to_token_with_cumulative_piece_lengths():
    ends = token_ends(["ab", "", "cde", "f"])
    assert ends == [2, 2, 5, 6]
    assert [char_to_token(ends, c) for c in range(7)] == [0, 0, 2, 2, 2, 3, 3]  # empty pieces own no character
