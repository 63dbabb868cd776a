"""PPO (losses/ppo.py): GAE and masked whitening against hand-computed values and their known limits (λ = 1: Monte
Carlo returns; λ = 0: one-step TD errors), the loss's value and gradients by hand, the KL folded into the reward,
policy and value clipping, padding, per-token vs sequence rewards, and finite differences."""

import pytest
import torch

import losses
from losses import gae, masked_whiten

F64 = torch.float64
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)  # completions of 3 and 2 tokens
REWARDS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]], dtype=F64)  # 9.0 sits on padding: never read
VALUES = torch.tensor([[0.5, 0.2, 0.1], [1.0, 0.5, 7.0]], dtype=F64)


def test_gae_by_hand():
    """γ = 1, λ = 0.95. Row 0: δ = (0 + 0.2 − 0.5, 0 + 0.1 − 0.2, 1 + 0 − 0.1) = (−0.3, −0.1, 0.9);
    A2 = 0.9, A1 = −0.1 + 0.95·0.9 = 0.755, A0 = −0.3 + 0.95·0.755 = 0.41725. Row 1 (2 tokens; V = 0 after its last
    token, whatever sits in the padding): δ = (0.5 − 1, 2 − 0.5) = (−0.5, 1.5); A1 = 1.5, A0 = −0.5 + 0.95·1.5 = 0.925.
    Returns = A + V."""
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=0.95)
    assert torch.allclose(advantages, torch.tensor([[0.41725, 0.755, 0.9], [0.925, 1.5, 0.0]], dtype=F64))
    assert torch.allclose(returns, torch.tensor([[0.91725, 0.955, 1.0], [1.925, 2.0, 0.0]], dtype=F64))


def test_gae_limits():
    """λ = 1, γ = 1: A = Monte Carlo return to go − V; λ = 0: A = δ, the one-step TD error; γ = 0.5, λ = 1:
    discounted returns (row 0: 0.25, 0.5, 1)."""
    monte_carlo, returns = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    assert torch.allclose(returns, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]], dtype=F64))
    assert torch.allclose(monte_carlo, torch.tensor([[0.5, 0.8, 0.9], [1.0, 1.5, 0.0]], dtype=F64))
    td, _ = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=0.0)
    assert torch.allclose(td, torch.tensor([[-0.3, -0.1, 0.9], [-0.5, 1.5, 0.0]], dtype=F64))
    _, discounted = gae(REWARDS, VALUES, MASK, gamma=0.5, lam=1.0)
    assert discounted[0].tolist() == pytest.approx([0.25, 0.5, 1.0])


def test_masked_whiten_by_hand():
    """(1, 2, 3 | 4, 5) and padding: mean 3, Bessel variance 10/4 = 2.5 -> (x − 3)/√2.5, padding 0."""
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]], dtype=F64)
    expected = [[(x - 3) / 2.5**0.5 for x in row] for row in ([1, 2, 3], [4, 5])]
    out = masked_whiten(values, MASK)
    assert out[0].tolist() == pytest.approx(expected[0]) and out[1, :2].tolist() == pytest.approx(expected[1])
    assert out[1, 2] == 0


def _ppo(**kwargs):
    defaults = {"beta": 0.0, "gamma": 1.0, "lam": 0.95}
    hparams = {k: kwargs.pop(k) for k in list(kwargs) if k in losses.spec("ppo").hparams}
    return losses.get("ppo", **{**defaults, **hparams})(**kwargs)


