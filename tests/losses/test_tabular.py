"""Spec §3 on an enumerable output set: minimising the population loss over a softmax table reaches the closed form;
for group losses (RLOO), the exact expectation of the gradient over every group of samples equals the closed form.

Outputs y ∈ {0..N−1}, reference π_ref, reward r, Bradley–Terry preferences p(y ≻ y') = σ(r(y) − r(y')), pairs
drawn from μ × μ. Each ordered pair (chosen y, rejected y') enters with weight μ(y) μ(y') p(y ≻ y'), so the weighted
sum of per-example losses is the population loss. Completions have length 1, so summed = averaged log-probs.
"""

import pytest
import torch

import losses

N, BETA = 5, 0.5
F64 = torch.float64


def _problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    ref_logits = torch.randn(N, generator=gen, dtype=F64)
    reward = torch.randn(N, generator=gen, dtype=F64) * 2
    mu = torch.softmax(torch.randn(N, generator=gen, dtype=F64), dim=0)
    chosen, rejected = torch.cartesian_prod(torch.arange(N), torch.arange(N)).T
    pref = torch.sigmoid(reward[chosen] - reward[rejected])
    weights = mu[chosen] * mu[rejected] * pref
    return torch.log_softmax(ref_logits, 0), reward, mu, chosen, rejected, weights, pref


def _minimise(loss, ref_logp, chosen, rejected, weights):
    logits = ref_logp.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [logits], lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )
    ones = torch.ones_like(chosen)

    def closure():
        optimizer.zero_grad()
        logp = torch.log_softmax(logits, 0)
        out = loss(
            policy_chosen_logps=logp[chosen],
            policy_rejected_logps=logp[rejected],
            ref_chosen_logps=ref_logp[chosen],
            ref_rejected_logps=ref_logp[rejected],
            chosen_lengths=ones,
            rejected_lengths=ones,
        )
        value = (weights * out.per_example).sum()
        value.backward()
        return value

    for _ in range(5):
        optimizer.step(closure)
    return torch.log_softmax(logits.detach(), 0)


def test_dpo_population_optimum_is_reference_tilted_by_reward():
    """argmin of the population DPO loss = π_ref · exp(r/β) / Z (Rafailov et al. 2023, §4)."""
    ref_logp, reward, _, chosen, rejected, weights, _ = _problem(0)
    learned = _minimise(losses.get("dpo", beta=BETA), ref_logp, chosen, rejected, weights)
    target = torch.log_softmax(ref_logp + reward / BETA, 0)
    assert torch.allclose(learned, target, atol=1e-6), (learned - target).abs().max()


def test_ipo_population_optimum_closed_form():
    """argmin of the population IPO loss: log π/π_ref = P(y ≻ μ)/τ + const, P(y ≻ μ) = E_{y'∼μ} p(y ≻ y')
    (Azar et al. 2023, §5), with τ = β; summed form (length 1, so both forms agree)."""
    ref_logp, _, mu, chosen, rejected, weights, pref = _problem(1)
    learned = _minimise(losses.get("ipo", beta=BETA, length_normalize=False), ref_logp, chosen, rejected, weights)
    win_rate = (pref.reshape(N, N) * mu[None, :]).sum(dim=1)  # P(y ≻ μ)
    target = torch.log_softmax(ref_logp + win_rate / BETA, 0)
    assert torch.allclose(learned, target, atol=1e-6), (learned - target).abs().max()


