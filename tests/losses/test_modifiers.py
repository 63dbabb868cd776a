"""The DPO modifiers (WPO, LD-DPO, f-DPO): TRL 1.16 parity through its own ``DPOTrainer._compute_loss`` on per-token
log-probs, hand-computed values, gradients (gradcheck in float64), declarations and one-line refusals."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import losses
from losses import modifiers

B, T = 6, 12


# ------------------------------------------------------------------------------------------------ hand-computed
def _golden_pair(**extra):
    """One pair: chosen tokens [-1, -2, -3], rejected [-2, -2]; reference [-1.5] x 3 and [-1, -1];
    Σ_t log Σ_v p² = -0.5 per chosen token, -1 per rejected token. Shared length 2."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return dict(
        policy_chosen_logps=t(-6.0),
        policy_rejected_logps=t(-4.0),
        ref_chosen_logps=t(-4.5),
        ref_rejected_logps=t(-2.0),
        chosen_lengths=torch.tensor([3]),
        rejected_lengths=torch.tensor([2]),
        policy_chosen_shared_logps=t(-3.0),
        policy_rejected_shared_logps=t(-4.0),
        ref_chosen_shared_logps=t(-3.0),
        ref_rejected_shared_logps=t(-2.0),
        policy_chosen_log_sum_sq_probs=t(-1.5),
        policy_rejected_log_sum_sq_probs=t(-2.0),
        **extra,
    )


# ρ_w = -6 + 4.5 = -1.5, ρ_l = -4 + 2 = -2, Δ = 0.5; β = 1: DPO = log(1 + e^{-0.5}) = 0.474077
GOLDEN = [
    ({}, 0.4740770),
    # LD α = 0.5: S_w = -3 + 0.5·(-3) = -4.5, S_ref,w = -3 + 0.5·(-1.5) = -3.75 (rejected has no tail): Δ = 1.25
    ({"ld_alpha": 0.5}, math.log1p(math.exp(-1.25))),  # 0.251929
    # LD α = 0: both cut to 2 tokens: ρ_w = -3 + 3 = 0, Δ = 2
    ({"ld_alpha": 0.0}, math.log1p(math.exp(-2.0))),  # 0.126928
    # forward KL: 1 − e^{1.5} = −3.481689, 1 − e^{2} = −6.389056: Δ = 2.907367
    ({"f_divergence_type": "forward_kl"}, 0.0531799),
    # JS: log 2 + log σ(−1.5) = −1.008266, log 2 + log σ(−2) = −1.433781: Δ = 0.425515
    ({"f_divergence_type": "js_divergence"}, 0.5028539),
    # α = 0.5: (e^{0.75} − 1)/(−0.5) = −2.234000, (e^{1} − 1)/(−0.5) = −3.436564: Δ = 1.202564
    ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5}, 0.2626896),
    ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0}, 0.4740770),  # the reverse-KL limit
    # WPO: w_w = exp((−6 + 1.5)/3) = e^{−1.5}, w_l = exp((−4 + 2)/2) = e^{−1}: 0.474077 · 0.082085
    ({"use_weighting": True}, 0.0389146),
]


@pytest.mark.parametrize(("settings", "expected"), GOLDEN, ids=[str(g[0]) for g in GOLDEN])
def test_dpo_modifiers_hand_computed(settings, expected):
    out = losses.get("dpo", beta=1.0, **settings)(**_golden_pair())
    assert out.loss.item() == pytest.approx(expected, abs=1e-7)


def test_modifiers_compose_by_hand():
    """LD α = 0.5 then JS then WPO (weights from the raw sums): ρ_w = −0.75, ρ_l = −2."""
    js = lambda r: math.log(2) + math.log(1 / (1 + math.exp(-r)))  # noqa: E731
    expected = math.log1p(math.exp(-(js(-0.75) - js(-2.0)))) * math.exp(-1.5) * math.exp(-1.0)
    settings = dict(ld_alpha=0.5, f_divergence_type="js_divergence", use_weighting=True)
    out = losses.get("dpo", beta=1.0, **settings)(**_golden_pair())
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(-0.75)  # β·ρ of the LD log-probs, not the scores
    assert out.metrics["wpo/weight"].item() == pytest.approx(math.exp(-2.5))


