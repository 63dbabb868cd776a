"""Property-based tests (hypothesis) of the loss zoo: finiteness, ranges, monotonicity, swap laws and dtypes on
random batches of finite float64 log-probs in [-200, -0.01], lengths in [1, 64] and β in (0.01, 5). Group losses
(kind "group") get [G, K] groups: G in [1, 6] prompts, K in [2, 6] samples each, rewards in [-10, 10]. Token losses
(kind "token", the GRPO family) get [N, T] per-token batches: N in [1, 6] completions of 0..T tokens, T in [1, 8],
per-token log-probs in [-20, -0.01] (log-ratios within ±20, where e^x stays finite in float32), advantages in
[-10, 10]. Unpaired losses (kind "unpaired", KTO's family) get N in [1, 8] labelled completions (any mix of desirable
and undesirable, one side possibly empty) and M in [1, 8] mismatched pairs, summed log-probs in [-200, -0.01]. Reward
losses (kind "reward") get B in [1, 8] pairs of a reward model's scores in [-50, 50] and margins in [0, 10].

Every law is read off the formula in the loss's docstring; ``Δ = ρ_w − ρ_l``, ``ρ = S_θ − S_ref``, ``z = βΔ``.
Tolerances are absolute 1e-9 in float64 unless a comment says why a law is exact or needs more.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import losses

from ._inputs import config_hparams

NAMES = losses.available()
ATOL = 1e-9
LN2 = math.log(2.0)
# exp(x) is +inf in float64 beyond this (log of the largest double)
EXP_OVERFLOW_F64 = math.log(torch.finfo(torch.float64).max)

LOGPS = st.floats(min_value=-200.0, max_value=-0.01, allow_nan=False, allow_infinity=False)
LENGTHS = st.integers(min_value=1, max_value=64)
BETAS = st.floats(min_value=0.01, max_value=5.0, exclude_min=True, exclude_max=True)
HALF_OPEN_EPS = st.floats(min_value=0.0, max_value=0.5, exclude_max=True)  # cdpo / robust / simpo / aot: [0, 0.5)
EXO_EPS = st.floats(min_value=1e-6, max_value=1 - 1e-6)  # exo_pair: (0, 1)
AUX_REWARDS = st.floats(min_value=-5.0, max_value=5.0)  # z-normalised designer rewards
DELTAS = st.floats(min_value=1e-3, max_value=100.0)  # a positive increase of policy_chosen_logps
REWARDS = st.floats(min_value=-10.0, max_value=10.0)  # scalar rewards of sampled completions (group losses)
SCORES = st.floats(min_value=-50.0, max_value=50.0)  # a reward model's scores (reward losses)
MARGINS = st.floats(min_value=0.0, max_value=10.0)  # per-pair margins from the data (reward losses)
TOKEN_LOGPS = st.floats(min_value=-20.0, max_value=-0.01, allow_nan=False, allow_infinity=False)  # per token

FAST = settings(max_examples=20, deadline=None)
LAWS = settings(max_examples=30, deadline=None)

STANDARD = (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "chosen_lengths",
    "rejected_lengths",
)


# ------------------------------------------------------------------------------------------------------ strategies
def _column(draw, n: int, elements=LOGPS, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(draw(st.lists(elements, min_size=n, max_size=n)), dtype=dtype)


@st.composite
def batches(draw, lengths: bool = True, min_size: int = 1, max_size: int = 8) -> dict[str, torch.Tensor]:
    """The standard inputs: finite summed log-probs in [-200, -0.01] and (when ``lengths``) int64 lengths in [1, 64].
    Losses that take no lengths are tested without them: every drawn number costs generation time."""
    n = draw(st.integers(min_value=min_size, max_value=max_size))
    batch = {name: _column(draw, n) for name in STANDARD[:4]}
    if lengths:
        batch["chosen_lengths"] = _column(draw, n, LENGTHS, torch.int64)
        batch["rejected_lengths"] = _column(draw, n, LENGTHS, torch.int64)
    return batch


def _extra(draw, name: str, n: int) -> torch.Tensor:
    """A drawn value for a method-specific input (regularisation / SFT sets of their own size, aux rewards [B])."""
    if name.startswith("aux_rewards_"):
        return _column(draw, n, AUX_REWARDS)
    if name in ("reg_logps", "reg_ref_logps", "sft_logps", "reg_lengths", "sft_lengths"):
        size_key = "reg" if name.startswith("reg") else "sft"
        size = draw(st.shared(st.integers(min_value=1, max_value=6), key=size_key))
        return _column(draw, size, LENGTHS, torch.int64) if name.endswith("lengths") else _column(draw, size)
    raise KeyError(f"no strategy for extra input {name!r}: add one to tests/losses/test_properties.py")


@st.composite
def groups(draw, max_prompts: int = 6, max_samples: int = 6) -> dict[str, torch.Tensor]:
    """The group inputs, each [G, K]: summed log-probs in [-200, -0.01], rewards in [-10, 10], lengths in [1, 64]."""
    g = draw(st.integers(min_value=1, max_value=max_prompts))
    k = draw(st.integers(min_value=2, max_value=max_samples))
    return {
        "policy_logps": _column(draw, g * k).reshape(g, k),
        "ref_logps": _column(draw, g * k).reshape(g, k),
        "rewards": _column(draw, g * k, REWARDS).reshape(g, k),
        "lengths": _column(draw, g * k, LENGTHS, torch.int64).reshape(g, k),
    }


@st.composite
def token_batches(draw, max_completions: int = 6, max_tokens: int = 8) -> dict[str, torch.Tensor]:
    """The token inputs: policy / old / reference log-probs [N, T] in [-20, -0.01], a right-padded completion mask
    with 0..T tokens per row (an empty row is a completion TRL masked out), advantages and rewards [N] in [-10, 10]."""
    n = draw(st.integers(min_value=1, max_value=max_completions))
    t = draw(st.integers(min_value=1, max_value=max_tokens))
    lengths = torch.tensor(draw(st.lists(st.integers(min_value=0, max_value=t), min_size=n, max_size=n)))
    return {
        "policy_token_logps": _column(draw, n * t, TOKEN_LOGPS).reshape(n, t),
        "old_token_logps": _column(draw, n * t, TOKEN_LOGPS).reshape(n, t),
        "ref_token_logps": _column(draw, n * t, TOKEN_LOGPS).reshape(n, t),
        "completion_mask": (torch.arange(t)[None, :] < lengths[:, None]).long(),
        "advantages": _column(draw, n, REWARDS),
        "rewards": _column(draw, n, REWARDS),  # for losses that build their own advantages (reinforce_pp)
        "values": _column(draw, n * t, REWARDS).reshape(n, t),  # a critic's per-token values (ppo)
    }


@st.composite
def unpaired_batches(draw, max_rows: int = 8, max_pairs: int = 8) -> dict[str, torch.Tensor]:
    """The unpaired inputs: summed policy / reference log-probs [N] in [-200, -0.01] with labels [N] (all desirable,
    all undesirable or mixed), and the log-probs of M mismatched pairs [M] (M independent of N)."""
    n = draw(st.integers(min_value=1, max_value=max_rows))
    m = draw(st.integers(min_value=1, max_value=max_pairs))
    return {
        "policy_logps": _column(draw, n),
        "ref_logps": _column(draw, n),
        "labels": torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool),
        "policy_kl_logps": _column(draw, m),
        "ref_kl_logps": _column(draw, m),
    }


@st.composite
def reward_batches(draw, max_pairs: int = 8) -> dict[str, torch.Tensor]:
    """The reward inputs [B]: a reward model's chosen and rejected scores in [-50, 50], margins in [0, 10]."""
    n = draw(st.integers(min_value=1, max_value=max_pairs))
    return {
        "chosen_scores": _column(draw, n, SCORES),
        "rejected_scores": _column(draw, n, SCORES),
        "margins": _column(draw, n, MARGINS),
    }


