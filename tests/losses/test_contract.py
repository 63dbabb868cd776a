"""The contract every registered loss keeps, run over the whole registry with its conf/loss defaults — so a new
loss is tested the moment it is registered. Pairwise losses (kind "pair") get pair batches ``[B]``; group losses
(kind "group", K samples per prompt) get ``[B, K]`` group batches, token losses (kind "token", the GRPO family)
``[B, T]`` per-token batches, and unpaired losses (kind "unpaired", KTO's family) ``[B]`` labelled completions with
``[B]`` mismatched pairs; each gets the same generic contract, plus the checks that only make sense for its kind."""

import pytest
import torch

import losses

from ._inputs import POLICY_INPUT, config_hparams, make_inputs

NAMES = losses.available()
KINDS = {name: losses.spec(name).kind for name in NAMES}
PAIR_NAMES = [n for n in NAMES if KINDS[n] == "pair"]
GROUP_NAMES = [n for n in NAMES if KINDS[n] == "group"]
TOKEN_NAMES = [n for n in NAMES if KINDS[n] == "token"]
UNPAIRED_NAMES = [n for n in NAMES if KINDS[n] == "unpaired"]
REWARD_NAMES = [n for n in NAMES if KINDS[n] == "reward"]
# TRL logs no log-prob metric from its GRPO loss; token losses are held to TRL's clip / KL metric names instead
# (test_token_trl_metrics).
LOGPS_METRICS = {
    "pair": ("logps/chosen", "logps/rejected"),
    "group": ("logps/policy",),
    "token": (),
    "unpaired": ("logps/chosen", "logps/rejected"),  # TRL KTOTrainer: mean S_θ of the desirable / undesirable rows
    "reward": (),  # a reward model's scores, not log-probs (test_reward_gradcheck, test_reward_metrics)
}


def test_every_loss_is_covered_by_its_kind():
    """No loss escapes the contract: each is pairwise, group, token, unpaired or reward, and each kind has its own
    checks below."""
    assert sorted(PAIR_NAMES + GROUP_NAMES + TOKEN_NAMES + UNPAIRED_NAMES + REWARD_NAMES) == NAMES
    assert set(KINDS.values()) <= set(POLICY_INPUT) == set(LOGPS_METRICS)


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
    for key in LOGPS_METRICS[KINDS[name]]:
        assert key in out.metrics


@pytest.mark.parametrize("name", PAIR_NAMES)
def test_trl_reward_metrics(name):
    loss = _loss(name)
    metrics = loss(**make_inputs(loss)).metrics
    if name != "sft":  # sft has no notion of reward
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(metrics)


@pytest.mark.parametrize("name", PAIR_NAMES)
def test_gradcheck(name):
    """Analytic gradients of every differentiable float input equal finite differences (float64). (A group loss is a
    policy-gradient surrogate with stop-gradient advantages, so finite differences of its value are not its gradient;
    see test_group_gradients_flow and tests/losses/test_policy_gradient.py.)"""
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


