"""RLOO: values computed by hand from the formula in its docstring, its gradient, limits, errors and declarations.
(Registry-wide contract: test_contract.py; hypothesis laws: test_properties.py; exact expectations: test_tabular.py.)"""

import math

import pytest
import torch

import losses
from losses.policy_gradient import leave_one_out_advantages

F64 = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=F64)


# G = 1 prompt, K = 3 samples; kl_coef = 0 so r' = r.
# rewards [1, 2, 6]: leave-one-out baselines [(2+6)/2, (1+6)/2, (1+2)/2] = [4, 3.5, 1.5],
# A = r − b = [−3, −1.5, 4.5] (= 3/2 · (r − mean 3) = 3/2 · [−2, −1, 3]).
# S = [−2, −4, −8], |y| = [2, 4, 2], Σ|y| = 8.
# token:    L = −Σ A·S / Σ|y| = −[(−3)(−2) + (−1.5)(−4) + 4.5·(−8)] / 8 = −(6 + 6 − 36)/8 = 3;  ∇_S L = −A/8.
# sequence: L = mean(−A·S/|y|) = mean(−6/2, −6/4, 36/2) = mean(−3, −1.5, 18) = 4.5;          ∇_S L = −A/(3|y|).
ONE = dict(policy_logps=t([-2.0, -4.0, -8.0]), rewards=t([1.0, 2.0, 6.0]), lengths=torch.tensor([[2, 4, 2]]))
ONE_ADVANTAGES = t([-3.0, -1.5, 4.5])

# G = 2 prompts, K = 2 samples, kl_coef β = 0.5.
# d = S − S_ref = [[−2 − (−3), −4 − (−3)], [−1 − (−1), −3 − (−5)]] = [[1, −1], [0, 2]].
# k1: r' = r − 0.5·d = [[1 − 0.5, 0 + 0.5], [2 − 0, 2 − 1]] = [[0.5, 0.5], [2, 1]];
#     K = 2, so A = ±(r'_1 − r'_2) = [[0, 0], [1, −1]].
#     Σ|y| = 1 + 3 + 2 + 2 = 8; L = −Σ A·S / 8 = −[1·(−1) + (−1)(−3)]/8 = −2/8 = −0.25;
#     per prompt (share × G): [0, −2·2/8] = [0, −0.5].
# k3: KL̂ = e^{−d} − 1 + d = [[e^{−1}, e − 2], [0, e^{−2} + 1]];
#     group 0: A_1 = (1 − 0.5e^{−1}) − (0 − 0.5(e − 2)) = 0.5(e − e^{−1}) = sinh 1;
#     group 1: A_1 = 2 − (2 − 0.5(e^{−2} + 1)) = 0.5(1 + e^{−2}) =: a;
#     L = −[sinh1·(−2) + (−sinh1)(−4) + a·(−1) + (−a)(−3)]/8 = −(2 sinh 1 + 2a)/8 = −(sinh 1 + a)/4.
TWO = dict(
    policy_logps=t([-2.0, -4.0], [-1.0, -3.0]),
    ref_logps=t([-3.0, -3.0], [-1.0, -5.0]),
    rewards=t([1.0, 0.0], [2.0, 2.0]),
    lengths=torch.tensor([[1, 3], [2, 2]]),
)


def _with_grad(batch: dict) -> tuple[dict, torch.Tensor]:
    policy = batch["policy_logps"].clone().requires_grad_(True)
    return dict(batch, policy_logps=policy), policy


# ---------------------------------------------------------------------------------------------------- hand values
def test_leave_one_out_advantages_by_hand():
    assert torch.equal(leave_one_out_advantages(ONE["rewards"]), ONE_ADVANTAGES)
    assert torch.equal(leave_one_out_advantages(t([3.0, 5.0], [1.0, 1.0])), t([-2.0, 2.0], [0.0, 0.0]))


def test_token_aggregation_by_hand():
    batch, policy = _with_grad(ONE)
    out = losses.get("rloo", kl_coef=0.0)(**batch)
    assert out.loss.item() == 3.0 and out.per_example.tolist() == [3.0]
    out.loss.backward()
    assert torch.equal(policy.grad, -ONE_ADVANTAGES / 8)  # exact: every number here is dyadic
    assert out.loss.dtype == F64 and out.per_example.shape == (1,)


def test_sequence_aggregation_by_hand():
    batch, policy = _with_grad(ONE)
    out = losses.get("rloo", kl_coef=0.0, aggregation="sequence")(**batch)
    assert out.loss.item() == pytest.approx(4.5, abs=1e-15)
    out.loss.backward()
    assert torch.allclose(policy.grad, -ONE_ADVANTAGES / (3 * t([2.0, 4.0, 2.0])), rtol=1e-15, atol=0)