@st.composite
def inputs_for(draw, loss: losses.BoundLoss) -> dict[str, torch.Tensor]:
    """Every input the bound loss requires or accepts (the way ``tests/losses/_inputs.make_inputs`` builds them)."""
    req = loss.requirements
    if req.kind in ("group", "token", "unpaired", "reward"):
        strategies = {"group": groups, "token": token_batches, "unpaired": unpaired_batches, "reward": reward_batches}
        batch = draw(strategies[req.kind]())
        return {k: v for k, v in batch.items() if k in req.inputs or k in req.optional_inputs}
    batch = draw(batches())
    wanted = set(req.inputs) | set(req.optional_inputs)
    inputs = {k: v for k, v in batch.items() if k in wanted or k.startswith("policy")}
    n = batch["policy_chosen_logps"].shape[0]
    for name in (*req.extras, *req.optional_extras):
        inputs[name] = _extra(draw, name, n)
    return inputs


@st.composite
def bound_losses(draw, name: str) -> losses.BoundLoss:
    """``losses.get(name, **conf/loss/NAME.yaml)``, with β replaced by a drawn value half of the time."""
    hparams = config_hparams(name)
    if "beta" in hparams and name != "mpo" and draw(st.booleans()):  # mpo's beta is a KL weight, checked below
        hparams["beta"] = draw(BETAS)
    return losses.get(name, **hparams)


