"""KTO and unpaired APO-zero (kind "unpaired"): parity with TRL 1.16's own ``KTOTrainer`` code, golden values, the
KL reference point (detached, clamped at 0), one-sided batches, gradients, laws and input errors.

TRL parity calls ``KTOTrainer._compute_loss`` unbound on a bare ``KTOTrainer`` (``object.__new__``, no model, no
dataset). ``args`` is a real ``KTOConfig`` and the attributes ``_compute_loss`` reads are copied from it as
``KTOTrainer.__init__`` does. The policy (and, on the live-reference path, the reference model) is a stub whose
forward returns, for a batch row, a one-column ``log_probs`` holding the test's summed log-prob (two-token sequences:
TRL keeps the last ``seq_len = 1`` column and sums it, exactly that number); the first column of ``input_ids`` tells
the stub whether TRL asks for the matched rows (0) or the mismatched KL rows (1), the second which row. So every line
of TRL's row split, KL reference point, per-side losses, weighting, reduction and metrics runs as in training (one
process); only TRL's ``entropy``, ``logits/*`` and ``num_tokens`` metrics, which read the model's outputs, are left
out of the comparison. Skipped when trl is absent.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import losses

pytest.importorskip("trl.trainer.kto_trainer")
from trl import KTOConfig, KTOTrainer  # noqa: E402

F64 = torch.float64
LN3 = math.log(3.0)
MODEL_METRICS = {"entropy", "num_tokens", "logits/chosen", "logits/rejected"}  # need the model's outputs


# ------------------------------------------------------------------------------------------------- TRL, stubbed
class _Accelerator:
    """One process: ``gather_for_metrics`` is the identity (what accelerate does with a single process)."""

    device = torch.device("cpu")
    num_processes = 1

    @staticmethod
    def gather_for_metrics(tensor):
        return tensor


class _StubModel(torch.nn.Module):
    """A causal LM (in train mode, no parameters, not a PEFT model) whose forward returns the given summed log-probs:
    row ``r`` of ``input_ids = [[kind, r]]`` gets ``matched[r]`` (kind 0) or ``mismatched[r]`` (kind 1) as its
    one-column ``log_probs``."""

    def __init__(self, matched: torch.Tensor, mismatched: torch.Tensor | None):
        super().__init__()
        self.matched, self.mismatched = matched, mismatched
        self.is_gradient_checkpointing = False

    def forward(self, input_ids, attention_mask, labels, fused_lm_head, use_cache, **_):
        assert fused_lm_head and not use_cache and input_ids.shape[1] == 2
        assert (labels[:, 0] == -100).all()  # TRL masks the prompt token out of the completion labels
        kind, rows = input_ids[:, 0], input_ids[:, 1]
        assert (kind == kind[0]).all()
        values = (self.matched if kind[0] == 0 else self.mismatched).index_select(0, rows)
        zeros = torch.zeros(len(rows), 1, dtype=values.dtype)
        return SimpleNamespace(log_probs=values[:, None], entropy=zeros, mean_logits=zeros)


def _trl_trainer(loss_type: str, precompute: bool, **config) -> KTOTrainer:
    """A ``KTOTrainer`` without ``__init__``: a real ``KTOConfig`` and the attributes ``__init__`` derives from it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = KTOConfig(
            output_dir="unused", use_cpu=True, report_to=[], loss_type=loss_type,
            precompute_ref_log_probs=precompute, **config,
        )  # fmt: skip
    trainer = object.__new__(KTOTrainer)
    trainer.args = args
    # copied from KTOTrainer.__init__ (trl 1.16)
    trainer.beta = args.beta
    trainer.precompute_ref_logps = args.precompute_ref_log_probs
    trainer.loss_type = args.loss_type
    trainer.desirable_weight = args.desirable_weight
    trainer.undesirable_weight = args.undesirable_weight
    trainer.calculate_KL = args.loss_type not in ["apo_zero_unpaired"]
    trainer.aux_loss_enabled = False  # no MoE router
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    # what transformers' Trainer provides while training
    trainer.accelerator = _Accelerator()
    return trainer