def test_metrics_by_hand():
    out = losses.get("rloo", kl_coef=0.5)(**TWO)
    expected = {
        "objective/scores": 5 / 4,  # mean r
        "objective/kl": 0.5,  # mean d = (1 − 1 + 0 + 2)/4
        "objective/non_score_reward": -0.25,  # −β · 0.5
        "objective/rlhf_reward": 1.0,  # mean r' = (0.5 + 0.5 + 2 + 1)/4
        "advantages/mean": 0.0,
        "advantages/std": math.sqrt(2 / 3),  # [0, 0, 1, −1]: Σ A² = 2 over 4 − 1
        "logps/policy": -2.5,
        "response_length": 2.0,
        "frac_reward_zero_std": 0.5,  # prompt 1's rewards [2, 2] are equal
    }
    assert set(out.metrics) == set(expected)
    for key, value in expected.items():
        assert out.metrics[key].item() == pytest.approx(value, abs=1e-15), key
        assert out.metrics[key].dtype == F64 and not out.metrics[key].requires_grad


def test_k1_kl_shaping_by_hand():
    batch, policy = _with_grad(TWO)
    out = losses.get("rloo", kl_coef=0.5, kl_estimator="k1")(**batch)
    assert out.loss.item() == pytest.approx(-0.25, abs=1e-15)
    assert out.per_example.tolist() == pytest.approx([0.0, -0.5], abs=1e-15)
    out.loss.backward()
    assert torch.equal(policy.grad, -t([0.0, 0.0], [1.0, -1.0]) / 8)  # −A/Σ|y|; no gradient through KL̂


def test_k3_kl_shaping_by_hand():
    batch, policy = _with_grad(TWO)
    out = losses.get("rloo", kl_coef=0.5, kl_estimator="k3")(**batch)
    e = math.e
    a = 0.5 * (1 + e**-2)
    assert out.loss.item() == pytest.approx(-(math.sinh(1) + a) / 4, abs=1e-14)
    kl = [1 / e, e - 2, 0.0, e**-2 + 1]
    assert out.metrics["objective/kl"].item() == pytest.approx(sum(kl) / 4, abs=1e-15)
    assert out.metrics["objective/non_score_reward"].item() == pytest.approx(-0.5 * sum(kl) / 4, abs=1e-15)
    out.loss.backward()
    assert torch.allclose(policy.grad, -t([math.sinh(1), -math.sinh(1)], [a, -a]) / 8, rtol=1e-14, atol=0)


def test_k3_is_nonnegative_and_second_order():
    """k3 = e^{−d} − 1 + d ≥ 0 with equality only at d = 0, and ≈ d²/2 near 0 (k1 = d changes sign)."""
    d = torch.linspace(-5, 5, 101, dtype=F64)
    k3 = losses.policy_gradient.kl_estimate(d, "k3")
    assert (k3 >= 0).all() and losses.policy_gradient.kl_estimate(t(0.0), "k3").item() == 0.0
    small = torch.tensor([1e-4, -1e-4], dtype=F64)
    assert torch.allclose(losses.policy_gradient.kl_estimate(small, "k3"), small**2 / 2, rtol=1e-4)
    assert torch.equal(losses.policy_gradient.kl_estimate(d, "k1"), d)


def test_normalize_advantages_by_hand():
    """A = [−3, −1.5, 4.5] has mean 0 and unbiased std √((9 + 2.25 + 20.25)/2) = √15.75; the loss scales by 1/std."""
    out = losses.get("rloo", kl_coef=0.0, normalize_advantages=True)(**ONE)
    std = math.sqrt(15.75)
    assert out.loss.item() == pytest.approx(3.0 / (std + 1e-8), rel=1e-14)
    assert out.metrics["advantages/std"].item() == pytest.approx(std / (std + 1e-8), rel=1e-14)


