"""ALaRM hierarchical reward and consistency selection: numbers from the authors' released code, modes, the gate
ordering property (hypothesis), and a constructed selection case."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import losses
from losses import alarm_reward, disagreement_rates, select_aspects

QA = dict(holistic_mean=-4.896130742253484, holistic_std=3.0595760500526468, threshold=0.6, holistic_weight=5.0)
MT = dict(holistic_mean=-2.34417221913525, holistic_std=2.946283030347152, threshold=0.5, holistic_weight=3.0)


def _qa_factuality(holistic: float, **kw):
    """One QA response of 9 tokens with three sentences ending at tokens 2, 5, 8, judged factual/non/factual."""
    values = torch.zeros(1, 9, dtype=torch.float64)
    assigned = torch.zeros(1, 9, dtype=torch.bool)
    for position, value in [(2, 0.5), (5, -0.5), (8, 0.5)]:
        values[0, position], assigned[0, position] = value, True
    return alarm_reward(
        torch.tensor([holistic], dtype=torch.float64),
        {"factuality": values},
        {"factuality": assigned},
        torch.tensor([9]),
        aspect_weights={"factuality": 1.0},
        **{**QA, **kw},
    )


def test_sigmoid_values():
    for x, expected in [(0.3, 0.574443), (-0.3, 0.425557), (0.5, 0.622459), (-0.5, 0.377541), (0, 0.5), (-1, 0.268941)]:
        assert torch.sigmoid(torch.tensor(float(x))).item() == pytest.approx(expected, abs=1e-6)


def test_qa_level_two():
    out = _qa_factuality(-2.0)
    assert out.holistic_z.item() == pytest.approx(0.946579, abs=1e-6)
    assert bool(out.passed_gate.item())
    tokens = out.token_rewards[0]
    assert tokens[2].item() == pytest.approx(0.622459, abs=1e-6)
    assert tokens[5].item() == pytest.approx(0.377541, abs=1e-6)
    assert tokens[8].item() == pytest.approx(0.622459 + 4.732895, abs=1e-6)
    assert int((tokens != 0).sum()) == 3  # unassigned positions stay exactly 0
    assert out.sequence_rewards.item() == pytest.approx(6.355355, abs=1e-6)


def test_qa_level_one_and_too_short():
    out = _qa_factuality(-3.5)
    assert out.holistic_z.item() == pytest.approx(0.456315, abs=1e-6)
    assert not bool(out.passed_gate.item())
    assert out.token_rewards[0, -1].item() == pytest.approx(2.281575, abs=1e-6)
    assert out.sequence_rewards.item() == pytest.approx(2.281575, abs=1e-6)
    short = _qa_factuality(-2.0, too_short=torch.tensor([True]))
    assert short.sequence_rewards.item() == -50.0 and short.token_rewards[0, -1].item() == -50.0
    mt_short = _mt(0.0, too_short=torch.tensor([True]))
    assert mt_short.sequence_rewards.item() == -30.0


def _mt(holistic: float, mode: str = "hierarchical", **kw):
    """10 tokens, grammar assigned on every token: 0 (correct) except −1 on the two tokens of an error span."""
    values = torch.zeros(1, 10, dtype=torch.float64)
    values[0, 3:5] = -1.0
    return alarm_reward(
        torch.tensor([holistic], dtype=torch.float64),
        {"grammar": values},
        {"grammar": torch.ones(1, 10, dtype=bool)},
        torch.tensor([10]),
        aspect_weights={"grammar": 1.0},
        mode=mode,
        **{**MT, **kw},
    )


def test_mt_grammar():
    out = _mt(0.0)
    assert out.holistic_z.item() == pytest.approx(0.795637, abs=1e-6)
    assert out.sequence_rewards.item() == pytest.approx(4.537883 + 2.386911, abs=1e-6)
    assert out.sequence_rewards.item() == pytest.approx(6.924794, abs=1e-6)
    low = _mt(-1.5)
    assert low.holistic_z.item() == pytest.approx(0.286521, abs=1e-6)
    assert low.sequence_rewards.item() == pytest.approx(0.859563, abs=1e-6)
    assert out.metrics["alarm/aspect/grammar"].item() == pytest.approx(-0.2)  # error rate, sign as raw values


def test_modes():
    assert _mt(-1.5, "holistic_only").sequence_rewards.item() == pytest.approx(0.859563, abs=1e-6)
    assert _mt(0.0, "holistic_only").sequence_rewards.item() == pytest.approx(2.386911, abs=1e-6)
    assert _mt(-1.5, "weighted_sum").sequence_rewards.item() == pytest.approx(4.537883 + 0.859563, abs=1e-6)
    assert _mt(-1.5, "aspect_only").sequence_rewards.item() == pytest.approx(4.537883, abs=1e-6)
    assert _mt(-1.5, sigmoid_shaping=False, mode="weighted_sum").sequence_rewards.item() == pytest.approx(
        -2 + 0.859563, abs=1e-6
    )
    with pytest.raises(losses.HyperParameterError, match="mode must be one of"):
        _mt(0.0, "hierarchy")


def test_lengths_mask_and_last_token_per_row():
    values = torch.full((2, 6), 0.5, dtype=torch.float64)
    out = alarm_reward(
        torch.tensor([-2.0, -2.0]),
        {"f": values},
        {"f": torch.ones(2, 6, dtype=bool)},
        torch.tensor([3, 6]),
        aspect_weights={"f": 1.0},
        **QA,
    )
    assert out.token_rewards[0, 3:].abs().sum().item() == 0.0  # past the response: nothing
    assert out.token_rewards[0, 2].item() == pytest.approx(0.622459 + 4.732895, abs=1e-6)
    assert out.token_rewards[1, 5].item() == pytest.approx(0.622459 + 4.732895, abs=1e-6)
    with pytest.raises(losses.LossError, match="response_lengths"):
        alarm_reward(
            torch.tensor([0.0]),
            {"f": values[:1]},
            {"f": torch.ones(1, 6, dtype=bool)},
            torch.tensor([0]),
            aspect_weights={"f": 1.0},
            **QA,
        )


@settings(max_examples=200, deadline=None)
@given(
    z=st.floats(-3, 3),
    tokens=st.integers(1, 8),
    data=st.data(),
    mode=st.sampled_from(["hierarchical", "weighted_sum"]),
)
def test_gate_never_ranks_a_passing_response_below(z, tokens, data, mode):
    """With sigmoid shaping and non-negative weights the aspect layer only adds: at equal holistic score a response
    that passed the gate never gets less than the holistic-only return, and under the hierarchy every passing
    response out-ranks every failing one."""
    raw = torch.tensor(data.draw(st.lists(st.floats(-5, 5), min_size=tokens, max_size=tokens)), dtype=torch.float64)
    assigned = torch.tensor(data.draw(st.lists(st.booleans(), min_size=tokens, max_size=tokens)))
    weight = data.draw(st.floats(0, 3))
    holistic = torch.tensor([z * QA["holistic_std"] + QA["holistic_mean"]], dtype=torch.float64)
    kwargs = dict(aspect_weights={"a": weight}, mode=mode, **QA)
    full = alarm_reward(holistic, {"a": raw[None]}, {"a": assigned[None]}, torch.tensor([tokens]), **kwargs)
    base = alarm_reward(
        holistic, {"a": raw[None]}, {"a": assigned[None]}, torch.tensor([tokens]), **{**kwargs, "mode": "holistic_only"}
    )
    assert full.sequence_rewards.item() >= base.sequence_rewards.item() - 1e-12
    if mode == "hierarchical":
        fail_z = data.draw(st.floats(-3, QA["threshold"], exclude_max=True))
        failing = alarm_reward(
            torch.tensor([fail_z * QA["holistic_std"] + QA["holistic_mean"]]),
            {"a": raw[None]},
            {"a": assigned[None]},
            torch.tensor([tokens]),
            **kwargs,
        )
        if bool(full.passed_gate.item()):
            assert full.sequence_rewards.item() > failing.sequence_rewards.item()


def test_consistency_selection_constructed_case():
    """Aspect 'agrees' moves with the holistic reward on 9 of 10 prompts, 'disagrees' against it on 8 of 10;
    'errors' is an error count (lower is better) that agrees once flipped."""
    holistic_a = torch.arange(10.0)
    holistic_b = holistic_a.flip(0) + 0.5  # never tied
    sign = torch.sign(holistic_a - holistic_b)
    agrees = sign.clone()
    agrees[0] = -agrees[0]
    disagrees = -sign
    disagrees[:2] = sign[:2]
    rates = disagreement_rates(
        holistic_a,
        holistic_b,
        {"agrees": agrees, "disagrees": disagrees, "errors": -sign},
        {"agrees": torch.zeros(10), "disagrees": torch.zeros(10), "errors": torch.zeros(10)},
        lower_is_better=["errors"],
    )
    assert rates == pytest.approx({"agrees": 0.1, "disagrees": 0.8, "errors": 0.0})
    assert select_aspects(rates, threshold=0.5) == ["errors", "agrees"]
    assert select_aspects(rates, top_k=1) == ["errors"]
    assert select_aspects(rates, threshold=0.05, top_k=2) == ["errors"]


def test_consistency_ties_are_excluded():
    holistic_a, holistic_b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 1.0, 1.0, 5.0])
    aspect_a, aspect_b = torch.tensor([9.0, 0.0, 2.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    # prompt 0: holistic tied -> excluded; prompt 1: aspect tied -> counted in the denominator only;
    # prompt 2: agree; prompt 3: A lower on both -> agree. 0 of 3 disagree.
    assert disagreement_rates(holistic_a, holistic_b, {"x": aspect_a}, {"x": aspect_b}) == {"x": 0.0}
    flipped = disagreement_rates(holistic_a, holistic_b, {"x": aspect_a}, {"x": aspect_b}, lower_is_better=["x"])
    assert flipped["x"] == pytest.approx(2 / 3)
    with pytest.raises(losses.LossError, match="every holistic comparison is tied"):
        disagreement_rates(holistic_a, holistic_a, {"x": aspect_a}, {"x": aspect_b})
    with pytest.raises(losses.HyperParameterError, match="threshold, a top_k"):
        select_aspects({"x": 0.1})
    negated = disagreement_rates(holistic_a, holistic_b, {"x": -aspect_a}, {"x": -aspect_b})
    assert negated["x"] == 2 / 3  # exact: counts, not float32 tensor division