def test_plain_functions_take_the_modifiers():
    """The registered plain function applies them too, with the same value as the bound loss."""
    batch = _golden_pair()
    bound = losses.get("ipo", beta=0.5, ld_alpha=0.3, f_divergence_type="forward_kl")(**batch)
    plain = losses.ipo_loss(**batch, beta=0.5, ld_alpha=0.3, f_divergence_type="forward_kl")
    assert plain.loss.item() == bound.loss.item()


def test_limits_equal_the_plain_loss():
    """ld_alpha = 1 and equal lengths change nothing; nor does reverse_kl; WPO weights of 1 change nothing."""
    batch = _batch(0)
    plain = losses.get("robust", label_smoothing=0.2)(**batch).loss.item()
    for settings in ({"ld_alpha": 1.0}, {"f_divergence_type": "reverse_kl"}):
        assert losses.get("robust", label_smoothing=0.2, **settings)(**batch).loss.item() == pytest.approx(plain)
    equal = {**batch, "rejected_lengths": batch["chosen_lengths"]}
    equal["policy_rejected_shared_logps"] = equal["policy_rejected_logps"]
    equal["ref_rejected_shared_logps"] = equal["ref_rejected_logps"]
    equal["policy_chosen_shared_logps"] = equal["policy_chosen_logps"]
    equal["ref_chosen_shared_logps"] = equal["ref_chosen_logps"]
    ld = losses.get("dpo", ld_alpha=0.2)(**equal).loss.item()
    assert ld == pytest.approx(losses.get("dpo")(**equal).loss.item(), rel=1e-12)
    ones = {**batch}
    ones["policy_chosen_log_sum_sq_probs"] = ones["policy_chosen_logps"]
    ones["policy_rejected_log_sum_sq_probs"] = ones["policy_rejected_logps"]
    assert losses.get("hinge", use_weighting=True)(**ones).loss.item() == pytest.approx(
        losses.get("hinge")(**ones).loss.item(), rel=1e-12
    )