# ------------------------------------------------------------------------------------------------------- gradients
def _random_group(seed: int, g: int = 3, k: int = 4) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (g, k), generator=gen)
    return dict(
        policy_logps=-torch.rand(g, k, generator=gen, dtype=F64) * lengths,
        ref_logps=-torch.rand(g, k, generator=gen, dtype=F64) * lengths,
        rewards=torch.randn(g, k, generator=gen, dtype=F64),
        lengths=lengths,
    )


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_gradient_is_minus_advantage_over_total_tokens(estimator, aggregation):
    batch, policy = _with_grad(_random_group(0))
    out = losses.get("rloo", kl_coef=0.3, kl_estimator=estimator, aggregation=aggregation)(**batch)
    out.loss.backward()
    d = batch["policy_logps"].detach() - batch["ref_logps"]
    kl = d if estimator == "k1" else torch.exp(-d) - 1 + d
    shaped = batch["rewards"] - 0.3 * kl
    advantages = 4 / 3 * (shaped - shaped.mean(dim=1, keepdim=True))
    lengths = batch["lengths"].to(F64)
    expected = -advantages / (lengths.sum() if aggregation == "token" else lengths * lengths.numel())
    assert torch.allclose(policy.grad, expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    "hparams",
    [
        {"kl_coef": 0.0},
        {"kl_coef": 0.3},
        {"kl_coef": 0.3, "kl_estimator": "k3"},
        {"kl_coef": 0.3, "aggregation": "sequence"},
        {"kl_coef": 0.3, "normalize_advantages": True},
    ],
)
def test_gradcheck(hparams):
    """torch.autograd.gradcheck in float64. The advantages are stop-gradient functions of the log-ratio, so the
    reference moves with the policy inside the checked function (d stays fixed): then the surrogate is linear in S_θ
    and finite differences must equal the analytic −A/Σ|y| — a check of the autograd graph, not just of the value."""
    batch = _random_group(1)
    base = batch["policy_logps"]
    loss = losses.get("rloo", **hparams)

    def fn(policy):
        ref = batch["ref_logps"] + (policy.detach() - base)  # keeps d = S_θ − S_ref at its base value
        return loss(**dict(batch, policy_logps=policy, ref_logps=ref)).loss

    assert torch.autograd.gradcheck(fn, (base.clone().requires_grad_(True),), eps=1e-6, atol=1e-9, rtol=1e-7)


def test_gradient_ignores_a_constant_added_to_a_groups_rewards():
    batch = _random_group(2)
    shifted = dict(batch, rewards=batch["rewards"] + t([100.0], [-3.0], [0.5]))
    grads = []
    for inputs in (batch, shifted):
        inputs, policy = _with_grad(inputs)
        losses.get("rloo")(**inputs).loss.backward()
        grads.append(policy.grad)
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=1e-14)


def test_no_gradient_through_rewards_or_reference():
    batch = _random_group(3)
    ref = batch["ref_logps"].clone().requires_grad_(True)
    rewards = batch["rewards"].clone().requires_grad_(True)
    out = losses.get("rloo", kl_coef=0.5)(**dict(batch, ref_logps=ref, rewards=rewards))
    assert not out.loss.requires_grad  # policy_logps has no grad here, and nothing else may carry one
    assert all(not v.requires_grad for v in out.metrics.values())


# ------------------------------------------------------------------------------------------------------------ limits
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_equal_rewards_without_kl_give_zero_loss_and_gradient(aggregation):
    batch, policy = _with_grad(dict(_random_group(4), rewards=torch.full((3, 4), 0.1, dtype=F64)))
    out = losses.get("rloo", kl_coef=0.0, aggregation=aggregation)(**batch)
    assert out.loss.item() == 0.0 and not out.per_example.any()
    out.loss.backward()
    assert not policy.grad.any()
    assert out.metrics["frac_reward_zero_std"].item() == 1.0 and out.metrics["advantages/std"].item() == 0.0


def test_equal_rewards_with_normalization_stay_zero():
    """A zero std does not divide by zero: the 1e-8 keeps every advantage 0."""
    batch = dict(_random_group(4), rewards=torch.ones(3, 4, dtype=F64))
    assert losses.get("rloo", kl_coef=0.0, normalize_advantages=True)(**batch).loss.item() == 0.0


def test_two_samples_give_plus_minus_the_reward_difference():
    batch, policy = _with_grad(dict(_random_group(5, k=2)))
    out = losses.get("rloo", kl_coef=0.0)(**batch)
    out.loss.backward()
    r = batch["rewards"]
    advantages = torch.stack([r[:, 0] - r[:, 1], r[:, 1] - r[:, 0]], dim=1)
    assert torch.equal(-policy.grad * batch["lengths"].sum(), advantages)


def test_reference_is_unused_without_kl():
    """kl_coef = 0: the loss and gradient do not depend on ref_logps; given, it only feeds objective/kl."""
    batch = _random_group(6)
    free = losses.get("rloo", kl_coef=0.0)
    with_ref = free(**batch)
    without = free(**{k: v for k, v in batch.items() if k != "ref_logps"})
    assert with_ref.loss.item() == without.loss.item()
    assert without.metrics["objective/kl"].item() == 0.0
    d = batch["policy_logps"] - batch["ref_logps"]
    assert with_ref.metrics["objective/kl"].item() == pytest.approx(d.mean().item(), abs=1e-14)
    assert with_ref.metrics["objective/non_score_reward"].item() == 0.0


def test_dtypes():
    """float32 log-probs with float64 rewards and int lengths give float32 outputs and metrics."""
    batch = {k: (v.float() if k.endswith("logps") else v) for k, v in _random_group(7).items()}
    out = losses.get("rloo")(**batch)
    assert out.loss.dtype == torch.float32 and out.per_example.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.metrics.values())


