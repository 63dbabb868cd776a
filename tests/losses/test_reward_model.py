"""The Bradley–Terry reward-model loss: hand-computed values and gradients, its limits, shape errors, and parity with
TRL 1.16 ``RewardTrainer.compute_loss`` run on the same scores (TRL's own code, on a stub trainer whose model returns
the scores as its logits)."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import losses

F64 = torch.float64


def _golden():
    """r_w = (2, 0, −1), r_l = (0, 0, 1), m = (0.5, 0, 0)."""
    return dict(
        chosen_scores=torch.tensor([2.0, 0.0, -1.0], dtype=F64),
        rejected_scores=torch.tensor([0.0, 0.0, 1.0], dtype=F64),
        margins=torch.tensor([0.5, 0.0, 0.0], dtype=F64),
    )


def test_golden_values_by_hand():
    """ℓ = −log σ(r_w − r_l − m) + c(r_w + r_l)², c = 0.01: log(1 + e^−1.5) + 0.04, ln 2, log(1 + e²)."""
    out = losses.get("bradley_terry", center_rewards_coefficient=0.01)(**_golden())
    expected = [0.2014132779827524 + 0.04, 0.6931471805599453, 2.1269280110429727]
    assert out.per_example.tolist() == pytest.approx(expected, abs=1e-12)
    assert out.loss.item() == pytest.approx(1.0204961565285569, abs=1e-12)
    assert out.metrics["accuracy"].item() == pytest.approx(1 / 3)  # strict: the tied pair does not count
    assert out.metrics["margin"].item() == pytest.approx(0.0)  # (2 + 0 − 2) / 3: margins of the data do not enter
    assert out.metrics["mean_reward"].item() == pytest.approx(2 / 6)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(1 / 3)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(1 / 3)


def test_gradients_by_hand():
    """∂L/∂r_w = (−(1 − σ(z)) + 2c(r_w + r_l))/B and ∂L/∂r_l = ((1 − σ(z)) + 2c(r_w + r_l))/B, z = r_w − r_l − m."""
    batch = _golden()
    chosen = batch["chosen_scores"].clone().requires_grad_(True)
    rejected = batch["rejected_scores"].clone().requires_grad_(True)
    losses.bradley_terry_loss(chosen, rejected, batch["margins"], center_rewards_coefficient=0.01).loss.backward()
    one_minus_sigma = [1 - 1 / (1 + math.exp(-z)) for z in (1.5, 0.0, -2.0)]
    center = [0.02 * s for s in (2.0, 0.0, 0.0)]
    pairs = list(zip(one_minus_sigma, center, strict=True))
    assert chosen.grad.tolist() == pytest.approx([(-g + c) / 3 for g, c in pairs], abs=1e-12)
    assert rejected.grad.tolist() == pytest.approx([(g + c) / 3 for g, c in pairs], abs=1e-12)


def test_limits():
    """Equal scores and no margin: ln 2 per pair whatever the score (with c = 0); a margin m on equal scores is
    log(1 + e^m); shifting every score by a constant changes nothing without centering and is penalised with it."""
    bt = losses.get("bradley_terry")
    scores = torch.tensor([-3.0, 0.0, 5.0], dtype=F64)
    assert bt(chosen_scores=scores, rejected_scores=scores).per_example.tolist() == pytest.approx([math.log(2)] * 3)
    margin = torch.full((3,), 1.0, dtype=F64)
    out = bt(chosen_scores=scores, rejected_scores=scores, margins=margin)
    assert out.loss.item() == pytest.approx(math.log1p(math.e))
    batch = _golden()
    shifted = {k: v + 7.0 if k.endswith("scores") else v for k, v in batch.items()}
    assert bt(**shifted).loss.item() == pytest.approx(bt(**batch).loss.item(), abs=1e-12)
    centered = losses.get("bradley_terry", center_rewards_coefficient=0.1)
    assert centered(**shifted).loss.item() > centered(**batch).loss.item()


def test_shapes_and_checks():
    bt = losses.get("bradley_terry")
    with pytest.raises(losses.LossError, match=r"'chosen_scores' must be 1-D \[B\], got shape \(3, 1\)"):
        bt(chosen_scores=torch.zeros(3, 1), rejected_scores=torch.zeros(3, 1))
    with pytest.raises(losses.LossError, match=r"'margins' has shape \(2,\), expected \(3,\)"):
        bt(chosen_scores=torch.zeros(3), rejected_scores=torch.zeros(3), margins=torch.zeros(2))
    with pytest.raises(losses.HyperParameterError, match="center_rewards_coefficient must be a finite number >= 0"):
        losses.get("bradley_terry", center_rewards_coefficient=-0.1)
    req = losses.get("bradley_terry").requirements
    assert req.kind == "reward" and not req.needs_reference and req.optional_inputs == ("margins",)


# ----------------------------------------------------------------------------------------------------- TRL parity
trl_reward = pytest.importorskip("trl.trainer.reward_trainer")


class _Accelerator:
    @staticmethod
    def gather(t):
        return t

    @staticmethod
    def gather_for_metrics(t):
        return t


def _run_trl(chosen, rejected, margins, center):
    """TRL 1.16 ``RewardTrainer.compute_loss`` (unbound, on a stub trainer) with a model whose logits are
    ``[r_w; r_l]`` ``[2B, 1]``; returns (loss, metrics)."""
    logits = torch.cat([chosen, rejected])[:, None]
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(center_rewards_coefficient=center),
        accelerator=_Accelerator(),
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros(2 * len(chosen), 4, dtype=torch.long)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if margins is not None:
        inputs["margin"] = margins

    def model(**_):
        return SimpleNamespace(logits=logits)

    loss = trl_reward.RewardTrainer.compute_loss(stub, model, inputs)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("center", [None, 0.01, 0.5])
@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_trl_reward_trainer(center, with_margin, seed):
    """Loss, both gradients and TRL's accuracy / margin / mean_reward metrics, on the same scores."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 7, generator=gen, dtype=F64) * 2
    margins = torch.rand(7, generator=gen, dtype=F64) if with_margin else None
    ours_in = [scores[i].clone().requires_grad_(True) for i in range(2)]
    theirs_in = [scores[i].clone().requires_grad_(True) for i in range(2)]
    bt = losses.get("bradley_terry", center_rewards_coefficient=center)
    ours = bt(chosen_scores=ours_in[0], rejected_scores=ours_in[1], **({"margins": margins} if with_margin else {}))
    theirs, metrics = _run_trl(*theirs_in, margins, center)
    torch.testing.assert_close(ours.loss, theirs, rtol=0, atol=1e-12)
    ours.loss.backward()
    theirs.backward()
    for mine, trl in zip(ours_in, theirs_in, strict=True):
        torch.testing.assert_close(mine.grad, trl.grad, rtol=0, atol=1e-12)
    for key in ("accuracy", "margin", "mean_reward"):  # TRL casts the accuracy to float32
        assert ours.metrics[key].item() == pytest.approx(metrics[key], abs=1e-7), key