# --------------------------------------------------------------------------------------------------- gradients
GRAD_CASES = [
    ("dpo", {"ld_alpha": 0.4}),
    ("dpo", {"f_divergence_type": "forward_kl"}),
    ("dpo", {"f_divergence_type": "js_divergence"}),
    ("dpo", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    ("ipo", {"f_divergence_type": "js_divergence", "ld_alpha": 0.5}),
    ("sigmoid_norm", {"f_divergence_type": "forward_kl", "use_weighting": True}),
    ("nca_pair", {"use_weighting": True, "ld_alpha": 0.7}),
    ("simpo", {"ld_alpha": 0.5, "use_weighting": True}),
]


@pytest.mark.parametrize(("name", "settings"), GRAD_CASES, ids=[f"{c[0]}-{c[1]}" for c in GRAD_CASES])
def test_gradcheck(name, settings):
    """float64 gradcheck through the policy's summed and shared log-probs. WPO's weights are detached (as TRL), so
    Σ log Σ p² moves with the summed log-probs here: the weights stay constant, and the check sees their detach."""
    batch = _batch(1)
    loss = losses.get(name, **settings)
    keys = ("policy_chosen_logps", "policy_rejected_logps", *modifiers.LD_POLICY_INPUTS)
    start = tuple(batch[k].clone().requires_grad_(True) for k in keys)

    def fn(*values):
        inputs = {**batch, **dict(zip(keys, values, strict=True))}
        for side, value in zip(("chosen", "rejected"), values[:2], strict=True):
            inputs[f"policy_{side}_log_sum_sq_probs"] = batch[f"policy_{side}_log_sum_sq_probs"] + (
                value - batch[f"policy_{side}_logps"]
            )
        return loss(**inputs).loss

    assert torch.autograd.gradcheck(fn, start)


def test_wpo_gradient_is_the_weighted_gradient():
    """∂(w·L)/∂S = w·∂L/∂S per pair: the weights carry no gradient."""
    batch = _batch(2)
    grads = []
    for settings in ({}, {"use_weighting": True}):
        chosen = batch["policy_chosen_logps"].clone().requires_grad_(True)
        out = losses.get("dpo", **settings)(**{**batch, "policy_chosen_logps": chosen})
        out.per_example.sum().backward()
        grads.append(chosen.grad)
    weights = modifiers.wpo_weights(**{k: batch[k] for k in modifiers.WPO_INPUTS})
    assert torch.allclose(grads[1], grads[0] * weights, rtol=1e-12)


# ----------------------------------------------------------------------------------------- declarations, errors
def test_declarations_add_the_inputs_the_modifiers_take():
    req = losses.get("dpo", ld_alpha=0.5, use_weighting=True).requirements
    assert set(modifiers.LD_POLICY_INPUTS + modifiers.LD_REFERENCE_INPUTS + modifiers.WPO_INPUTS) <= set(req.inputs)
    free = losses.get("simpo", ld_alpha=0.5).requirements  # reference-free: no reference prefix
    assert set(modifiers.LD_POLICY_INPUTS) <= set(free.inputs) and not set(modifiers.LD_REFERENCE_INPUTS) & set(
        free.inputs
    )
    assert losses.get("dpo").requirements.inputs == losses.spec("dpo").inputs  # off: nothing added
    with pytest.raises(losses.MissingInputError, match="policy_chosen_shared_logps"):
        losses.get("dpo", ld_alpha=0.5)(**{k: v for k, v in _batch(0).items() if "shared" not in k})


def test_combo_parts_take_modifiers_and_equal_trl():
    """TRL's loss_type=[sigmoid, bco_pair] with WPO and LD-DPO = combo with the modifiers on each part."""
    batch, tokens = _token_batch(7)
    part = {"use_weighting": True, "ld_alpha": 0.5}
    combo = losses.get("combo", parts={"dpo": {"weight": 0.8, **part}, "bco_pair": {"weight": 0.2, **part}})
    assert set(modifiers.WPO_INPUTS) <= set(combo.requirements.inputs)
    trl_loss, _ = _run_trl(tokens, ["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2], use_weighting=True, ld_alpha=0.5)
    assert combo(**batch).loss.item() == pytest.approx(trl_loss.item(), rel=1e-9)


REFUSED = [
    ("nca_pair", {"f_divergence_type": "js_divergence"}, r"not a function of the margin .*TRL #6559"),
    ("mpo", {"f_divergence_type": "forward_kl"}, "TRL #6559"),
    ("aot", {"use_weighting": True}, "sorts the batch"),
    ("combo", {"parts": {"dpo": 1.0}, "ld_alpha": 0.5}, r"set ld_alpha on its parts"),
    ("grpo", {"ld_alpha": 0.5}, "token loss"),
    ("kto", {"use_weighting": True}, "unpaired loss"),
    ("dpo", {"ld_alpha": 1.5}, r"dpo\.ld_alpha must lie in \[0.0, 1.0\]"),
    ("dpo", {"f_divergence_type": "kl"}, "f_divergence_type must be one of"),
    ("dpo", {"use_weighting": "yes"}, "use_weighting must be true or false"),
    ("dpo", {"f_alpha_divergence_coef": math.inf}, "finite number"),
]


@pytest.mark.parametrize(("name", "settings", "message"), REFUSED, ids=[f"{r[0]}-{list(r[1])[-1]}" for r in REFUSED])
def test_refused_in_one_line(name, settings, message):
    with pytest.raises(losses.HyperParameterError, match=message) as error:
        losses.get(name, **settings)
    assert "\n" not in str(error.value)


def test_defaults_are_accepted_where_they_change_nothing():
    """TRL rejects a non-default f-divergence only; the default (and use_weighting=false on aot) passes."""
    assert losses.get("nca_pair", f_divergence_type="reverse_kl").name == "nca_pair"
    assert losses.get("aot", use_weighting=False).name == "aot"


# ------------------------------------------------------------------------------------------------ TRL parity
def _trl():
    """TRL's DPO trainer module (the parity tests skip without trl)."""
    return pytest.importorskip("trl.trainer.dpo_trainer")


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(t):
        return t

    @staticmethod
    def gather_for_metrics(t):
        return t

    @staticmethod
    def autocast():
        return torch.autocast("cpu", enabled=False)


def _token_batch(seed: int, dtype=torch.float64):
    """Per-token values of 2B sequences (chosen rows first; completion = the last L of T positions) and our summed
    inputs from them: policy and reference log-probs, their sums over the pair's shared length, and Σ log Σ p²."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (2 * B,), generator=gen)
    completion = torch.arange(T)[None, :] >= (T - lengths)[:, None]  # [2B, T]
    per_token = -torch.rand(3, 2 * B, T, generator=gen, dtype=torch.float64) * 2.5
    per_token = torch.where(completion, per_token, torch.zeros((), dtype=torch.float64)).to(dtype)
    policy, ref, sum_sq = per_token  # log Σ p² ∈ (−2.5, 0]
    shared = torch.minimum(lengths[:B], lengths[B:]).repeat(2)
    position = completion.long().cumsum(dim=1)  # 1-based place within the completion
    in_shared = completion & (position <= shared[:, None])
    sums = lambda v, mask=completion: (v * mask).sum(dim=1)  # noqa: E731
    pairs = lambda v: (v[:B], v[B:])  # noqa: E731
    batch = {}
    for prefix, values in (("policy", policy), ("ref", ref)):
        batch[f"{prefix}_chosen_logps"], batch[f"{prefix}_rejected_logps"] = pairs(sums(values))
        batch[f"{prefix}_chosen_shared_logps"], batch[f"{prefix}_rejected_shared_logps"] = pairs(
            sums(values, in_shared)
        )
    batch["policy_chosen_log_sum_sq_probs"], batch["policy_rejected_log_sum_sq_probs"] = pairs(sums(sum_sq))
    batch["chosen_lengths"], batch["rejected_lengths"] = pairs(lengths)
    tokens = {"policy": policy, "ref": ref, "sum_sq": sum_sq, "completion": completion}
    return batch, tokens


def _batch(seed: int) -> dict:
    return _token_batch(seed)[0]


def _run_trl(tokens, loss_types, *, loss_weights=None, beta=0.1, label_smoothing=0.0, **modifier):
    """TRL 1.16 ``DPOTrainer._compute_loss`` with a live (fake) reference model, so its LD-DPO code runs on the
    reference's per-token log-probs too; returns (loss, metrics)."""
    dtype = tokens["policy"].dtype
    completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), tokens["completion"].long()], dim=1)

    def outputs(values, **more):
        return SimpleNamespace(
            log_probs=values,
            entropy=torch.zeros(2 * B, T, dtype=dtype),
            mean_logits=torch.zeros(2 * B, T, dtype=dtype),
            is_top1=torch.zeros(2 * B, T, dtype=torch.bool),
            **more,
        )

    model = lambda **_: outputs(tokens["policy"], log_sum_sq_probs=tokens["sum_sq"])  # noqa: E731
    model_state = SimpleNamespace(training=True, is_gradient_checkpointing=False, _modules={})
    stub = SimpleNamespace(
        model=model_state,
        ref_model=lambda **_: outputs(tokens["ref"]),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        ld_alpha=modifier.get("ld_alpha"),
        f_divergence_type=modifier.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=modifier.get("f_alpha_divergence_coef", 0.5),
        use_weighting=modifier.get("use_weighting", False),
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2 * B, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, T + 1),
        "completion_mask": completion_mask,
    }
    loss = _trl().DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


