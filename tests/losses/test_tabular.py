"""Spec §3 on an enumerable output set: minimising the population loss over a softmax table reaches the closed form.

Outputs y ∈ {0..N−1}, reference π_ref, reward r, Bradley–Terry preferences p(y ≻ y') = σ(r(y) − r(y')), pairs
drawn from μ × μ. Each ordered pair (chosen y, rejected y') enters with weight μ(y) μ(y') p(y ≻ y'), so the weighted
sum of per-example losses is the population loss. Completions have length 1, so summed = averaged log-probs.
"""

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
