"""REINFORCE++ (losses/reinforce.py): hand-computed advantages and gradients, the group baseline, the KL folded into
the reward, padding, the estimators and finite differences."""

import math

import pytest
import torch

import losses
from losses.reinforce import reinforce_pp_advantages

F64 = torch.float64
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=F64)  # completions of 2 and 3 tokens


def _whiten(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / (std + 1e-8) for v in values]


def test_on_policy_gradient_is_minus_the_whitened_return_over_the_token_count():
    """β = 0, rewards (1, −1): rewards on the last tokens, returns to go row 0 (1, 1), row 1 (−1, −1, −1); whitened over
    the 5 tokens: mean −0.2, std √0.96, so A = (1.2, 1.2 | −0.8, −0.8, −0.8)/√0.96. On-policy the ratio is 1 and
    ∂L/∂log π_it = −A_it / 5 (token mean over the batch)."""
    policy = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.0, -1.5]], dtype=F64, requires_grad=True)
    out = losses.get("reinforce_pp", beta=0.0)(
        policy_token_logps=policy, completion_mask=MASK, rewards=torch.tensor([1.0, -1.0], dtype=F64)
    )
    out.loss.backward()
    a = _whiten([1, 1, -1, -1, -1])
    expected = torch.tensor([[a[0], a[1], 0.0], [a[2], a[3], a[4]]], dtype=F64) / -5
    assert torch.allclose(policy.grad, expected, atol=1e-12)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-12)  # whitened advantages sum to 0 over the tokens
    assert out.metrics["reinforce/return_mean"].item() == pytest.approx(-0.2)


def test_the_kl_penalty_is_folded_into_the_reward_token_by_token():
    """β = 1, k2: d = log π_old − log π_ref = (0.5, 0 | 0, 1, 0) -> KL̂ = d²/2 = (0.125, 0 | 0, 0.5, 0); per-token
    rewards (−0.125, 0 + 1 | 0, −0.5, 0 − 1); returns to go (0.875, 1 | −1.5, −1.5, −1)."""
    old = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -2.0, -1.0]], dtype=F64)
    advantages, returns, kl = reinforce_pp_advantages(
        torch.tensor([1.0, -1.0], dtype=F64), MASK, old, ref, beta=1.0, kl_estimator="k2"
    )
    assert torch.allclose(returns, torch.tensor([[0.875, 1.0, 0.0], [-1.5, -1.5, -1.0]], dtype=F64))
    assert torch.allclose(kl, torch.tensor([[0.125, 0.0, 0.0], [0.0, 0.5, 0.0]], dtype=F64))
    a = _whiten([0.875, 1.0, -1.5, -1.5, -1.0])
    assert torch.allclose(advantages, torch.tensor([[a[0], a[1], 0.0], [a[2], a[3], a[4]]], dtype=F64))
    k1 = reinforce_pp_advantages(torch.tensor([1.0, -1.0], dtype=F64), MASK, old, ref, beta=1.0, kl_estimator="k1")[2]
    assert torch.allclose(k1, torch.tensor([[0.5, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64))


def test_group_baseline_subtracts_each_prompts_mean_reward():
    """baseline='group' with rewards [[1, 3]] (one prompt, K = 2): r' = (−1, 1), the same advantages as rewards
    (−1, 1) without a baseline; [N] rewards are refused with one line."""
    old = torch.zeros(2, 3, dtype=F64)
    grouped = reinforce_pp_advantages(
        torch.tensor([[1.0, 3.0]], dtype=F64), MASK, old, None, beta=0.0, baseline="group"
    )
    plain = reinforce_pp_advantages(torch.tensor([-1.0, 1.0], dtype=F64), MASK, old, None, beta=0.0)
    assert torch.allclose(grouped[0], plain[0])
    with pytest.raises(losses.LossError, match="baseline='group' needs 'rewards' as \\[G, K\\]"):
        reinforce_pp_advantages(torch.tensor([1.0, 3.0], dtype=F64), MASK, old, None, beta=0.0, baseline="group")


def test_padding_never_reaches_value_or_gradient():
    policy = torch.tensor([[-1.0, -2.0, 5.0], [-0.5, -1.0, -1.5]], dtype=F64, requires_grad=True)
    other = policy.detach().clone()
    other[0, 2] = -99.0
    loss = losses.get("reinforce_pp", beta=0.0)
    a = loss(policy_token_logps=policy, completion_mask=MASK, rewards=torch.tensor([1.0, -1.0], dtype=F64))
    b = loss(policy_token_logps=other, completion_mask=MASK, rewards=torch.tensor([1.0, -1.0], dtype=F64))
    a.loss.backward()
    assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-12) and policy.grad[0, 2] == 0


def test_gradcheck_off_policy():
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(2, 3, generator=gen, dtype=F64)
    ref = -torch.rand(2, 3, generator=gen, dtype=F64)
    rewards = torch.tensor([0.3, -1.2], dtype=F64)
    loss = losses.get("reinforce_pp", beta=0.05)
    policy = (old + 0.05 * torch.randn(2, 3, generator=gen, dtype=F64)).requires_grad_(True)

    def f(p):
        return loss(
            policy_token_logps=p, completion_mask=MASK, rewards=rewards, old_token_logps=old, ref_token_logps=ref
        ).loss

    assert torch.autograd.gradcheck(f, (policy,))


def test_beta_needs_the_reference():
    with pytest.raises(losses.MissingInputError, match="ref_token_logps"):
        losses.get("reinforce_pp")(
            policy_token_logps=torch.zeros(2, 3), completion_mask=MASK, rewards=torch.tensor([1.0, 0.0])
        )


def test_token_rewards_replace_the_reward_on_the_last_token():
    """Per-token rewards that sum to the sequence rewards and sit all on the last token give the same advantages as
    the sequence rewards; spread over the tokens they change the returns to go (the group baseline still subtracts
    the group's mean reward on the last token)."""
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=F64)
    old = torch.zeros(4, 3, dtype=F64)
    rewards = torch.tensor([[1.0, -1.0], [2.0, 0.5]], dtype=F64)
    on_last = torch.tensor([[0, 0, 1.0], [0, -1.0, 0], [0, 0, 2.0], [0.5, 0, 0]], dtype=F64)
    for baseline in ("none", "group"):
        plain, _, _ = reinforce_pp_advantages(rewards, mask, old, None, beta=0.0, baseline=baseline)
        placed, _, _ = reinforce_pp_advantages(
            rewards, mask, old, None, beta=0.0, baseline=baseline, token_rewards=on_last
        )
        assert torch.allclose(plain, placed), baseline
    spread = torch.tensor([[0.5, 0, 0.5], [0, -1.0, 0], [0, 0, 2.0], [0.5, 0, 0]], dtype=F64)
    _, returns, _ = reinforce_pp_advantages(rewards, mask, old, None, beta=0.0, token_rewards=spread)
    assert returns[0].tolist() == pytest.approx([1.0, 0.5, 0.5])  # return to go of (0.5, 0, 0.5)