# ---------------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module on one intra-op thread: on these 8-row batches torch's multi-threaded ``log_sigmoid`` costs
    milliseconds per call (thread wake-up), which would dominate the run time. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logratios(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        batch["policy_chosen_logps"] - batch["ref_chosen_logps"],
        batch["policy_rejected_logps"] - batch["ref_rejected_logps"],
    )


def _margin(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Δ, computed with the same float operations as the losses."""
    chosen, rejected = _logratios(batch)
    return chosen - rejected


def _swap(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Chosen and rejected exchanged (policy, reference and lengths)."""
    swapped = dict(batch)
    for a, b in (
        ("policy_chosen_logps", "policy_rejected_logps"),
        ("ref_chosen_logps", "ref_rejected_logps"),
        ("chosen_lengths", "rejected_lengths"),
    ):
        if a in batch:
            swapped[a], swapped[b] = batch[b], batch[a]
    return swapped


def _discopop_overflows(loss: losses.BoundLoss, inputs: dict[str, torch.Tensor]) -> bool:
    """Whether DiscoPOP's ``e^{−βΔ}`` is +inf for some row in the inputs' dtype (the formula itself overflows)."""
    z = loss.hparams["beta"] * _margin(inputs)
    return bool(torch.isinf(torch.exp(-z)).any())


def _call(loss: losses.BoundLoss, inputs: dict[str, torch.Tensor]) -> losses.LossOutput | None:
    """The loss's output; None only for DiscoPOP whose ``e^{−βΔ}`` overflows, which must raise ``NonFiniteError``."""
    if loss.name == "discopop" and _discopop_overflows(loss, inputs):
        with pytest.raises(losses.NonFiniteError, match="produced a non-finite loss from finite inputs"):
            loss(**inputs)
        return None
    return loss(**inputs)


def _per_example(name: str, batch: dict[str, torch.Tensor], **hparams) -> torch.Tensor:
    return losses.get(name, **hparams)(**batch).per_example


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape
    worst = (actual - expected).abs().max().item()
    assert worst <= atol, f"max abs error {worst:.3g} > {atol:g}\nactual   {actual}\nexpected {expected}"


# ------------------------------------------------------------------------------------------- every registered loss
@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.data())
def test_finite_inputs_give_finite_outputs(name, data):
    """Finite log-probs give a finite loss, per_example and metrics, with ``loss == per_example.mean()`` exactly —
    except DiscoPOP where ``e^{−βΔ}`` overflows, which raises ``NonFiniteError`` (never a silent NaN)."""
    loss = data.draw(bound_losses(name))
    inputs = data.draw(inputs_for(loss))
    out = _call(loss, inputs)
    if out is None:
        return
    assert torch.isfinite(out.loss), out.loss
    assert torch.isfinite(out.per_example).all(), out.per_example
    key = {
        "group": "policy_logps",
        "token": "policy_token_logps",
        "unpaired": "policy_logps",
        "reward": "chosen_scores",
    }.get(loss.requirements.kind, "policy_chosen_logps")
    rows = inputs[key].shape[:1]
    # one value per pair, per prompt for a group loss, per completion for a token or unpaired loss
    assert out.per_example.shape == rows
    assert out.loss.item() == out.per_example.mean().item()
    for key, value in out.metrics.items():
        assert torch.isfinite(value).all(), (key, value)
    if "rewards/accuracies" in out.metrics:
        assert 0.0 <= out.metrics["rewards/accuracies"].item() <= 1.0