def test_on_policy_value_and_gradients_by_hand():
    """On-policy (old = policy, old values = values), β = 0, rewards (1, 2) on the last tokens. The whitened advantages
    have masked mean 0, so the policy term is 0 and ∂L/∂log π = −A_w / 5; the value term is vf_coef·½·mean((V − R)²)
    with R the GAE returns (γ = 1, λ = 0.95) of these rewards: row 0 as in test_gae_by_hand, row 1: δ = (−0.5, 1.5)."""
    policy = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]], dtype=F64, requires_grad=True)
    values = VALUES.clone().requires_grad_(True)
    out = _ppo(
        policy_token_logps=policy, completion_mask=MASK, values=values, rewards=torch.tensor([1.0, 2.0], dtype=F64)
    )
    returns = torch.tensor([[0.91725, 0.955, 1.0], [1.925, 2.0, 0.0]], dtype=F64)
    squared = [(0.5 - 0.91725) ** 2, (0.2 - 0.955) ** 2, (0.1 - 1.0) ** 2, (1.0 - 1.925) ** 2, (0.5 - 2.0) ** 2]
    assert out.loss.item() == pytest.approx(0.1 * 0.5 * sum(squared) / 5)
    out.loss.backward()
    raw = torch.tensor([[0.41725, 0.755, 0.9], [0.925, 1.5, 0.0]], dtype=F64)
    whitened = masked_whiten(raw, MASK)
    assert torch.allclose(policy.grad, -whitened / 5 * MASK)
    assert torch.allclose(values.grad, 0.1 * (values.detach() - returns) / 5 * MASK)  # ½·2(V − R)·vf_coef / 5
    assert out.metrics["ppo/advantage_mean"].item() == pytest.approx(raw.sum().item() / 5)
    assert out.metrics["policy/clipfrac"] == 0 and out.metrics["value/clipfrac"] == 0


def test_token_rewards_equal_the_sequence_reward_placed_on_the_last_token():
    policy = torch.randn(2, 3, dtype=F64)
    sequence = _ppo(policy_token_logps=policy, completion_mask=MASK, values=VALUES, rewards=torch.tensor([1.0, 2.0]))
    placed = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]], dtype=F64)
    per_token = _ppo(policy_token_logps=policy, completion_mask=MASK, values=VALUES, token_rewards=placed)
    assert per_token.loss.item() == pytest.approx(sequence.loss.item())
    both = _ppo(
        policy_token_logps=policy, completion_mask=MASK, values=VALUES, rewards=torch.tensor([1.0, 2.0]),
        token_rewards=torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64),
    )  # fmt: skip
    assert both.metrics["ppo/reward_mean"].item() == pytest.approx(0.5 / 2)  # per-token rewards are the whole reward