@pytest.mark.parametrize("name", GROUP_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_gradients_flow(name, dtype):
    """A group loss sends a finite, non-zero gradient of the input's shape and dtype to ``policy_logps``, and none
    to the rewards (a reward is a number from a reward model, not something the loss may move)."""
    loss = _loss(name)
    inputs = make_inputs(loss, seed=2, dtype=dtype)
    policy = inputs["policy_logps"].clone().requires_grad_(True)
    rewards = inputs["rewards"].clone().requires_grad_(True)
    out = loss(**dict(inputs, policy_logps=policy, rewards=rewards))
    out.loss.backward()
    assert policy.grad is not None and policy.grad.shape == policy.shape and policy.grad.dtype == dtype
    assert torch.isfinite(policy.grad).all() and policy.grad.abs().sum() > 0
    assert rewards.grad is None or not rewards.grad.any()


@pytest.mark.parametrize("name", TOKEN_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_gradients_flow(name, dtype):
    """A token loss sends a finite, non-zero gradient of the input's shape and dtype to ``policy_token_logps``, none
    to padding positions, and none to the advantages, the old or the reference log-probs (numbers computed before
    the step; a surrogate must not move them) or the rewards they are built from. β > 0 so the KL term is on the
    path too."""
    loss = losses.get(name, **{**_loss(name).hparams, "beta": 0.1})
    inputs = make_inputs(loss, seed=2, dtype=dtype)
    leaves = {
        k: inputs[k].clone().requires_grad_(True)
        for k in ("policy_token_logps", "old_token_logps", "ref_token_logps", "advantages", "rewards")
        if k in inputs  # every numeric input the loss declares
    }
    loss(**dict(inputs, **leaves)).loss.backward()
    grad = leaves["policy_token_logps"].grad
    assert grad is not None and grad.shape == inputs["policy_token_logps"].shape and grad.dtype == dtype
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert not grad[inputs["completion_mask"] == 0].any()
    assert {"old_token_logps", "ref_token_logps"} <= set(leaves) and len(leaves) == 4
    for key in set(leaves) - {"policy_token_logps"}:
        assert leaves[key].grad is None or not leaves[key].grad.any(), key


@pytest.mark.parametrize("name", TOKEN_NAMES)
def test_token_trl_metrics(name):
    """TRL's metric names from ``GRPOTrainer._compute_loss``: ``kl`` when β > 0, the clip ratios for the clipped
    variants, ``cispo_clip_ratio`` for CISPO; each a rate in [0, 1] (kl ≥ 0)."""
    clip = {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}
    clip |= {"clip_ratio/low_min", "clip_ratio/high_max"}
    returns = {"reinforce/return_mean", "reinforce/return_std"}  # REINFORCE++ (OpenRLHF), not a TRL loss
    ppo = {"policy/clipfrac", "policy/approxkl", "value/loss", "value/clipfrac", "ppo/return_mean"}
    ppo |= {"ppo/advantage_mean", "ppo/reward_mean"}  # TRL PPOTrainer's names where it has them, not GRPO's
    not_rates = returns | {"policy/approxkl", "value/loss", "ppo/return_mean", "ppo/advantage_mean", "ppo/reward_mean"}
    expected = {"cispo": {"cispo_clip_ratio"}, "sapo": set(), "reinforce_pp": clip | returns, "ppo": ppo}.get(
        name, clip
    )
    free = losses.get(name, **{**_loss(name).hparams, "beta": 0.0})
    assert set(free(**make_inputs(free)).metrics) == expected
    with_kl = losses.get(name, **{**free.hparams, "beta": 0.1})
    metrics = with_kl(**make_inputs(with_kl)).metrics
    assert set(metrics) == expected | {"kl"}
    assert metrics["kl"].item() >= 0.0 or with_kl.hparams.get("kl_estimator") == "k1"  # ppo's k1 is signed
    for key in expected - not_rates:  # rates
        assert 0.0 <= metrics[key].item() <= 1.0, key


@pytest.mark.parametrize("name", UNPAIRED_NAMES)
def test_unpaired_gradcheck(name):
    """Analytic gradients w.r.t. the policy's and the reference's log-probs equal finite differences (float64). (The
    KL inputs are left out: KTO's reference point is detached, so its analytic gradient is 0 by design; see
    test_unpaired_gradients_flow.)"""
    loss = _loss(name)
    inputs = make_inputs(loss, seed=1)
    rest = {k: v for k, v in inputs.items() if k not in ("policy_logps", "ref_logps")}

    def fn(policy, ref):
        return loss(policy_logps=policy, ref_logps=ref, **rest).loss

    tensors = tuple(inputs[k].clone().requires_grad_(True) for k in ("policy_logps", "ref_logps"))
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", UNPAIRED_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unpaired_gradients_flow(name, dtype):
    """An unpaired loss sends a finite gradient of the input's shape and dtype to ``policy_logps``, non-zero on every
    row (desirable and undesirable), and none to the mismatched pairs' log-probs (KTO's reference point is detached,
    as in the paper and TRL, which computes them without grad)."""
    loss = _loss(name)
    inputs = make_inputs(loss, seed=2, dtype=dtype)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if k.endswith("logps")}
    loss(**dict(inputs, **leaves)).loss.backward()
    grad = leaves["policy_logps"].grad
    assert grad is not None and grad.shape == inputs["policy_logps"].shape and grad.dtype == dtype
    assert torch.isfinite(grad).all() and (grad != 0).all()
    labels = inputs["labels"]
    assert (grad[labels] < 0).all() and (grad[~labels] > 0).all()  # raise desirable, lower undesirable likelihoods
    for key in ("policy_kl_logps", "ref_kl_logps"):
        assert key not in leaves or leaves[key].grad is None or not leaves[key].grad.any(), key


@pytest.mark.parametrize("name", UNPAIRED_NAMES)
def test_unpaired_trl_metrics(name):
    """TRL's metric names from ``KTOTrainer._compute_loss``: ``kl`` (≥ 0; TRL's constant 0 for a loss without a KL
    term), ``rewards/{chosen,rejected}`` and ``logps/{chosen,rejected}`` per side present in the batch,
    ``rewards/margins`` only when both are; and prefopt's ``rewards/accuracies`` (the fraction of rows on their
    label's side of the reference point), always."""
    loss = _loss(name)
    inputs = make_inputs(loss)
    metrics = loss(**inputs).metrics
    per_side = {"rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected"}
    assert set(metrics) == {"kl", "rewards/margins", "rewards/accuracies"} | per_side
    assert metrics["kl"].item() >= 0.0
    if "policy_kl_logps" not in loss.requirements.inputs:
        assert metrics["kl"].item() == 0.0
    assert metrics["rewards/margins"].item() == metrics["rewards/chosen"].item() - metrics["rewards/rejected"].item()
    for side, rows in (("chosen", inputs["labels"]), ("rejected", ~inputs["labels"])):
        assert metrics[f"logps/{side}"].item() == pytest.approx(inputs["policy_logps"][rows].mean().item(), abs=1e-12)
        one_side = {k: (v[rows] if k in ("policy_logps", "ref_logps", "labels") else v) for k, v in inputs.items()}
        assert set(loss(**one_side).metrics) == {"kl", f"rewards/{side}", f"logps/{side}", "rewards/accuracies"}


@pytest.mark.parametrize("name", REWARD_NAMES)
def test_reward_gradcheck(name):
    """Analytic gradients w.r.t. both scores equal finite differences (float64); margins, data, get none."""
    loss = _loss(name)
    inputs = make_inputs(loss, seed=1)
    rest = {k: v for k, v in inputs.items() if k not in ("chosen_scores", "rejected_scores")}

    def fn(chosen, rejected):
        return loss(chosen_scores=chosen, rejected_scores=rejected, **rest).loss

    tensors = tuple(inputs[k].clone().requires_grad_(True) for k in ("chosen_scores", "rejected_scores"))
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", REWARD_NAMES)
def test_reward_metrics(name):
    """TRL RewardTrainer's ``accuracy`` / ``margin`` / ``mean_reward`` and the zoo's ``rewards/*`` names."""
    loss = _loss(name)
    metrics = loss(**make_inputs(loss)).metrics
    assert {"accuracy", "margin", "mean_reward"} | {f"rewards/{k}" for k in ("chosen", "rejected")} <= set(metrics)
    assert 0.0 <= metrics["accuracy"].item() <= 1.0
    assert metrics["rewards/accuracies"].item() == metrics["accuracy"].item()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_is_reported(name, bad):
    key = POLICY_INPUT[KINDS[name]]
    loss = _loss(name)
    inputs = make_inputs(loss)
    inputs[key] = inputs[key].clone()
    inputs[key][3] = bad  # a whole row: one pair, or one prompt's K samples
    with pytest.raises(losses.NonFiniteError, match=rf"'{key}' is not finite at rows \[3\]"):
        loss(**inputs)


@pytest.mark.parametrize("name", GROUP_NAMES)
def test_nonfinite_reward_is_reported(name):
    loss = _loss(name)
    inputs = make_inputs(loss)
    inputs["rewards"] = inputs["rewards"].clone()
    inputs["rewards"][2, 1] = float("nan")
    with pytest.raises(losses.NonFiniteError, match=r"'rewards' is not finite at rows \[2\]"):
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
    """Per-example values of one row (a pair, or a prompt's group) do not depend on the other rows (except losses
    declared batch_dependent, and batch-level NLL terms, which are spread evenly and so shift every row alike)."""
    key = "policy_chosen_logps" if KINDS[name] == "pair" else POLICY_INPUT[KINDS[name]]
    loss = _loss(name)
    inputs = make_inputs(loss)
    full = loss(**inputs).per_example
    perturbed = dict(inputs)
    perturbed[key] = inputs[key].clone()
    perturbed[key][0] -= 1.0
    moved = loss(**perturbed).per_example
    shift = moved[1:] - full[1:]
    assert torch.allclose(shift, shift[0].expand_as(shift), atol=1e-12)