# (our name, our hyper-parameters, TRL loss_type, TRL label_smoothing); f-DPO's are the margin-only ones
MARGIN = [
    ("dpo", {}, "sigmoid", 0.0),
    ("cdpo", {"label_smoothing": 0.0}, "sigmoid", 0.0),
    ("hinge", {}, "hinge", 0.0),
    ("ipo", {}, "ipo", 0.0),
    ("exo_pair", {"label_smoothing": 0.2}, "exo_pair", 0.2),
    ("robust", {"label_smoothing": 0.3}, "robust", 0.3),
    ("discopop", {}, "discopop", 0.0),
    ("sigmoid_norm", {}, "sigmoid_norm", 0.0),
]
OTHERS = [
    ("nca_pair", {}, "nca_pair", 0.0),
    ("bco_pair", {}, "bco_pair", 0.0),
    ("sppo_hard", {}, "sppo_hard", 0.0),
    ("apo_zero", {}, "apo_zero", 0.0),
    ("apo_down", {}, "apo_down", 0.0),
    ("aot", {"label_smoothing": 0.2}, "aot", 0.2),
    ("aot_unpaired", {"label_smoothing": 0.1}, "aot_unpaired", 0.1),
]
SORTED = ("aot", "aot_unpaired")  # WPO refused, as TRL
# not compared: sft with use_weighting, where TRL 1.16 itself fails (an in-place product on its expanded batch loss)
F_SETTINGS = [
    {"f_divergence_type": "forward_kl"},
    {"f_divergence_type": "js_divergence"},
    {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5},
    {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.2},
]
PARITY = (
    [(case, settings) for case in MARGIN for settings in F_SETTINGS]
    + [(case, {"ld_alpha": a}) for case in MARGIN + OTHERS for a in (0.0, 0.5)]
    + [(case, {"use_weighting": True}) for case in MARGIN + OTHERS if case[0] not in SORTED]
    + [(case, {"use_weighting": True, "ld_alpha": 0.3, "f_divergence_type": "js_divergence"}) for case in MARGIN]
)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize(("case", "settings"), PARITY, ids=[f"{c[0]}-{s}" for c, s in PARITY])
def test_modifiers_equal_trl(case, settings, beta):
    """Loss and logged rewards / log-probs equal TRL's on the same per-token values. TRL's α-divergence takes
    float32 only (its clamp table has no float64), so those cases run in float32."""
    name, hparams, trl_type, smoothing = case
    alpha = settings.get("f_divergence_type") == "alpha_divergence"
    dtype = torch.float32 if alpha else torch.float64
    batch, tokens = _token_batch(11 if beta == 0.1 else 12, dtype)
    kwargs = {"beta": beta, **hparams} if "beta" in losses.spec(name).hparams else hparams
    ours = losses.get(name, **kwargs, **settings)(**batch)
    trl_loss, trl_metrics = _run_trl(tokens, [trl_type], beta=beta, label_smoothing=smoothing, **settings)
    rel = 1e-5 if alpha else (1e-6 if name == "exo_pair" else 1e-9)  # TRL's EXO ε is a float32 tensor
    assert ours.loss.item() == pytest.approx(trl_loss.item(), rel=rel, abs=1e-12)
    keys = ["logps/chosen", "logps/rejected"]
    keys += [] if name == "sft" else ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]
    for key in keys:  # TRL's accuracies are float32 whatever the inputs
        tolerance = max(rel, 1e-7 if key == "rewards/accuracies" else 1e-9)
        assert ours.metrics[key].item() == pytest.approx(trl_metrics[key], rel=tolerance, abs=1e-9), key


def test_precomputed_reference_equals_trl_compute_ref_log_probs():
    """TRL's precompute path (``compute_ref_log_probs``) stores LD-DPO reference values: ours are the same."""
    batch, tokens = _token_batch(5)
    completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), tokens["completion"].long()], dim=1)
    stub = SimpleNamespace(
        accelerator=_Accelerator(),
        ref_model=None,
        model=SimpleNamespace(is_gradient_checkpointing=False, _modules={}),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        ld_alpha=0.25,
    )
    inputs = {"input_ids": torch.ones(2 * B, T + 1, dtype=torch.long), "completion_mask": completion_mask}
    model = lambda **_: SimpleNamespace(log_probs=tokens["ref"])  # noqa: E731
    chosen, rejected = _trl().DPOTrainer.compute_ref_log_probs(stub, model, inputs)
    for side, value in (("chosen", chosen), ("rejected", rejected)):
        ours = modifiers.ld_logps(batch[f"ref_{side}_logps"], batch[f"ref_{side}_shared_logps"], 0.25)
        assert torch.allclose(ours, value, rtol=1e-12)