def test_rloo_learns_a_bandit():
    """A softmax policy over 6 arms trained on its own samples (8 prompts × 4 samples, reward = arm index / 5,
    β = 0.02) moves most of its mass to the best arm; each step samples afresh (on-policy)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.zeros(6, dtype=F64, requires_grad=True)
    reward = torch.arange(6, dtype=F64) / 5
    ref = torch.log_softmax(torch.zeros(6, dtype=F64), 0)
    optimizer = torch.optim.SGD([logits], lr=2.0)
    loss = losses.get("rloo", kl_coef=0.02)
    for _ in range(150):
        logp = torch.log_softmax(logits, 0)
        arms = torch.multinomial(logp.detach().exp(), 8 * 4, replacement=True, generator=gen).reshape(8, 4)
        out = loss(policy_logps=logp[arms], ref_logps=ref[arms], rewards=reward[arms], lengths=torch.ones_like(arms))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert torch.softmax(logits.detach(), 0)[-1].item() > 0.8
    assert out.metrics["objective/scores"].item() > 0.8


# ------------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"policy_logps": t([-1.0], [-2.0]), "rewards": t([1.0], [2.0]), "lengths": torch.ones(2, 1)}, "K >= 2"),
        ({"policy_logps": t(-1.0, -2.0)[0]}, r"'policy_logps' must be \[G, K\]"),
        ({"rewards": t([1.0, 2.0, 3.0])}, r"'rewards' has shape \(1, 3\) but 'policy_logps' has \(2, 2\)"),
        ({"lengths": torch.ones(2, 3)}, r"'lengths' has shape \(2, 3\) but 'policy_logps' has \(2, 2\)"),
        ({"ref_logps": t([-1.0, -2.0])[0]}, r"'ref_logps' has shape \(2,\) but 'policy_logps' has \(2, 2\)"),
    ],
)
def test_shape_errors_name_the_problem(change, message):
    with pytest.raises(losses.LossError, match=message):
        losses.get("rloo")(**dict(TWO, **change))


def test_k1_error_message_names_k():
    batch = dict(policy_logps=t([-1.0], [-2.0]), rewards=t([1.0], [2.0]), lengths=torch.ones(2, 1))
    with pytest.raises(losses.LossError, match=r"loss 'rloo' needs K >= 2 .* shape \(2, 1\) \(K = 1\)"):
        losses.rloo_loss(**batch, kl_coef=0.0)


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"kl_coef": -0.01}, "rloo.kl_coef must be a finite number >= 0"),
        ({"kl_coef": float("nan")}, "rloo.kl_coef must be a finite number >= 0"),
        ({"kl_coef": True}, "rloo.kl_coef must be a finite number >= 0"),
        ({"kl_estimator": "k2"}, "rloo.kl_estimator must be one of"),
        ({"aggregation": "mean"}, "rloo.aggregation must be one of"),
    ],
)
def test_bad_hyperparameters(hparams, message):
    with pytest.raises(losses.HyperParameterError, match=message):
        losses.get("rloo", **hparams)
    with pytest.raises(losses.HyperParameterError, match=message):
        losses.rloo_loss(**TWO, **hparams)


def test_nonfinite_inputs_are_reported():
    with pytest.raises(losses.NonFiniteError, match=r"'ref_logps' is not finite at rows \[1\]"):
        losses.get("rloo")(**dict(TWO, ref_logps=t([-1.0, -2.0], [float("nan"), -1.0])))
    with pytest.raises(losses.NonFiniteError, match=r"'rewards' is not finite at rows \[0\]"):
        losses.get("rloo")(**dict(TWO, rewards=t([float("inf"), 0.0], [1.0, 1.0])))


# ------------------------------------------------------------------------------------------------------ declaration
@pytest.mark.parametrize(("kl_coef", "needs"), [(0.0, False), (1e-9, True), (0.05, True), (1.0, True)])
def test_needs_reference_iff_kl_coef_positive(kl_coef, needs):
    req = losses.get("rloo", kl_coef=kl_coef).requirements
    assert req.needs_reference is needs and ("ref_logps" in req.inputs) is needs
    assert ("ref_logps" in req.optional_inputs) is not needs
    assert req.kind == "group" and req.needs_lengths and req.extras == () and req.optional_extras == ()


def test_spec():
    spec = losses.spec("rloo")
    assert spec.kind == "group" and "2402.14740" in spec.paper and not spec.batch_dependent
    assert dict(spec.hparams) == {
        "kl_coef": 0.05,
        "kl_estimator": "k1",
        "aggregation": "token",
        "normalize_advantages": False,
    }
    assert losses.rloo_loss is spec.fn
    for phrase in ("2402.14740", "summed", "[G, K]", "On-policy", "importance ratio"):
        assert phrase.lower() in losses.rloo_loss.__doc__.lower(), phrase
