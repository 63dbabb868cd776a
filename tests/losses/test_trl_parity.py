"""Parity with TRL 1.16: run TRL's own loss code on the same log-probs and compare.

``DPOTrainer._compute_loss`` is called unbound on a stub trainer whose fake model returns per-token log-probs that
sum to the chosen summed log-probs, with precomputed reference log-probs, so every line of TRL's loss block runs
as in training. CPO/SimPO and ORPO are compared through their trainers' loss methods. Skipped when trl is absent.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import losses

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

B, T = 6, 12


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(t):
        return t

    @staticmethod
    def gather_for_metrics(t):
        return t


def _batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (2, B), generator=gen)
    logps = -torch.rand(4, B, generator=gen, dtype=torch.float64) * 3 * torch.cat([lengths, lengths]).double()
    return dict(
        policy_chosen_logps=logps[0],
        policy_rejected_logps=logps[1],
        ref_chosen_logps=logps[2],
        ref_rejected_logps=logps[3],
        chosen_lengths=lengths[0],
        rejected_lengths=lengths[1],
    )


def _run_trl(batch, loss_types, loss_weights=None, beta=0.1, label_smoothing=0.0, discopop_tau=0.05):
    """TRL 1.16 DPOTrainer._compute_loss on ``batch``; returns (loss, metrics dict)."""
    lengths = torch.cat([batch["chosen_lengths"], batch["rejected_lengths"]])  # [2B], chosen rows first
    summed = torch.cat([batch["policy_chosen_logps"], batch["policy_rejected_logps"]])
    positions = torch.arange(T)
    completion = positions[None, :] >= (T - lengths)[:, None]  # completion = the last L tokens
    per_token = torch.where(completion, (summed / lengths)[:, None], torch.zeros(()).double())
    completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), completion.long()], dim=1)  # [2B, T+1]

    def model(**_):
        return SimpleNamespace(
            log_probs=per_token,
            entropy=torch.zeros(2 * B, T),
            mean_logits=torch.zeros(2 * B, T),
            is_top1=torch.zeros(2 * B, T, dtype=torch.bool),
        )

    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        args=SimpleNamespace(discopop_tau=discopop_tau),
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2 * B, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, T + 1),
        "completion_mask": completion_mask,
        "ref_chosen_logps": batch["ref_chosen_logps"],
        "ref_rejected_logps": batch["ref_rejected_logps"],
    }
    loss = trl_dpo.DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


# (our name, our hyper-parameters, TRL loss_type, TRL label_smoothing)
CASES = [
    ("dpo", {}, "sigmoid", 0.0),
    ("hinge", {}, "hinge", 0.0),
    ("ipo", {"length_normalize": True}, "ipo", 0.0),
    ("exo_pair", {"label_smoothing": 1e-3}, "exo_pair", 1e-3),
    ("exo_pair", {"label_smoothing": 0.2}, "exo_pair", 0.2),
    ("nca_pair", {}, "nca_pair", 0.0),
    ("robust", {"label_smoothing": 0.0}, "robust", 0.0),
    ("robust", {"label_smoothing": 0.3}, "robust", 0.3),
    ("bco_pair", {}, "bco_pair", 0.0),
    ("sppo_hard", {}, "sppo_hard", 0.0),
    ("aot", {"label_smoothing": 0.0}, "aot", 0.0),
    ("aot", {"label_smoothing": 0.2}, "aot", 0.2),
    ("aot_unpaired", {"label_smoothing": 0.1}, "aot_unpaired", 0.1),
    ("apo_zero", {}, "apo_zero", 0.0),
    ("apo_down", {}, "apo_down", 0.0),
    ("discopop", {"tau": 0.05}, "discopop", 0.0),
    ("sft", {}, "sft", 0.0),
    ("sigmoid_norm", {}, "sigmoid_norm", 0.0),
]


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize(("name", "hparams", "trl_type", "smoothing"), CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_trainer_losses_equal_trl(name, hparams, trl_type, smoothing, beta, seed):
    batch = _batch(seed)
    kwargs = {"beta": beta, **hparams} if "beta" in losses.spec(name).hparams else hparams
    ours = losses.get(name, **kwargs)(**batch)
    trl_loss, trl_metrics = _run_trl(batch, [trl_type], beta=beta, label_smoothing=smoothing)
    # TRL builds EXO's ε as a float32 tensor, so its log(ε) terms carry float32 rounding even for float64 inputs.
    rel = 1e-6 if name == "exo_pair" else 1e-9
    assert ours.loss.item() == pytest.approx(trl_loss.item(), rel=rel, abs=1e-12)
    if name != "sft":
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert ours.metrics[key].item() == pytest.approx(trl_metrics[key], rel=1e-9, abs=1e-12), key
    for key in ("logps/chosen", "logps/rejected"):
        assert ours.metrics[key].item() == pytest.approx(trl_metrics[key], rel=1e-9), key


def test_cdpo_equals_trl_028_sigmoid_with_smoothing_and_dpo_at_zero():
    """TRL 1.16 has no smoothing on sigmoid; at ε = 0 cdpo must equal it, and at ε > 0 the TRL ≤ 0.28 formula."""
    batch = _batch(3)
    trl_loss, _ = _run_trl(batch, ["sigmoid"], beta=0.1)
    assert losses.get("cdpo", label_smoothing=0.0)(**batch).loss.item() == pytest.approx(trl_loss.item(), rel=1e-12)


def test_mixed_loss_weights_equal_combo():
    """TRL's loss_type list with loss_weights (InternVL's Mixed PO) equals ``combo``."""
    batch = _batch(4)
    parts = {"dpo": 0.8, "bco_pair": 0.2, "sft": 1.0}
    trl_loss, _ = _run_trl(batch, ["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.1)
    ours = losses.get("combo", parts=parts, beta=0.1)(**batch)
    assert ours.loss.item() == pytest.approx(trl_loss.item(), rel=1e-9)


def test_simpo_and_cpo_equal_trl_cpo_trainer():
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    batch = _batch(5)
    for loss_type, name, hparams in [
        ("simpo", "simpo", {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.1}),
        ("sigmoid", "cpo", {"beta": 0.1, "alpha": 0.0, "label_smoothing": 0.2}),
    ]:
        stub = SimpleNamespace(
            alpha=0.0,
            loss_type=loss_type,
            beta=hparams["beta"],
            simpo_gamma=hparams.get("gamma"),
            label_smoothing=hparams["label_smoothing"],
            accelerator=_Accelerator(),
        )
        chosen, rejected = batch["policy_chosen_logps"], batch["policy_rejected_logps"]
        if loss_type == "simpo":  # the CPO trainer averages log-probs for simpo
            chosen, rejected = chosen / batch["chosen_lengths"], rejected / batch["rejected_lengths"]
        trl_losses, trl_chosen_rewards, _ = cpo.CPOTrainer.cpo_loss(stub, chosen, rejected)
        ours = losses.get(name, **hparams)(**batch)
        assert ours.per_example.tolist() == pytest.approx(trl_losses.tolist(), rel=1e-9)
        assert ours.metrics["rewards/chosen"].item() == pytest.approx(trl_chosen_rewards.mean().item(), rel=1e-9)


def test_orpo_equals_trl_orpo_trainer():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    batch = _batch(6)
    chosen = batch["policy_chosen_logps"] / batch["chosen_lengths"]
    rejected = batch["policy_rejected_logps"] / batch["rejected_lengths"]
    stub = SimpleNamespace(beta=0.1, accelerator=_Accelerator())
    trl_losses, _, _, log_odds_ratio, log_odds_chosen = orpo.ORPOTrainer.odds_ratio_loss(stub, chosen, rejected)
    ours = losses.get("orpo", beta=0.1)(**batch)
    nll = losses.get("sft")(**batch).loss  # TRL's policy_nll_loss: token-mean CE over chosen tokens
    assert ours.loss.item() == pytest.approx((nll - trl_losses.mean()).item(), rel=1e-6)
    assert ours.metrics["log_odds_ratio"].item() == pytest.approx(log_odds_ratio.item(), rel=1e-6)
    assert ours.metrics["log_odds_chosen"].item() == pytest.approx(log_odds_chosen.item(), rel=1e-6)