def test_discopop_overflow_is_an_error_not_a_nan():
    """The one documented exception to finiteness: DiscoPOP's e^{−βΔ} for βΔ ≲ −709.8 in float64."""
    batch = {
        "policy_chosen_logps": torch.tensor([-200.0, -1.0], dtype=torch.float64),
        "policy_rejected_logps": torch.tensor([-0.01, -1.0], dtype=torch.float64),
        "ref_chosen_logps": torch.tensor([-0.01, -1.0], dtype=torch.float64),
        "ref_rejected_logps": torch.tensor([-200.0, -1.0], dtype=torch.float64),
    }
    loss = losses.get("discopop", beta=4.0)  # βΔ = 4 × (−399.98) ≈ −1600
    assert _discopop_overflows(loss, batch)
    with pytest.raises(losses.NonFiniteError, match=r"non-finite loss from finite inputs at rows \[0\]"):
        loss(**batch)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_float32_inputs_give_float32_outputs(name, data):
    """float32 log-probs give float32 ``loss``, ``per_example`` and floating metrics (DiscoPOP may overflow sooner,
    at βΔ ≲ −88.7, and then raises)."""
    loss = data.draw(bound_losses(name))
    inputs = {k: v.float() if v.is_floating_point() else v for k, v in data.draw(inputs_for(loss)).items()}
    out = _call(loss, inputs)
    if out is None:
        return
    assert out.loss.dtype == torch.float32
    assert out.per_example.dtype == torch.float32
    for key, value in out.metrics.items():
        if value.is_floating_point():
            assert value.dtype == torch.float32, (key, value.dtype)


# -------------------------------------------------------------------------------------------------- sign and range
NONNEGATIVE = {  # name -> strategy of its hyper-parameters (β drawn, plus every other knob in its valid range)
    "dpo": st.fixed_dictionaries({"beta": BETAS}),
    "cdpo": st.fixed_dictionaries({"beta": BETAS, "label_smoothing": HALF_OPEN_EPS}),
    "hinge": st.fixed_dictionaries({"beta": BETAS}),
    "ipo": st.fixed_dictionaries({"beta": BETAS, "length_normalize": st.booleans()}),
    "sppo_hard": st.fixed_dictionaries({"beta": BETAS}),
    "nca_pair": st.fixed_dictionaries({"beta": BETAS}),
    "bco_pair": st.fixed_dictionaries({"beta": BETAS}),
    "exo_pair": st.fixed_dictionaries({"beta": BETAS, "label_smoothing": EXO_EPS}),
    "simpo": st.fixed_dictionaries(
        {"beta": BETAS, "gamma": st.floats(min_value=0.0, max_value=5.0), "label_smoothing": HALF_OPEN_EPS}
    ),
    "discopop": st.fixed_dictionaries({"beta": BETAS, "tau": st.floats(min_value=0.01, max_value=1.0)}),
}


@pytest.mark.parametrize("name", sorted(NONNEGATIVE))
@FAST
@given(data=st.data())
def test_nonnegative_losses(name, data):
    """Sums of −log σ(·) ≥ 0, squares, hinges, e^{·} mixtures and a KL divergence (EXO) are ≥ 0 per example.
    (``robust`` is left out: its ε·log σ(−βΔ) term makes it negative for large βΔ.)"""
    loss = losses.get(name, **data.draw(NONNEGATIVE[name]))
    out = _call(loss, data.draw(batches(lengths=loss.requirements.needs_lengths)))
    if out is None:
        return
    # EXO is a KL divergence: exactly 0 where softmax(βρ) equals the label distribution, so allow rounding there.
    floor = -1e-12 if name == "exo_pair" else 0.0
    assert (out.per_example >= floor).all(), out.per_example


@pytest.mark.parametrize("name", ["apo_zero", "apo_down"])
@FAST
@given(beta=BETAS, batch=batches(lengths=False))
def test_apo_lies_in_0_2(name, beta, batch):
    """APO-zero (1 − σ(βρ_w)) + σ(βρ_l) and APO-down σ(βρ_w) + (1 − σ(βΔ)) are sums of two numbers in [0, 1]."""
    per_example = _per_example(name, batch, beta=beta)
    assert ((per_example >= 0) & (per_example <= 2)).all(), per_example