def test_dpo_deterministic_preferences_drive_the_table_to_a_vertex():
    """The IPO paper's overfitting argument: with p ∈ {0, 1} DPO's optimum is degenerate (log-ratios unbounded),
    while IPO stays at a finite distance from π_ref."""
    ref_logp, reward, mu, chosen, rejected, _, _ = _problem(2)
    hard = (reward[chosen] > reward[rejected]).to(F64)
    weights = mu[chosen] * mu[rejected] * hard
    dpo = _minimise(losses.get("dpo", beta=BETA), ref_logp, chosen, rejected, weights)
    ipo = _minimise(losses.get("ipo", beta=BETA, length_normalize=False), ref_logp, chosen, rejected, weights)
    kl = lambda logp: (logp.exp() * (logp - ref_logp)).sum().item()  # noqa: E731
    assert dpo.exp().max().item() > 0.99  # (nearly) all mass on the best output
    assert kl(dpo) > 3 * kl(ipo)
    assert kl(ipo) < 2.0 / BETA


# ------------------------------------------------------------------------------------ group losses: exact expectation
def _rloo_expected_gradient(k: int, kl_estimator: str, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """E over every ordered K-tuple of samples from π = softmax(logits) (weights Π π(y_i), detached) of the gradient
    of RLOO's per-prompt loss, by autograd through ``per_example``; and the problem, to build the closed form."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, generator=gen, dtype=F64).requires_grad_(True)
    ref_logp = torch.log_softmax(torch.randn(N, generator=gen, dtype=F64), 0)
    reward = torch.randn(N, generator=gen, dtype=F64)
    tuples = torch.cartesian_prod(*[torch.arange(N)] * k)  # [N^K, K]: every group of K samples
    logp = torch.log_softmax(logits, 0)
    weights = logp.detach()[tuples].sum(dim=1).exp()  # probability of each group
    out = losses.get("rloo", kl_coef=BETA, kl_estimator=kl_estimator)(
        policy_logps=logp[tuples],
        ref_logps=ref_logp[tuples],
        rewards=reward[tuples],
        lengths=torch.ones_like(tuples),
    )
    (grad,) = torch.autograd.grad((weights * out.per_example).sum(), logits)
    return grad, logits, {"ref_logp": ref_logp, "reward": reward}


def _objective_gradient(logits: torch.Tensor, objective) -> torch.Tensor:
    logits = logits.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(torch.log_softmax(logits, 0)), logits)
    return grad


@pytest.mark.parametrize("k", [2, 3])
def test_rloo_k1_is_unbiased_for_the_kl_regularised_objective(k):
    """With single-token completions, the expected RLOO gradient (per_example is −Σ_i A_i S_θ(y_i)/K per prompt) is
    exactly −∇(E_π[r] − β·KL(π‖π_ref)): the leave-one-out baseline adds no bias (Kool et al. 2019), and k1 = log π/π_ref
    in the reward gives the KL's gradient, E[∇log π · d] = ∇KL since E[∇log π] = 0."""
    grad, logits, p = _rloo_expected_gradient(k, "k1")

    def objective(lp):
        return (lp.exp() * p["reward"]).sum() - BETA * (lp.exp() * (lp - p["ref_logp"])).sum()

    assert torch.allclose(grad, -_objective_gradient(logits, objective), atol=1e-12)


def test_rloo_k3_reward_penalty_is_not_the_kl_gradient():
    """k3 = e^{−d} − 1 + d is unbiased for the *value* of KL(π‖π_ref), but as a detached reward penalty its expected
    gradient is E[∇log π · k3] = ∇KL(π‖π_ref) + Σ_y π_ref(y) ∇log π(y) = ∇[KL(π‖π_ref) − KL(π_ref‖π)]: the docstring's
    warning, checked exactly."""
    grad, logits, p = _rloo_expected_gradient(3, "k3")

    def objective(lp):
        forward_kl = (lp.exp() * (lp - p["ref_logp"])).sum()
        reverse_kl = (p["ref_logp"].exp() * (p["ref_logp"] - lp)).sum()
        return (lp.exp() * p["reward"]).sum() - BETA * (forward_kl - reverse_kl)

    assert torch.allclose(grad, -_objective_gradient(logits, objective), atol=1e-12)
    k1, _, _ = _rloo_expected_gradient(3, "k1")
    assert (grad - k1).abs().max() > 1e-3  # and it differs from the k1 (true KL) gradient
