"""Spec §11.1: values computed by hand from the TRL formulas (not by running TRL; test_trl_parity.py does that)."""

import math

import pytest
import torch

import losses

# name, hyper-parameters, per-pair values, batch mean — copied from the spec's table.
GOLDEN = [
    ("dpo", {}, [0.620957, 0.728760, 0.649159], 0.666292),
    ("cdpo", {"label_smoothing": 0.1}, [0.635957, 0.721760, 0.658159], 0.671959),
    ("robust", {"label_smoothing": 0.1}, [0.602207, 0.737510, 0.637909], 0.659209),
    ("hinge", {}, [0.85, 1.07, 0.91], 0.943333),
    ("ipo", {"length_normalize": True}, [22.246944, 25.755625, 22.404444], 23.469005),
    ("ipo", {"length_normalize": False}, [12.25, 32.49, 16.81], 20.516667),
    ("exo_pair", {"label_smoothing": 1e-3}, [2.505517, 2.882662, 2.606945], 2.665041),
    ("nca_pair", {}, [1.350825, 1.404288, 1.364363], 1.373159),
    ("bco_pair", {}, [1.312856, 1.421657, 1.341807], 1.358773),
    ("sppo_hard", {}, [36.25, 57.29, 41.41], 44.983333),
    ("aot", {"label_smoothing": 0.0}, [0.728760, 0.644397, 0.625595], 0.666250),
    ("aot_unpaired", {"label_smoothing": 0.0}, [0.693147, 0.649159, 0.653947], 0.665418),
    ("apo_zero", {}, [0.962523, 1.017497, 0.977504], 0.985842),
    ("apo_down", {}, [0.987549, 1.004995, 0.990013], 0.994186),
    ("discopop", {"tau": 0.05}, [0.849338, 0.796759, 0.876373], 0.840823),
    ("sigmoid_norm", {}, [0.679081, 0.696904, 0.679903], 0.685296),
    ("simpo", {"beta": 2.5, "gamma": 1.375}, [1.600413, 0.757599, 2.126928], 1.494980),
    ("cpo", {"alpha": 0.0}, [0.598139, 0.744397, 0.620957], 0.654498),
]


@pytest.mark.parametrize(("name", "hparams", "per_pair", "mean"), GOLDEN, ids=lambda v: str(v)[:20])
def test_golden_values(golden_batch, name, hparams, per_pair, mean):
    out = losses.get(name, **{"beta": 0.1, **hparams})(**golden_batch)
    assert out.per_example.tolist() == pytest.approx(per_pair, abs=1e-6)
    assert out.loss.item() == pytest.approx(mean, abs=1e-6)
    assert out.loss.dtype == torch.float64


def test_orpo_ratio_term(golden_batch):
    """Spec: ORPO ratio term only (−λ log σ(lo)) = [0.069315, 0.046116, 0.084048]; the NLL part is checked apart."""
    out = losses.get("orpo", beta=0.1)(**golden_batch)
    nll = losses.get("sft")(**golden_batch).per_example
    assert (out.per_example - nll).tolist() == pytest.approx([0.069315, 0.046116, 0.084048], abs=1e-6)
    assert out.metrics["nll_loss"].item() == pytest.approx(nll.mean().item())


def test_sft_is_batch_token_mean(golden_batch):
    """TRL 1.16: −(all chosen token log-probs).mean() = −ΣS/Σ|y| = 42.5/18, not a mean of per-row means."""
    out = losses.get("sft")(**golden_batch)
    assert out.loss.item() == pytest.approx(42.5 / 18, abs=1e-12)
    assert out.per_example.tolist() == pytest.approx([10 * 3 / 18, 25 * 3 / 18, 7.5 * 3 / 18])


def test_cpo_nll_term(golden_batch):
    out = losses.get("cpo", alpha=1.0)(**golden_batch)
    assert out.loss.item() == pytest.approx(0.654498 + 42.5 / 18, abs=1e-6)


def test_dpo_metrics(golden_batch):
    metrics = losses.get("dpo")(**golden_batch).metrics
    expected = {
        "rewards/chosen": 0.033333,
        "rewards/rejected": -0.023333,
        "rewards/margins": 0.056667,
        "rewards/accuracies": 0.666667,
        "logps/chosen": -42.5 / 3,
        "logps/rejected": -15.0,
    }
    for key, value in expected.items():
        assert metrics[key].item() == pytest.approx(value, abs=1e-6), key
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


def test_ipo_logs_summed_rewards_and_form(golden_batch):
    """TRL 1.16 logs β × summed log-ratios for IPO even though the loss averages."""
    metrics = losses.get("ipo")(**golden_batch).metrics
    assert metrics["rewards/chosen"].item() == pytest.approx(0.033333, abs=1e-6)
    assert metrics["ipo/length_normalized"].item() == 1.0


def test_zero_margin_limits():
    zeros = torch.zeros(4, dtype=torch.float64)
    batch = dict(
        policy_chosen_logps=zeros - 3,
        policy_rejected_logps=zeros - 5,
        ref_chosen_logps=zeros - 3,
        ref_rejected_logps=zeros - 5,
        chosen_lengths=torch.full((4,), 7),
        rejected_lengths=torch.full((4,), 2),
    )
    assert losses.get("dpo")(**batch).loss.item() == pytest.approx(math.log(2), abs=1e-12)
    for beta in (0.05, 0.1, 0.5):
        for normalize in (True, False):
            value = losses.get("ipo", beta=beta, length_normalize=normalize)(**batch).loss.item()
            assert value == pytest.approx(1 / (4 * beta**2), rel=1e-12)