@FAST
@given(temperature=st.floats(min_value=0.01, max_value=10.0), batch=batches(lengths=False))
def test_mpo_preference_part_lies_in_minus_1_0(temperature, batch):
    """With the KL weight β = 0, MPO is its preference part alone: −σ(z/T) ∈ [−1, 0], z = ρ_w − ρ_l centred at the
    reference (default) or S_w − S_l (pair_center="none")."""
    out = losses.get("mpo", beta=0.0, temperature=temperature, pair_center="none")(**batch)
    assert ((out.per_example >= -1) & (out.per_example <= 0)).all(), out.per_example
    gap = batch["policy_chosen_logps"] - batch["policy_rejected_logps"]
    _close(out.per_example, -torch.sigmoid(gap / temperature))
    centred = losses.get("mpo", beta=0.0, temperature=temperature)(**batch)
    assert ((centred.per_example >= -1) & (centred.per_example <= 0)).all(), centred.per_example
    _close(centred.per_example, -torch.sigmoid(_margin(batch) / temperature))


@LAWS
@given(beta=BETAS, batch=batches(lengths=False))
def test_dpo_is_at_most_ln2_iff_the_margin_is_nonnegative(beta, batch):
    """−log σ(βΔ) ≤ ln 2 ⇔ Δ ≥ 0, per example. Where |βΔ| < 1e-13 the loss is ln 2 to within rounding, so there
    only ``|loss − ln 2| ≤ 1e-13`` is asserted."""
    per_example = _per_example("dpo", batch, beta=beta)
    z = beta * _margin(batch)
    clear = z.abs() >= 1e-13
    assert torch.equal((per_example <= LN2)[clear], (z >= 0)[clear]), (per_example, z)
    assert ((per_example[~clear] - LN2).abs() <= 1e-13).all()


# ----------------------------------------------------------------------------------------------------- monotonicity
def _raise_chosen(batch: dict[str, torch.Tensor], delta: float) -> dict[str, torch.Tensor]:
    return dict(batch, policy_chosen_logps=batch["policy_chosen_logps"] + delta)


@pytest.mark.parametrize("name", ["dpo", "hinge"])
@LAWS
@given(beta=BETAS, delta=DELTAS, batch=batches(lengths=False))
def test_raising_the_chosen_logp_never_increases_dpo_or_hinge(name, beta, delta, batch):
    """−log σ(βΔ) and max(0, 1 − βΔ) are non-increasing in Δ, so raising S_θ(y_w) never increases a row's loss."""
    before = _per_example(name, batch, beta=beta)
    after = _per_example(name, _raise_chosen(batch, delta), beta=beta)
    assert (after <= before).all(), (before, after)


@LAWS
@given(beta=BETAS, eps=HALF_OPEN_EPS, delta=DELTAS, batch=batches(lengths=False))
def test_cdpo_is_non_increasing_up_to_its_minimum(beta, eps, delta, batch):
    """cDPO −(1−ε) log σ(z) − ε log σ(−z) has derivative σ(z) − (1−ε) in z = βΔ: non-increasing only for
    z ≤ z* = log((1−ε)/ε) (everywhere when ε = 0), increasing beyond. So raising S_θ(y_w) never increases a row's
    loss while its new βΔ stays ≤ z*, and never decreases it once its old βΔ is ≥ z*. The derivative vanishes at
    z*, so 1e-12 is allowed for rounding there."""
    raised = _raise_chosen(batch, delta)
    before = _per_example("cdpo", batch, beta=beta, label_smoothing=eps)
    after = _per_example("cdpo", raised, beta=beta, label_smoothing=eps)
    z_star = math.inf if eps == 0 else math.log((1 - eps) / eps)
    below = beta * _margin(raised) <= z_star
    above = beta * _margin(batch) >= z_star
    assert (after[below] <= before[below] + 1e-12).all(), (before, after)
    assert (after[above] >= before[above] - 1e-12).all(), (before, after)


@LAWS
@given(beta=BETAS, delta=DELTAS, batch=batches(lengths=False))
def test_summed_ipo_is_non_increasing_below_its_target(beta, delta, batch):
    """IPO on summed log-probs (Δ − 1/(2β))² decreases in Δ up to the target 1/(2β): raising S_θ(y_w) never increases
    a row's loss while its new Δ stays ≤ 1/(2β)."""
    raised = _raise_chosen(batch, delta)
    before = _per_example("ipo", batch, beta=beta, length_normalize=False)
    after = _per_example("ipo", raised, beta=beta, length_normalize=False)
    below = _margin(raised) <= 1 / (2 * beta)
    assert (after[below] <= before[below]).all(), (before, after)


