"""Symmetries and limits that follow from the formulas, checked on random batches."""

import math

import pytest
import torch

import losses

from ._inputs import make_inputs

MARGIN_ONLY = ["dpo", "cdpo", "robust", "hinge", "exo_pair", "discopop"]  # functions of Δ alone
PAIR_LOSSES = [n for n in losses.available() if losses.spec(n).kind == "pair"]
GROUP_LOSSES = [n for n in losses.available() if losses.spec(n).kind == "group"]
REFERENCE_LOSSES = [n for n in PAIR_LOSSES if n not in {"combo", "upo"} and losses.get(n).needs_reference]
GROUP_REFERENCE_LOSSES = [n for n in GROUP_LOSSES if losses.get(n).needs_reference]


def _swap(batch):
    swapped = dict(batch)
    for a, b in [
        ("policy_chosen_logps", "policy_rejected_logps"),
        ("ref_chosen_logps", "ref_rejected_logps"),
        ("chosen_lengths", "rejected_lengths"),
    ]:
        swapped[a], swapped[b] = batch[b], batch[a]
    return swapped


def _margin(batch):
    return (batch["policy_chosen_logps"] - batch["ref_chosen_logps"]) - (
        batch["policy_rejected_logps"] - batch["ref_rejected_logps"]
    )


@pytest.fixture
def batch():
    return make_inputs(losses.get("ipo"), seed=7)


def test_dpo_swap_law(batch):
    """−log σ(z) − (−log σ(−z)) = −z: swapping chosen and rejected changes each pair's loss by βΔ."""
    beta = 0.3
    diff = losses.get("dpo", beta=beta)(**batch).per_example - losses.get("dpo", beta=beta)(**_swap(batch)).per_example
    assert torch.allclose(diff, -beta * _margin(batch), atol=1e-12)


def test_cdpo_swap_equals_flipped_smoothing(batch):
    """Conservative DPO with ε on swapped labels equals ε' = 1 − ε on the original ones (the symmetric mixture)."""
    swapped = losses.get("cdpo", label_smoothing=0.2)(**_swap(batch)).per_example
    direct = 0.8 * -torch.nn.functional.logsigmoid(-0.1 * _margin(batch)) + 0.2 * -torch.nn.functional.logsigmoid(
        0.1 * _margin(batch)
    )
    assert torch.allclose(swapped, direct, atol=1e-12)


def test_hinge_and_ipo_swap(batch):
    delta = _margin(batch)
    assert torch.allclose(losses.get("hinge")(**_swap(batch)).per_example, torch.relu(1 + 0.1 * delta), atol=1e-12)
    ipo = losses.get("ipo", length_normalize=False)(**_swap(batch)).per_example
    assert torch.allclose(ipo, (-delta - 5.0) ** 2, atol=1e-9)


def test_sppo_and_nca_and_bco_swap(batch):
    rho_w = batch["policy_chosen_logps"] - batch["ref_chosen_logps"]
    rho_l = batch["policy_rejected_logps"] - batch["ref_rejected_logps"]
    assert torch.allclose(losses.get("sppo_hard")(**_swap(batch)).per_example, (rho_l - 5) ** 2 + (rho_w + 5) ** 2)
    bco = losses.get("bco_pair")(**_swap(batch)).per_example
    logsig = torch.nn.functional.logsigmoid
    assert torch.allclose(bco, -logsig(0.1 * rho_l) - logsig(-0.1 * rho_w), atol=1e-12)


@pytest.mark.parametrize("name", MARGIN_ONLY)
def test_margin_only_losses_ignore_a_common_shift(batch, name):
    """Adding the same c to both log-ratios of a pair leaves every function of Δ unchanged."""
    shift = torch.linspace(-3, 3, 5, dtype=torch.float64)
    shifted = dict(
        batch,
        policy_chosen_logps=batch["policy_chosen_logps"] + shift,
        policy_rejected_logps=batch["policy_rejected_logps"] + shift,
    )
    assert torch.allclose(losses.get(name)(**batch).per_example, losses.get(name)(**shifted).per_example, atol=1e-12)