def test_kl_is_folded_into_the_reward():
    """β = 0.1, k1: ρ_t = −0.1·(log π_old − log π_ref) on every token (+ the reward on the last): the metric
    ``ppo/reward_mean`` is the mean per-completion sum; k3 is e^{−d} − 1 + d."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]], dtype=F64)
    ref = old - torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.4, 5.0]], dtype=F64)  # d = old − ref; 5.0 on padding
    out = _ppo(
        policy_token_logps=old, completion_mask=MASK, values=VALUES, rewards=torch.tensor([1.0, 2.0]),
        ref_token_logps=ref, beta=0.1,
    )  # fmt: skip
    assert out.metrics["kl"].item() == pytest.approx((0.5 - 0.2 + 0.1 + 0.3 + 0.4) / 5)
    assert out.metrics["ppo/reward_mean"].item() == pytest.approx(((1 - 0.1 * 0.4) + (2 - 0.1 * 0.7)) / 2)
    k3 = _ppo(
        policy_token_logps=old, completion_mask=MASK, values=VALUES, rewards=torch.tensor([1.0, 2.0]),
        ref_token_logps=ref, beta=0.1, kl_estimator="k3",
    )  # fmt: skip
    d = [0.5, -0.2, 0.1, 0.3, 0.4]
    assert k3.metrics["kl"].item() == pytest.approx(sum(torch.expm1(torch.tensor(-x)).item() + x for x in d) / 5)


def test_policy_and_value_clipping():
    """A token whose ratio left [1 − ε, 1 + ε] in the advantage's direction gets no policy gradient; a value that
    moved more than cliprange_value from its old value, away from the return, is penalised at the clipped value's
    error (the max) — its gradient is the unclipped one's, as in PPO2."""
    old = torch.zeros(1, 2, dtype=F64)
    policy = torch.tensor([[0.5, 0.0]], dtype=F64, requires_grad=True)  # ratio e^0.5 ≈ 1.65 on token 0
    values = torch.tensor([[0.0, 0.0]], dtype=F64, requires_grad=True)
    mask = torch.ones(1, 2, dtype=F64)
    out = _ppo(
        policy_token_logps=policy, completion_mask=mask, values=values, old_token_logps=old,
        old_values=torch.tensor([[0.0, 0.0]], dtype=F64), token_rewards=torch.tensor([[1.0, 1.0]], dtype=F64),
        whiten=False, lam=1.0,
    )  # fmt: skip
    out.loss.backward()  # A = returns to go − 0 = (2, 1); token 0's ratio e^0.5 > 1.2 with A > 0: clipped
    assert policy.grad[0, 0] == 0 and policy.grad[0, 1].item() == pytest.approx(-1.0 / 2)
    assert out.metrics["policy/clipfrac"].item() == pytest.approx(0.5)
    far = torch.tensor([[-1.0, 0.0]], dtype=F64, requires_grad=True)  # moved by −1 from 0, away from R_0 = 1
    out = _ppo(
        policy_token_logps=old, completion_mask=mask, values=far, old_token_logps=old,
        old_values=torch.tensor([[0.0, 0.0]], dtype=F64), token_rewards=torch.tensor([[1.0, 0.0]], dtype=F64),
        whiten=False, lam=1.0, vf_coef=1.0,
    )  # fmt: skip
    # returns from the OLD values (0): R = (1, 0); unclipped (−1 − 1)² = 4 > clipped (−0.2 − 1)² = 1.44: 4 counts
    assert out.metrics["value/loss"].item() == pytest.approx(0.5 * (4 + 0) / 2)
    out.loss.backward()
    assert far.grad[0, 0].item() == pytest.approx(1.0 * 0.5 * 2 * (-1 - 1) / 2)


def test_gradcheck():
    torch.manual_seed(0)
    policy = torch.randn(2, 3, dtype=F64, requires_grad=True)
    values = torch.randn(2, 3, dtype=F64, requires_grad=True)
    old = (policy + 0.05 * torch.randn(2, 3, dtype=F64)).detach()  # inside the clip range: smooth there
    old_values = (values + 0.05 * torch.randn(2, 3, dtype=F64)).detach()
    ref = torch.randn(2, 3, dtype=F64)

    def loss(p, v):
        return _ppo(
            policy_token_logps=p, completion_mask=MASK, values=v, old_token_logps=old, old_values=old_values,
            ref_token_logps=ref, rewards=torch.tensor([1.0, -0.5], dtype=F64), beta=0.05,
        ).loss  # fmt: skip

    assert torch.autograd.gradcheck(loss, (policy, values))


def test_bad_inputs_are_one_line_errors():
    policy = torch.zeros(2, 3)
    with pytest.raises(losses.MissingInputError, match="rewards or token_rewards"):
        _ppo(policy_token_logps=policy, completion_mask=MASK, values=VALUES)
    with pytest.raises(losses.LossError, match="'values' has shape"):
        _ppo(policy_token_logps=policy, completion_mask=MASK, values=torch.zeros(2, 2), rewards=torch.ones(2))
    with pytest.raises(losses.LossError, match="3 values for 2 completions"):
        _ppo(policy_token_logps=policy, completion_mask=MASK, values=VALUES, rewards=torch.ones(3))
    assert losses.get("ppo").requirements.needs_reference  # β = 0.05 by default: the reference's per-token values
    assert not losses.get("ppo", beta=0.0).requirements.needs_reference