# --------------------------------------------------------------------------------------------------------- swap laws
@LAWS
@given(beta=BETAS, batch=batches(lengths=False))
def test_dpo_swap_law(beta, batch):
    """−log σ(−z) − (−log σ(z)) = z: swapping chosen and rejected raises each row's DPO loss by exactly βΔ."""
    diff = _per_example("dpo", _swap(batch), beta=beta) - _per_example("dpo", batch, beta=beta)
    _close(diff, beta * _margin(batch))


@LAWS
@given(beta=BETAS, batch=batches(lengths=False))
def test_hinge_swap_law(beta, batch):
    """Swapped, the hinge is max(0, 1 + βΔ); exact, since the swapped margin is −Δ bit for bit."""
    swapped = _per_example("hinge", _swap(batch), beta=beta)
    assert torch.equal(swapped, torch.relu(1 + beta * _margin(batch)))


@LAWS
@given(beta=BETAS, batch=batches(lengths=False))
def test_sppo_hard_swap_law(beta, batch):
    """Swapped, SPPO-hard is (ρ_l − 1/(2β))² + (ρ_w + 1/(2β))² (exact: the same float operations), which exceeds
    the unswapped loss by 2Δ/β (up to ~1e5 in size here, so 1e-9 absolute is ~1e-14 relative)."""
    rho_w, rho_l = _logratios(batch)
    target = 1 / (2 * beta)
    swapped = _per_example("sppo_hard", _swap(batch), beta=beta)
    assert torch.equal(swapped, (rho_l - target) ** 2 + (rho_w + target) ** 2)
    _close(swapped - _per_example("sppo_hard", batch, beta=beta), 2 * _margin(batch) / beta)


@LAWS
@given(beta=BETAS, eps=HALF_OPEN_EPS, batch=batches(lengths=False))
def test_cdpo_swap_law(beta, eps, batch):
    """cDPO with ε on swapped labels is the ε-mixture with the roles exchanged, i.e. smoothing 1 − ε on the original
    labels (which cdpo itself rejects, ε ∈ [0, 0.5)): (1−ε)·dpo(−z) + ε·dpo(z). The difference is (1 − 2ε)·βΔ."""
    dpo, dpo_swapped = _per_example("dpo", batch, beta=beta), _per_example("dpo", _swap(batch), beta=beta)
    cdpo = _per_example("cdpo", batch, beta=beta, label_smoothing=eps)
    cdpo_swapped = _per_example("cdpo", _swap(batch), beta=beta, label_smoothing=eps)
    _close(cdpo_swapped, (1 - eps) * dpo_swapped + eps * dpo)
    _close(cdpo_swapped - cdpo, (1 - 2 * eps) * beta * _margin(batch))


@LAWS
@given(beta=BETAS, eps=st.floats(min_value=0.0, max_value=0.45), batch=batches(lengths=False))
def test_robust_swap_law_and_unbiasedness(beta, eps, batch):
    """rDPO ℓ_ε(z) = [(1−ε)·dpo(z) − ε·dpo(−z)]/(1−2ε): swapping adds βΔ/(1−2ε), and it is unbiased under label
    flips, (1−ε)·ℓ_ε(z) + ε·ℓ_ε(−z) = dpo(z). ε ≤ 0.45 keeps 1/(1−2ε) ≤ 10 (values up to ~2e4: 1e-9 absolute)."""
    robust = _per_example("robust", batch, beta=beta, label_smoothing=eps)
    robust_swapped = _per_example("robust", _swap(batch), beta=beta, label_smoothing=eps)
    _close(robust_swapped - robust, beta * _margin(batch) / (1 - 2 * eps))
    _close((1 - eps) * robust + eps * robust_swapped, _per_example("dpo", batch, beta=beta))


@LAWS
@given(beta=BETAS, eps=EXO_EPS, batch=batches(lengths=False))
def test_exo_swap_law(beta, eps, batch):
    """EXO is KL(softmax(β[ρ_w, ρ_l]) ‖ [1−ε, ε]); swapping both the pair and the label distribution leaves the KL
    unchanged, so EXO with ε on swapped inputs equals EXO with 1 − ε (also valid, ε ∈ (0, 1)) on the original."""
    swapped = _per_example("exo_pair", _swap(batch), beta=beta, label_smoothing=eps)
    _close(swapped, _per_example("exo_pair", batch, beta=beta, label_smoothing=1 - eps))