@pytest.mark.parametrize("name", REFERENCE_LOSSES)
def test_reference_losses_depend_on_log_ratios_only(name):
    """Moving a completion's policy and reference log-prob together changes nothing (the loss sees ρ only); for
    batch-dependent AOT the move is the same for every row."""
    loss = losses.get(name)
    batch = make_inputs(loss, seed=3)
    shift = (
        torch.full((5,), 2.5, dtype=torch.float64)
        if losses.spec(name).batch_dependent
        else torch.linspace(-4, 4, 5, dtype=torch.float64)
    )
    moved = dict(
        batch,
        policy_chosen_logps=batch["policy_chosen_logps"] + shift,
        ref_chosen_logps=batch["ref_chosen_logps"] + shift,
    )
    assert torch.allclose(loss(**batch).loss, loss(**moved).loss, atol=1e-12)


@pytest.mark.parametrize("name", GROUP_REFERENCE_LOSSES)
def test_group_gradients_depend_on_log_ratios_only(name):
    """The group analogue: a policy-gradient surrogate's value is Σ A·S_θ, which moves with S_θ, but its gradient
    −A/Σ|y| sees the policy only through the detached log-ratios, so moving a completion's policy and reference
    log-prob together leaves the gradient unchanged."""
    loss = losses.get(name)
    batch = make_inputs(loss, seed=3)
    shift = torch.linspace(-4, 4, batch["policy_logps"].numel(), dtype=torch.float64).reshape(
        batch["policy_logps"].shape
    )

    def gradient(inputs):
        policy = inputs["policy_logps"].clone().requires_grad_(True)
        loss(**dict(inputs, policy_logps=policy)).loss.backward()
        return policy.grad

    moved = dict(batch, policy_logps=batch["policy_logps"] + shift, ref_logps=batch["ref_logps"] + shift)
    assert torch.allclose(gradient(batch), gradient(moved), atol=1e-12)


def test_known_limits(batch):
    zero = dict(batch, policy_chosen_logps=batch["ref_chosen_logps"], policy_rejected_logps=batch["ref_rejected_logps"])
    assert torch.allclose(
        losses.get("nca_pair")(**zero).per_example, torch.full((5,), 2 * math.log(2), dtype=torch.float64)
    )
    assert torch.allclose(
        losses.get("bco_pair")(**zero).per_example, torch.full((5,), 2 * math.log(2), dtype=torch.float64)
    )
    assert torch.allclose(losses.get("apo_zero")(**zero).per_example, torch.ones(5, dtype=torch.float64))
    assert torch.allclose(losses.get("sppo_hard")(**zero).per_example, torch.full((5,), 50.0, dtype=torch.float64))
    # EXO at Δ = 0: KL([½, ½] ‖ [1−ε, ε]) = −log 2 − ½ log(ε(1−ε))
    eps = 1e-3
    assert losses.get("exo_pair")(**zero).loss.item() == pytest.approx(-math.log(2) - 0.5 * math.log(eps * (1 - eps)))
    # ε = 0: cdpo and robust reduce to DPO; a single pair makes AOT's sorting trivial, so AOT = DPO
    dpo = losses.get("dpo")(**batch).per_example
    assert torch.allclose(losses.get("cdpo", label_smoothing=0.0)(**batch).per_example, dpo)
    assert torch.allclose(losses.get("robust", label_smoothing=0.0)(**batch).per_example, dpo)
    one = {k: v[:1] for k, v in batch.items()}
    assert torch.allclose(losses.get("aot")(**one).per_example, losses.get("dpo")(**one).per_example)
    # hinge is exactly zero once βΔ >= 1
    far = dict(
        batch, policy_chosen_logps=batch["ref_chosen_logps"] + 20, policy_rejected_logps=batch["ref_rejected_logps"]
    )
    assert losses.get("hinge")(**far).loss.item() == 0.0


def test_dpo_gradient_formula(batch):
    """∇_{S_w} L = −β σ(−βΔ) / B (DPO paper, arXiv 2305.18290, eq. 7)."""
    chosen = batch["policy_chosen_logps"].clone().requires_grad_(True)
    losses.get("dpo", beta=0.2)(**dict(batch, policy_chosen_logps=chosen)).loss.backward()
    expected = -0.2 * torch.sigmoid(-0.2 * _margin(batch)) / 5
    assert torch.allclose(chosen.grad, expected, atol=1e-12)