def _run_trl(batch: dict, *, loss_type: str, reference: str = "precomputed", **config):
    """TRL 1.16 ``KTOTrainer._compute_loss`` on these summed log-probs; returns (loss, metrics). ``reference``:
    ``"precomputed"`` (TRL's ``precompute_ref_log_probs``: the batch carries ``ref_logps`` / ``ref_KL_logps``) or
    ``"model"`` (a live reference model, TRL's default)."""
    trainer = _trl_trainer(loss_type, reference == "precomputed", **config)
    policy, labels = batch["policy_logps"], batch["labels"]
    n = len(labels)
    kl = trainer.calculate_KL
    trainer.model = _StubModel(policy, batch["policy_kl_logps"] if kl else None)
    if reference == "model":
        trainer.ref_model = _StubModel(batch["ref_logps"], batch["ref_kl_logps"] if kl else None)
    inputs = {
        "input_ids": torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)], 1),
        "attention_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * n),
        "label": labels,
    }
    if reference == "precomputed":
        inputs["ref_logps"] = batch["ref_logps"]
    if kl:  # TRL's collator: one mismatched pair per row (M = N)
        m = len(batch["policy_kl_logps"])
        inputs["KL_input_ids"] = torch.stack([torch.ones(m, dtype=torch.long), torch.arange(m)], 1)
        inputs["KL_attention_mask"] = torch.ones(m, 2, dtype=torch.long)
        inputs["KL_completion_mask"] = torch.tensor([[0, 1]] * m)
        if reference == "precomputed":
            inputs["ref_KL_logps"] = batch["ref_kl_logps"]
    loss = KTOTrainer._compute_loss(trainer, trainer.model, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


# ---------------------------------------------------------------------------------------------------- inputs
LABELS = {
    "mixed": [True, False, True, True, False, True, False],  # 4 desirable, 3 undesirable
    "mostly_undesirable": [False, False, True, False, False],  # 1 desirable, 4 undesirable
    "no_undesirable": [True] * 5,
    "no_desirable": [False] * 4,
    "negative_kl": [False, True, True, False, True, True],  # the mismatched pairs' mean log-ratio is < 0
    "one_row": [True],
}


def _batch(case: str, seed: int = 0, dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    """Summed log-probs of completions of 5..60 tokens: reference ~ −U(5, 60), policy = reference + N(0, 5²) (so βρ
    spans the sigmoid for β = 0.1 and 0.5), and N mismatched pairs (TRL's M = N) whose policy − reference
    log-ratios average ~ +0.5 (z₀ > 0) — or ~ −2 for ``negative_kl`` (z₀ clamped to 0)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor(LABELS[case])
    n = len(labels)
    ref = -(5 + 55 * torch.rand(n, generator=gen, dtype=F64))
    policy = ref + 5 * torch.randn(n, generator=gen, dtype=F64)
    ref_kl = -(5 + 55 * torch.rand(n, generator=gen, dtype=F64))
    shift = -2.0 if case == "negative_kl" else 0.5
    policy_kl = ref_kl + shift + 0.5 * torch.randn(n, generator=gen, dtype=F64)
    batch = dict(policy_logps=policy, ref_logps=ref, labels=labels, policy_kl_logps=policy_kl, ref_kl_logps=ref_kl)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------- parity
HPARAMS = [{}, {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.75}]
PARITY = [
    (name, hparams, case, reference)
    for name in ("kto", "apo_zero_unpaired")
    for hparams in HPARAMS
    for case in LABELS
    for reference in ("precomputed", "model")
]


@pytest.mark.parametrize(
    ("name", "hparams", "case", "reference"),
    PARITY,
    ids=[f"{n}-{'default' if not h else 'tuned'}-{c}-{r}" for n, h, c, r in PARITY],
)
def test_equal_trl(name, hparams, case, reference):
    """Loss (within 1e-6; in fact ~1e-16), the gradient w.r.t. the policy's log-probs (within 1e-6) and every shared
    metric equal TRL's ``KTOTrainer._compute_loss`` (``loss_type=name``) on the same float64 log-probs — unequal
    sides, one side empty, a clamped KL point, one row — with the reference precomputed or from a live model. The
    unpaired APO loss is called with and without the KL inputs (a trainer's full unpaired batch: they are dropped,
    TRL computes no KL term for it)."""
    batch = _batch(case, seed=list(LABELS).index(case))
    trl_policy = batch["policy_logps"].clone().requires_grad_(True)
    trl_loss, trl_metrics = _run_trl(
        dict(batch, policy_logps=trl_policy), loss_type=name, reference=reference, **hparams
    )
    trl_loss.backward()

    policy = batch["policy_logps"].clone().requires_grad_(True)
    out = losses.get(name, **hparams)(**dict(batch, policy_logps=policy))
    out.loss.backward()

    assert abs(out.loss.item() - trl_loss.item()) <= 1e-6
    assert out.loss.item() == pytest.approx(trl_loss.item(), rel=1e-14, abs=1e-15)  # the same float operations
    assert (policy.grad - trl_policy.grad).abs().max().item() <= 1e-6
    assert torch.allclose(policy.grad, trl_policy.grad, rtol=1e-13, atol=1e-16)
    shared = {k: v for k, v in trl_metrics.items() if k not in MODEL_METRICS}
    assert set(out.metrics) == set(shared) | {"rewards/accuracies"}  # prefopt's own metric, not TRL's
    for key, value in shared.items():
        assert out.metrics[key].item() == pytest.approx(value, rel=1e-12, abs=1e-14), key
    if case == "negative_kl" or name == "apo_zero_unpaired":
        assert trl_metrics["kl"] == 0.0 and out.metrics["kl"].item() == 0.0
    elif name == "kto":
        assert trl_metrics["kl"] > 0.0
    if name == "apo_zero_unpaired":  # the KL inputs a trainer passes with every unpaired batch change nothing
        without_kl = {k: v for k, v in batch.items() if "_kl_" not in k}
        assert losses.get(name, **hparams)(**without_kl).loss.item() == out.loss.item()
        assert losses.apo_zero_unpaired_loss(**without_kl, **hparams).loss.item() == out.loss.item()


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("case", ["mixed", "no_desirable"])
def test_equal_trl_in_float32(name, case):
    """In float32 (TRL's usual log-prob dtype outside bf16) the loss, gradient and metrics agree within 1e-6."""
    batch = _batch(case, seed=3, dtype=torch.float32)
    trl_policy = batch["policy_logps"].clone().requires_grad_(True)
    trl_loss, trl_metrics = _run_trl(dict(batch, policy_logps=trl_policy), loss_type=name)
    trl_loss.backward()
    policy = batch["policy_logps"].clone().requires_grad_(True)
    out = losses.get(name)(**dict(batch, policy_logps=policy))
    out.loss.backward()
    assert out.loss.dtype == trl_loss.dtype == torch.float32
    assert abs(out.loss.item() - trl_loss.item()) <= 1e-6
    assert (policy.grad - trl_policy.grad).abs().max().item() <= 1e-6
    for key in set(trl_metrics) - MODEL_METRICS:
        assert out.metrics[key].item() == pytest.approx(trl_metrics[key], rel=1e-6, abs=1e-6), key


def test_half_precision_with_one_side_empty_keeps_the_dtype_where_trl_promotes():
    """The one dtype difference (module docstring): with bf16 log-probs and no undesirable row, TRL concatenates its
    float32 empty tensor for the missing side, so its loss is float32; here it stays bf16, with the same value to
    bf16 rounding. With both sides present both are bf16."""
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in _batch("no_undesirable").items()}
    trl_loss, _ = _run_trl(batch, loss_type="kto")
    out = losses.get("kto")(**batch)
    assert trl_loss.dtype == torch.float32 and out.loss.dtype == torch.bfloat16
    assert out.loss.item() == pytest.approx(trl_loss.item(), rel=1e-2)
    mixed = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in _batch("mixed").items()}
    assert _run_trl(mixed, loss_type="kto")[0].dtype == losses.get("kto")(**mixed).loss.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------- golden values
def _golden() -> dict[str, torch.Tensor]:
    """2 desirable rows + 1 undesirable, β = 0.5. Mismatched pairs' log-ratios 2, 0, 1 → mean 1 = z₀. Log-ratios
    ρ = 1 + 2 ln 3, 1, 1 − 2 ln 3 (policy −10 + ρ against reference −10)."""
    rho = torch.tensor([1 + 2 * LN3, 1.0, 1 - 2 * LN3], dtype=F64)
    return dict(
        policy_logps=(-10.0 + rho).requires_grad_(True),
        ref_logps=torch.full((3,), -10.0, dtype=F64),
        labels=torch.tensor([True, True, False]),
        policy_kl_logps=torch.tensor([-2.0, -5.0, -3.0], dtype=F64),
        ref_kl_logps=torch.tensor([-4.0, -5.0, -4.0], dtype=F64),
    )


def test_golden_kto():
    """β = 0.5, w_D = 1, w_U = 2, z₀ = mean(2, 0, 1) = 1; σ(ln 3) = 3/4, σ(0) = 1/2:

    row 0 (desirable):   β(ρ − z₀) = 0.5 · 2 ln 3 = ln 3    → ℓ = 1 · (1 − 3/4) = 0.25
    row 1 (desirable):   β(ρ − z₀) = 0                     → ℓ = 1 · (1 − 1/2) = 0.5
    row 2 (undesirable): β(z₀ − ρ) = 0.5 · 2 ln 3 = ln 3    → ℓ = 2 · (1 − 3/4) = 0.5
    L = (0.25 + 0.5 + 0.5) / 3 = 1.25 / 3 = 0.41666…

    Gradients, with σ' = σ(1 − σ) (3/16 at ln 3, 1/4 at 0), each divided by N = 3:
    row 0: −w_D β σ' = −0.5 · 3/16 = −3/32 → −1/32;  row 1: −0.5 · 1/4 = −1/8 → −1/24;
    row 2: +w_U β σ' = 2 · 0.5 · 3/16 = 3/16 → 1/16.
    Metrics: kl = 1; rewards/chosen = β · mean(1 + 2 ln 3, 1) = 0.5 (1 + ln 3); rewards/rejected = 0.5 (1 − 2 ln 3);
    rewards/margins = 1.5 ln 3; logps/chosen = mean(−9 + 2 ln 3, −9) = −9 + ln 3; logps/rejected = −9 − 2 ln 3.
    """
    batch = _golden()
    out = losses.get("kto", beta=0.5, undesirable_weight=2.0)(**batch)
    assert out.per_example.tolist() == pytest.approx([0.25, 0.5, 0.5], abs=1e-15)
    assert out.loss.item() == pytest.approx(1.25 / 3, abs=1e-15)
    expected = {
        "kl": 1.0,
        "rewards/chosen": 0.5 * (1 + LN3),
        "rewards/rejected": 0.5 * (1 - 2 * LN3),
        "rewards/margins": 1.5 * LN3,
        "logps/chosen": -9 + LN3,
        "logps/rejected": -9 - 2 * LN3,
        "rewards/accuracies": 2 / 3,  # ρ − z₀ = 2 ln 3 > 0 ✓, 0 (a tie) ✗, −2 ln 3 < 0 ✓
    }
    assert {k: v.item() for k, v in out.metrics.items()} == pytest.approx(expected, abs=1e-14)
    out.loss.backward()
    assert batch["policy_logps"].grad.tolist() == pytest.approx([-1 / 32, -1 / 24, 1 / 16], abs=1e-15)
    trl_loss, _ = _run_trl(_golden(), loss_type="kto", beta=0.5, undesirable_weight=2.0)  # and TRL agrees
    assert trl_loss.item() == pytest.approx(1.25 / 3, abs=1e-15)


def test_golden_apo_zero_unpaired():
    """The same rows without a reference point: APO sees ρ itself, so shifting every ρ by −1 reproduces KTO's
    golden losses: ρ = 2 ln 3, 0, −2 ln 3 → 1 − σ(ln 3) = 0.25, 1 − σ(0) = 0.5, w_U · σ(−ln 3) = 2 · 0.25 = 0.5."""
    batch = _golden()
    out = losses.get("apo_zero_unpaired", beta=0.5, undesirable_weight=2.0)(
        policy_logps=batch["policy_logps"] - 1.0, ref_logps=batch["ref_logps"], labels=batch["labels"]
    )
    assert out.per_example.tolist() == pytest.approx([0.25, 0.5, 0.5], abs=1e-15)
    assert out.loss.item() == pytest.approx(1.25 / 3, abs=1e-15)
    assert out.metrics["kl"].item() == 0.0


# -------------------------------------------------------------------------------------------- the KL reference point
def test_kl_point_is_detached():
    """No gradient reaches the mismatched pairs' log-probs (policy or reference), and the policy's gradient is the
    same whether or not they require grad: z₀ is a constant of the step (paper §3; TRL ``.detach()``)."""
    grads = []
    for track in (False, True):
        batch = _batch("mixed")
        policy = batch["policy_logps"].clone().requires_grad_(True)
        kl = {k: batch[k].clone().requires_grad_(track) for k in ("policy_kl_logps", "ref_kl_logps")}
        out = losses.get("kto")(**dict(batch, policy_logps=policy, **kl))
        assert not out.metrics["kl"].requires_grad
        out.loss.backward()
        assert kl["policy_kl_logps"].grad is None and kl["ref_kl_logps"].grad is None
        grads.append(policy.grad)
    assert torch.equal(grads[0], grads[1])
    point = losses.kl_reference_point(*(t.requires_grad_(True) for t in (torch.ones(2), torch.zeros(2))))
    assert not point.requires_grad and point.item() == 1.0


def test_negative_kl_mean_gives_zero():
    """A mismatched-pair mean log-ratio < 0 (policy below the reference there) is clamped to z₀ = 0 (the paper's
    max(0, ·); TRL ``.clamp(min=0)``), so KTO equals unpaired APO-zero (to rounding: 1 − σ(−x) vs σ(x))."""
    policy_kl, ref_kl = torch.tensor([-5.0, -3.0, -4.0], dtype=F64), torch.tensor([-4.0, -2.0, -4.0], dtype=F64)
    assert (policy_kl - ref_kl).mean().item() < 0
    assert losses.kl_reference_point(policy_kl, ref_kl).item() == 0.0
    batch = dict(_batch("mixed"), policy_kl_logps=policy_kl, ref_kl_logps=ref_kl)  # M = 3 ≠ N = 7 is fine
    kto = losses.get("kto", beta=0.5)(**batch)
    apo = losses.get("apo_zero_unpaired", beta=0.5)(**batch)
    assert kto.metrics["kl"].item() == 0.0
    assert torch.allclose(kto.per_example, apo.per_example, rtol=0, atol=1e-15)


def test_kl_point_is_the_mean_over_the_mismatched_pairs():
    """z₀ = mean of policy − reference over the M pairs (M need not equal N); raising it raises every desirable
    row's loss and lowers every undesirable row's (each row's value is relative to z₀)."""
    policy_kl, ref_kl = torch.tensor([-1.0, -2.0], dtype=F64), torch.tensor([-2.0, -5.0], dtype=F64)
    assert losses.kl_reference_point(policy_kl, ref_kl).item() == 2.0
    batch = _batch("mixed")
    low = losses.get("kto")(**batch).per_example
    high = losses.get("kto")(**dict(batch, policy_kl_logps=batch["policy_kl_logps"] + 3.0)).per_example
    labels = batch["labels"]
    assert (high[labels] > low[labels]).all() and (high[~labels] < low[~labels]).all()


# ----------------------------------------------------------------------------------------------- one-sided batches
@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("side", [True, False])
def test_one_sided_batch_is_the_mean_over_its_rows(name, side):
    """A batch with only desirable (or only undesirable) rows is the mean of that side's weighted losses, as TRL
    (which concatenates an empty tensor for the other side); the other side's metrics are absent, not NaN."""
    batch = _batch("mixed")
    rows = batch["labels"] == side
    one = {k: (v[rows] if k in ("policy_logps", "ref_logps", "labels") else v) for k, v in batch.items()}
    full = losses.get(name, desirable_weight=1.5, undesirable_weight=0.5)(**batch)
    out = losses.get(name, desirable_weight=1.5, undesirable_weight=0.5)(**one)
    assert torch.equal(out.per_example, full.per_example[rows])
    assert out.loss.item() == pytest.approx(full.per_example[rows].mean().item(), abs=1e-15)
    present = "chosen" if side else "rejected"
    assert set(out.metrics) == {"kl", f"rewards/{present}", f"logps/{present}", "rewards/accuracies"}


# ------------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("case", ["mixed", "no_undesirable", "no_desirable"])
def test_gradcheck(name, case):
    """Analytic gradients w.r.t. the policy's and the reference's log-probs equal finite differences (float64), with
    unequal weights and β = 0.5 so the sigmoids are far from linear."""
    batch = _batch(case, seed=4)
    loss = losses.get(name, beta=0.5, desirable_weight=1.33, undesirable_weight=0.75)
    rest = {k: v for k, v in batch.items() if k not in ("policy_logps", "ref_logps")}

    def fn(policy, ref):
        return loss(policy_logps=policy, ref_logps=ref, **rest).loss

    tensors = (batch["policy_logps"].clone().requires_grad_(True), batch["ref_logps"].clone().requires_grad_(True))
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-8, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------ laws
LOGPS = st.floats(min_value=-200.0, max_value=-0.01)
BETAS = st.floats(min_value=0.01, max_value=5.0)
WEIGHTS = st.floats(min_value=0.0, max_value=3.0)


@st.composite
def _unpaired(draw, max_rows: int = 8):
    n = draw(st.integers(min_value=1, max_value=max_rows))
    m = draw(st.integers(min_value=1, max_value=max_rows))

    def column(size):
        return torch.tensor(draw(st.lists(LOGPS, min_size=size, max_size=size)), dtype=F64)

    labels = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    return dict(
        policy_logps=column(n), ref_logps=column(n), labels=labels, policy_kl_logps=column(m), ref_kl_logps=column(m)
    )


@settings(max_examples=40, deadline=None)
@given(batch=_unpaired(), beta=BETAS, w_d=WEIGHTS, w_u=WEIGHTS, name=st.sampled_from(["kto", "apo_zero_unpaired"]))
def test_rows_lie_in_0_w_and_the_weights_scale_exactly(batch, beta, w_d, w_u, name):
    """Each row is its weight times 1 − σ(·) or σ(·), so in [0, w]; the weights multiply the unit-weight rows (bit
    for bit), and the loss is the mean over all rows."""
    out = losses.get(name, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)(**batch)
    unit = losses.get(name, beta=beta)(**batch).per_example
    weights = torch.where(batch["labels"], torch.tensor(w_d, dtype=F64), torch.tensor(w_u, dtype=F64))
    assert ((out.per_example >= 0) & (out.per_example <= weights)).all()
    assert torch.equal(out.per_example, weights * unit)
    assert out.loss.item() == out.per_example.mean().item()


@settings(max_examples=40, deadline=None)
@given(batch=_unpaired(), beta=BETAS, delta=st.floats(min_value=1e-3, max_value=50.0))
def test_raising_a_desirable_logp_never_hurts_and_an_undesirable_never_helps(batch, beta, delta):
    """KTO and APO are monotone in each row's S_θ: non-increasing for desirable, non-decreasing for undesirable rows
    (z₀ comes from the KL inputs, which do not move)."""
    for name in ("kto", "apo_zero_unpaired"):
        before = losses.get(name, beta=beta)(**batch).per_example
        after = losses.get(name, beta=beta)(**dict(batch, policy_logps=batch["policy_logps"] + delta)).per_example
        labels = batch["labels"]
        assert (after[labels] <= before[labels]).all() and (after[~labels] >= before[~labels]).all()


@settings(max_examples=40, deadline=None)
@given(batch=_unpaired(), beta=BETAS)
def test_kto_is_apo_shifted_by_the_reference_point(batch, beta):
    """KTO's rows are unpaired APO-zero's at ρ − z₀ (1 − σ(β(z₀ − ρ)) = σ(β(ρ − z₀)) for undesirable rows)."""
    z0 = losses.kl_reference_point(batch["policy_kl_logps"], batch["ref_kl_logps"])
    kto = losses.get("kto", beta=beta)(**batch)
    apo = losses.get("apo_zero_unpaired", beta=beta)(**dict(batch, policy_logps=batch["policy_logps"] - z0))
    assert kto.metrics["kl"].item() == z0.item() >= 0.0
    assert torch.allclose(kto.per_example, apo.per_example, rtol=0, atol=1e-12)


@st.composite
def _pairs(draw, max_pairs: int = 6) -> torch.Tensor:
    """[4, N]: policy chosen, policy rejected, reference chosen, reference rejected summed log-probs."""
    n = draw(st.integers(min_value=1, max_value=max_pairs))
    return torch.tensor(draw(st.lists(LOGPS, min_size=4 * n, max_size=4 * n)), dtype=F64).reshape(4, n)


@settings(max_examples=40, deadline=None)
@given(beta=BETAS, pairs=_pairs())
def test_apo_zero_unpaired_is_half_the_pairwise_apo_zero(beta, pairs):
    """The N chosen and N rejected completions of N pairs as 2N unpaired rows: (1/2N)[Σ(1 − σ(βρ_w)) + Σ σ(βρ_l)] =
    apo_zero / 2, and the metrics are the pairwise ones."""
    pw, pl, rw, rl = pairs
    paired = losses.get("apo_zero", beta=beta)(
        policy_chosen_logps=pw, policy_rejected_logps=pl, ref_chosen_logps=rw, ref_rejected_logps=rl
    )
    n = pw.shape[0]
    unpaired = losses.get("apo_zero_unpaired", beta=beta)(
        policy_logps=torch.cat([pw, pl]),
        ref_logps=torch.cat([rw, rl]),
        labels=torch.tensor([True] * n + [False] * n),
    )
    assert unpaired.loss.item() == pytest.approx(paired.loss.item() / 2, abs=1e-12)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert unpaired.metrics[key].item() == pytest.approx(paired.metrics[key].item(), abs=1e-9), key


# ---------------------------------------------------------------------------------------------------- input errors
def test_integer_labels_are_accepted_and_other_values_rejected():
    """0/1 labels (int or float) are the bool labels; a reward passed as a label (anything else) is an error."""
    batch = _batch("mixed")
    expected = losses.get("kto")(**batch).loss.item()
    for dtype in (torch.int64, F64):
        assert losses.get("kto")(**dict(batch, labels=batch["labels"].to(dtype))).loss.item() == expected
    with pytest.raises(losses.LossError, match="'labels' must be bool .True = desirable. or 0/1"):
        losses.get("kto")(**dict(batch, labels=batch["labels"].to(F64) * 0.7))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"policy_logps": torch.zeros(7, 1, dtype=F64)}, r"'policy_logps' must be 1-D, got shape \(7, 1\)"),
        ({"ref_logps": torch.zeros(6, dtype=F64)}, r"'ref_logps' has shape \(6,\), expected \(7,\)"),
        ({"labels": torch.ones(8, dtype=torch.bool)}, r"'labels' has shape \(8,\), expected \(7,\)"),
        ({"ref_kl_logps": torch.zeros(3, dtype=F64)}, r"'ref_kl_logps' has shape \(3,\), expected \(7,\)"),
        ({"policy_kl_logps": torch.zeros(0, dtype=F64)}, r"'policy_kl_logps' is empty"),
        (
            {"policy_logps": torch.zeros(0, dtype=F64), "ref_logps": torch.zeros(0, dtype=F64),
             "labels": torch.zeros(0, dtype=torch.bool)},
            r"loss 'kto': 'policy_logps' is empty .TRL's loss would be NaN.",
        ),
    ],
)  # fmt: skip
def test_shape_errors_name_the_input(change, message):
    with pytest.raises(losses.LossError, match=message):
        losses.get("kto")(**dict(_batch("mixed"), **change))


def test_nonfinite_kl_input_is_reported():
    batch = _batch("mixed")
    batch["ref_kl_logps"] = batch["ref_kl_logps"].clone()
    batch["ref_kl_logps"][2] = float("nan")
    with pytest.raises(losses.NonFiniteError, match=r"'ref_kl_logps' is not finite at rows \[2\]"):
        losses.get("kto")(**batch)
