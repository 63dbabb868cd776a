"""The contract every registered loss keeps, run over the whole registry with its conf/loss defaults — so a new
loss is tested the moment it is registered."""

import pytest
import torch

import losses

from ._inputs import config_hparams, make_inputs

NAMES = losses.available()


def _loss(name: str) -> losses.BoundLoss:
    return losses.get(name, **config_hparams(name))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_dtype_and_mean(name, dtype):
    loss = _loss(name)
    out = loss(**make_inputs(loss, dtype=dtype))
    assert out.loss.dim() == 0 and out.loss.dtype == dtype and torch.isfinite(out.loss)
    assert out.per_example.shape == (5,) and out.per_example.dtype == dtype
    assert out.loss.item() == pytest.approx(
        out.per_example.mean().item(), rel=1e-5 if dtype == torch.float32 else 1e-12
    )
    for key, value in out.metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, key
        assert not value.requires_grad, key
        assert torch.isfinite(value), key
    for key in ("logps/chosen", "logps/rejected"):
        assert key in out.metrics


@pytest.mark.parametrize("name", NAMES)
def test_trl_reward_metrics(name):
    loss = _loss(name)
    metrics = loss(**make_inputs(loss)).metrics
    if name != "sft":  # sft has no notion of reward
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(metrics)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name):
    """Analytic gradients of every differentiable float input equal finite differences (float64)."""
    loss = _loss(name)
    inputs = make_inputs(loss, seed=1)
    wrt = [
        k
        for k, v in inputs.items()
        if v.is_floating_point() and k.endswith("logps") and not k.startswith("ref") and k != "reg_ref_logps"
    ]
    rest = {k: v for k, v in inputs.items() if k not in wrt}

    def fn(*tensors):
        return loss(**rest, **dict(zip(wrt, tensors, strict=True))).loss

    tensors = tuple(inputs[k].clone().requires_grad_(True) for k in wrt)
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_is_reported(name, bad):
    loss = _loss(name)
    inputs = make_inputs(loss)
    inputs["policy_rejected_logps"] = inputs["policy_rejected_logps"].clone()
    inputs["policy_rejected_logps"][3] = bad
    with pytest.raises(losses.NonFiniteError, match=r"'policy_rejected_logps' is not finite at rows \[3\]"):
        loss(**inputs)


def test_nonfinite_output_from_finite_inputs_is_reported(golden_batch):
    """DiscoPOP's e^{−βΔ} overflows when the policy strongly prefers the loser (TRL does not clamp either)."""
    batch = dict(golden_batch)
    batch["policy_rejected_logps"] = batch["policy_rejected_logps"].float() + torch.tensor([0.0, 3000.0, 0.0])
    batch = {k: (v.float() if v.is_floating_point() else v) for k, v in batch.items()}
    with pytest.raises(losses.NonFiniteError, match=r"produced a non-finite loss from finite inputs at rows \[1\]"):
        losses.get("discopop")(**batch)


def test_finite_checks_can_be_disabled(golden_batch):
    batch = dict(golden_batch, policy_chosen_logps=torch.full((3,), float("nan"), dtype=torch.float64))
    losses.set_finite_checks(False)
    try:
        assert torch.isnan(losses.get("dpo")(**batch).loss)
    finally:
        losses.set_finite_checks(True)


@pytest.mark.parametrize("name", [n for n in NAMES if not losses.spec(n).batch_dependent])
def test_rows_are_independent_unless_declared(name):
    """Per-example values of one row do not depend on the other rows (except losses declared batch_dependent,
    and batch-level NLL terms, which are spread evenly and so shift every row alike)."""
    loss = _loss(name)
    inputs = make_inputs(loss)
    full = loss(**inputs).per_example
    perturbed = dict(inputs)
    perturbed["policy_chosen_logps"] = inputs["policy_chosen_logps"].clone()
    perturbed["policy_chosen_logps"][0] -= 1.0
    moved = loss(**perturbed).per_example
    shift = moved[1:] - full[1:]
    assert torch.allclose(shift, shift[0].expand_as(shift), atol=1e-12)