# ------------------------------------------------------------------------------------------- group losses (rloo)
RLOO_HPARAMS = st.fixed_dictionaries(
    {
        "kl_coef": st.sampled_from([0.0, 0.05]) | st.floats(min_value=0.0, max_value=2.0),
        "kl_estimator": st.sampled_from(["k1", "k3"]),
        "aggregation": st.sampled_from(["token", "sequence"]),
        "normalize_advantages": st.booleans(),
    }
)


def _rloo_gradient(hparams: dict, batch: dict[str, torch.Tensor]) -> tuple[losses.LossOutput, torch.Tensor]:
    policy = batch["policy_logps"].clone().requires_grad_(True)
    out = losses.get("rloo", **hparams)(**dict(batch, policy_logps=policy))
    out.loss.backward()
    return out, policy.grad


def _rloo_advantages(hparams: dict, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The advantages from the formula in the docstring, with the mean form K/(K−1)·(r' − mean r')."""
    d = batch["policy_logps"] - batch["ref_logps"]
    kl = d if hparams["kl_estimator"] == "k1" else torch.exp(-d) - 1 + d
    shaped = batch["rewards"] - hparams["kl_coef"] * kl
    k = shaped.shape[1]
    advantages = k / (k - 1) * (shaped - shaped.mean(dim=1, keepdim=True))
    if hparams["normalize_advantages"]:
        advantages = advantages / (advantages.std() + 1e-8)
    return advantages


@LAWS
@given(hparams=RLOO_HPARAMS, batch=groups())
def test_rloo_gradient_is_minus_advantage_over_tokens(hparams, batch):
    """∇_{S_θ} L = −A/Σ|y| (token) or −A/(G·K·|y|) (sequence), A from the mean form of the baseline; the leave-one-out
    advantages sum to 0 in every group (before normalisation), and k3 makes objective/kl ≥ 0. β·k3 reaches 2·e^200
    where the policy is far below the reference (finite in float64), so the tolerances are relative."""
    out, grad = _rloo_gradient(hparams, batch)
    advantages = _rloo_advantages(hparams, batch)
    lengths = batch["lengths"].to(torch.float64)
    expected = -advantages / (lengths.sum() if hparams["aggregation"] == "token" else lengths * lengths.numel())
    assert torch.allclose(grad, expected, rtol=1e-9, atol=1e-12), (grad, expected)
    if not hparams["normalize_advantages"]:
        assert abs(out.metrics["advantages/mean"].item()) <= 1e-9 * (1 + advantages.abs().max().item())
    if hparams["kl_estimator"] == "k3":
        assert out.metrics["objective/kl"].item() >= 0.0


@LAWS
@given(hparams=RLOO_HPARAMS, batch=groups(), shift=st.floats(min_value=-100.0, max_value=100.0))
def test_rloo_gradient_ignores_a_constant_added_to_a_group(hparams, batch, shift):
    """Adding c_g to every reward of group g leaves the advantages, hence the gradient, unchanged (the baseline
    absorbs it): the reason a leave-one-out baseline reduces variance without bias."""
    g = batch["rewards"].shape[0]
    shifts = torch.linspace(-1.0, 1.0, g, dtype=torch.float64)[:, None] * shift
    _, before = _rloo_gradient(hparams, batch)
    _, after = _rloo_gradient(hparams, dict(batch, rewards=batch["rewards"] + shifts))
    scale = before.abs().max().item() + 1e-3
    assert torch.allclose(before, after, rtol=0, atol=1e-9 * scale * (1 + abs(shift))), (before, after)


@LAWS
@given(batch=groups(), aggregation=st.sampled_from(["token", "sequence"]), value=REWARDS)
def test_rloo_equal_rewards_and_no_kl_give_exactly_zero(batch, aggregation, value):
    """All rewards of every group equal and β = 0: every advantage is exactly 0, so the loss and gradient are 0."""
    flat = dict(batch, rewards=torch.full_like(batch["rewards"], value))
    out, grad = _rloo_gradient({"kl_coef": 0.0, "aggregation": aggregation}, flat)
    assert out.loss.item() == 0.0 and not grad.any()
    assert out.metrics["frac_reward_zero_std"].item() == 1.0
