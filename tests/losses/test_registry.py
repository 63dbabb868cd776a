"""The public API: names, lookup errors, hyper-parameter validation, declarations, conf/loss in step, plugins."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import losses
from losses import registry

from ._inputs import CONF, config_hparams

ISSUE_NAMES = {  # the pairwise losses
    "dpo",
    "cdpo",
    "robust",
    "ipo",
    "hinge",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "simpo",
    "cpo",
    "orpo",
    "sft",
    "mpo",
    "upo",
    "combo",
}
REFERENCE_FREE = {"simpo", "cpo", "orpo", "sft"}  # and mpo with pair_center="none"
GROUP_NAMES = {"rloo"}  # k sampled completions per prompt
# per-token losses: the GRPO family and REINFORCE++
TOKEN_NAMES = {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "gspo", "reinforce_pp", "ppo"}
UNPAIRED_NAMES = {"kto", "apo_zero_unpaired"}  # single labelled completions, KTO's family
REWARD_NAMES = {"bradley_terry"}  # a reward model's scores of pairs (trainer=reward)


def test_available_is_sorted_and_complete():
    names = losses.available()
    assert names == sorted(names)
    assert set(names) == ISSUE_NAMES | GROUP_NAMES | TOKEN_NAMES | UNPAIRED_NAMES | REWARD_NAMES
    assert {n for n in names if losses.spec(n).kind == "group"} == GROUP_NAMES
    assert {n for n in names if losses.spec(n).kind == "token"} == TOKEN_NAMES
    assert {n for n in names if losses.spec(n).kind == "unpaired"} == UNPAIRED_NAMES
    assert {n for n in names if losses.spec(n).kind == "reward"} == REWARD_NAMES
    assert registry.KINDS == ("pair", "group", "token", "unpaired", "reward")


def test_unknown_name_lists_valid_ones():
    with pytest.raises(losses.UnknownLossError, match="unknown loss 'dpoo'; available: aot, aot_unpaired") as err:
        losses.get("dpoo")
    assert "dpo" in str(err.value) and "upo" in str(err.value)


def test_unknown_hyperparameter_lists_valid_ones():
    with pytest.raises(losses.HyperParameterError, match=r"no hyper-parameter 'betta'; valid: beta, label_smoothing"):
        losses.get("robust", betta=0.1)


@pytest.mark.parametrize(
    ("name", "hparams", "message"),
    [
        ("robust", {"label_smoothing": 0.5}, r"robust.label_smoothing must lie in \[0.0, 0.5\)"),
        ("robust", {"label_smoothing": 0.7}, "lie in"),
        ("cdpo", {"label_smoothing": -0.1}, "lie in"),
        ("exo_pair", {"label_smoothing": 0.0}, r"exo_pair.label_smoothing must lie in \(0.0, 1.0\)"),
        ("aot", {"label_smoothing": 0.5}, "lie in"),
        ("discopop", {"tau": 0.0}, "tau must be a finite number > 0"),
        ("simpo", {"gamma": -1.0}, "gamma must be a finite number >= 0"),
        ("mpo", {"temperature": 0.0}, "temperature"),
        ("mpo", {"beta": -0.1}, "beta must be a finite number >= 0"),
        ("upo", {"base": "nope"}, "unknown loss 'nope'"),
        ("upo", {"base": "upo"}, "pairwise loss other than 'upo'"),
        ("upo", {"baseline": "median"}, "baseline must be one of"),
        ("upo", {"weight_clip": 0}, "weight_clip"),
        ("combo", {"parts": {"dpo": -1.0}}, "weight must be a finite number >= 0"),
        ("combo", {"parts": {"combo": 1.0}}, "cannot contain 'combo'"),
        ("combo", {"parts": {}}, "non-empty mapping"),
        ("combo", {"parts": {"dpo": {"weight": 1.0, "beta": -1}}}, "dpo.beta must be a finite number > 0"),
        ("ipo", {"beta": float("nan")}, "beta must be a finite number > 0"),
        ("rloo", {"kl_coef": -0.1}, "rloo.kl_coef must be a finite number >= 0"),
        ("rloo", {"kl_coef": float("inf")}, "rloo.kl_coef must be a finite number >= 0"),
        ("rloo", {"kl_estimator": "k2"}, r"rloo.kl_estimator must be one of \['k1', 'k3'\]"),
        ("rloo", {"aggregation": "sum"}, r"rloo.aggregation must be one of \['token', 'sequence'\]"),
        ("rloo", {"beta": 0.1}, "no hyper-parameter 'beta'; valid: aggregation, kl_coef, kl_estimator"),
        ("combo", {"parts": {"rloo": 1.0}}, "only pairwise losses combine, 'rloo' is group"),
        ("upo", {"base": "rloo"}, "must name a registered pairwise loss other than 'upo', got 'rloo'"),
        ("grpo", {"beta": -0.1}, "grpo.beta must be a finite number >= 0"),
        ("grpo", {"epsilon": float("nan")}, "grpo.epsilon must be a finite number >= 0"),
        ("dapo", {"epsilon_high": -0.28}, "dapo.epsilon_high must be a finite number >= 0"),
        ("gspo", {"delta": 0.0}, "gspo.delta must be a finite number > 0"),
        ("dr_grpo", {"max_completion_length": 0}, "dr_grpo.max_completion_length must be a positive integer or None"),
        ("dr_grpo", {"max_completion_length": 8.5}, "positive integer or None"),
        ("cispo", {"epsilon_high": 0.0}, "cispo.epsilon_high must be a finite number > 0"),
        (
            "cispo",
            {"epsilon": 0.2},
            "no hyper-parameter 'epsilon'; valid: beta, epsilon_high, kl_estimator, use_bias_correction_kl",
        ),
        ("sapo", {"sapo_temperature_neg": 0.0}, "sapo.sapo_temperature_neg must be a finite number > 0"),
        ("bnpo", {"use_bias_correction_kl": "yes"}, r"bnpo.use_bias_correction_kl must be one of \[True, False\]"),
        ("combo", {"parts": {"grpo": 1.0}}, "only pairwise losses combine, 'grpo' is token"),
        ("upo", {"base": "dapo"}, "must name a registered pairwise loss other than 'upo', got 'dapo'"),
        ("kto", {"beta": 0.0}, "kto.beta must be a finite number > 0"),
        ("kto", {"beta": float("inf")}, "kto.beta must be a finite number > 0"),
        ("kto", {"desirable_weight": -1.0}, "kto.desirable_weight must be a finite number >= 0"),
        ("kto", {"undesirable_weight": float("nan")}, "kto.undesirable_weight must be a finite number >= 0"),
        ("kto", {"loss_type": "kto"}, "no hyper-parameter 'loss_type'; valid: beta, desirable_weight, undesirable_w"),
        ("apo_zero_unpaired", {"beta": -0.1}, "apo_zero_unpaired.beta must be a finite number > 0"),
        ("apo_zero_unpaired", {"undesirable_weight": -0.5}, "undesirable_weight must be a finite number >= 0"),
        ("combo", {"parts": {"kto": 1.0}}, "only pairwise losses combine, 'kto' is unpaired"),
        ("upo", {"base": "grpo"}, r"got 'grpo' \(or an unpaired one\)"),  # kto / apo_zero_unpaired are bases
    ],
)
def test_invalid_hyperparameters_rejected(name, hparams, message):
    with pytest.raises(losses.LossError, match=message):
        losses.get(name, **hparams)


@pytest.mark.parametrize("name", sorted(n for n in ISSUE_NAMES if "beta" in losses.spec(n).hparams and n != "mpo"))
@pytest.mark.parametrize("beta", [-0.1, 0.0])
def test_non_positive_beta_rejected(name, beta):
    with pytest.raises(losses.HyperParameterError, match=f"{name}.beta must be a finite number > 0"):
        losses.get(name, **{**config_hparams(name), "beta": beta})


def test_combo_requires_parts():
    with pytest.raises(losses.HyperParameterError, match="needs hyper-parameter"):
        losses.get("combo")


def test_plain_functions_validate_too(golden_batch):
    batch = {k: v for k, v in golden_batch.items() if "length" not in k}
    with pytest.raises(losses.HyperParameterError, match="robust.label_smoothing"):
        losses.robust_loss(**batch, label_smoothing=0.5)
    assert losses.dpo_loss(**batch, beta=0.1).loss.item() == pytest.approx(0.666292, abs=1e-6)
    assert losses.dpo_loss is losses.spec("dpo").fn


def test_reference_declarations():
    for name in ISSUE_NAMES - {"combo"}:
        assert losses.get(name).needs_reference == (name not in REFERENCE_FREE), name
    assert not losses.get("upo", base="simpo").needs_reference
    assert not losses.get("mpo", pair_center="none").needs_reference
    assert losses.get("combo", parts={"simpo": 1.0, "sft": 0.5}).needs_reference is False
    assert losses.get("combo", parts={"simpo": 1.0, "dpo": 0.5}).needs_reference is True


def test_extras_and_lengths_declarations():
    assert losses.get("mpo").requirements.extras == ("reg_logps", "reg_lengths")
    assert "reg_ref_logps" in losses.get("mpo").requirements.optional_extras
    assert losses.get("mpo", ptx_weight=1.0).requirements.extras == (
        "reg_logps",
        "reg_lengths",
        "sft_logps",
        "sft_lengths",
    )
    assert losses.get("mpo", beta=0.0).requirements.extras == ()
    assert losses.get("upo").requirements.extras == ("aux_rewards_chosen", "aux_rewards_rejected")
    assert losses.get("ipo").requirements.needs_lengths
    assert not losses.get("ipo", length_normalize=False).requirements.needs_lengths
    assert not losses.get("dpo").requirements.needs_lengths
    assert losses.get("simpo").requirements.needs_lengths
    assert {losses.get(n, **config_hparams(n)).requirements.kind for n in ISSUE_NAMES} == {"pair"}


def test_group_declarations():
    """A group loss declares the group inputs; they are not extras, and the reference follows kl_coef."""
    rloo = losses.get("rloo").requirements
    assert rloo.kind == "group"
    assert rloo.inputs == ("policy_logps", "rewards", "lengths", "ref_logps")
    assert set(rloo.inputs) <= set(registry.GROUP_INPUTS) and losses.GROUP_INPUTS == registry.GROUP_INPUTS
    assert rloo.extras == () and rloo.optional_extras == ()
    assert rloo.needs_reference and rloo.needs_lengths
    free = losses.get("rloo", kl_coef=0.0).requirements
    assert free.inputs == ("policy_logps", "rewards", "lengths") and free.optional_inputs == ("ref_logps",)
    assert not free.needs_reference and free.extras == () and free.optional_extras == ()
    assert losses.get("rloo", kl_coef=1e-6).needs_reference


@pytest.mark.parametrize("name", sorted(TOKEN_NAMES - {"reinforce_pp", "ppo"}))
def test_token_declarations(name):
    """A GRPO-family token loss declares the per-token inputs (not extras); old log-probs are optional, and the
    reference is required exactly when beta > 0 (each loss has its own ``required_if`` hook)."""
    free = losses.get(name).requirements
    assert free.kind == "token"
    assert free.inputs == ("policy_token_logps", "completion_mask", "advantages")
    token_mean = name in ("bnpo", "dapo", "cispo")  # their normaliser can be the whole step's token count
    assert free.optional_inputs == ("old_token_logps", "ref_token_logps", *(("batch_tokens",) if token_mean else ()))
    assert set(free.inputs + free.optional_inputs) | {"batch_tokens"} == set(registry.TOKEN_INPUTS)
    assert losses.TOKEN_INPUTS == registry.TOKEN_INPUTS
    assert free.extras == () and free.optional_extras == ()
    assert not free.needs_reference and not free.needs_lengths
    kl = losses.get(name, beta=0.04).requirements
    assert kl.inputs == ("policy_token_logps", "completion_mask", "advantages", "ref_token_logps")
    assert kl.optional_inputs == ("old_token_logps", *(("batch_tokens",) if token_mean else ()))
    assert kl.needs_reference and kl.kind == "token"


def test_reinforce_pp_declaration():
    """REINFORCE++ builds its own advantages: it takes the completions' rewards instead of advantages, and (β > 0 by
    default, the KL is in its reward) the reference's per-token log-probs."""
    req = losses.get("reinforce_pp").requirements
    assert req.kind == "token" and req.needs_reference
    assert req.inputs == ("policy_token_logps", "completion_mask", "rewards", "ref_token_logps")
    step = ("return_sums", "batch_tokens")  # the step's totals a trainer passes when it splits the batch
    optional = ("old_token_logps", *step, "token_rewards")
    assert req.optional_inputs == optional and req.optional_extras == ("return_sums", "token_rewards")
    free = losses.get("reinforce_pp", beta=0.0).requirements
    assert not free.needs_reference and free.optional_inputs == ("old_token_logps", "ref_token_logps", *optional[1:])
    assert losses.spec("reinforce_pp").step_sums == ("return_sums",)


def test_unpaired_declarations():
    """An unpaired loss declares the unpaired inputs (not extras, no lengths); ``kto`` requires the mismatched pairs
    for its KL reference point, ``apo_zero_unpaired`` takes none (TRL computes no KL term for it). Both need the
    reference. ``policy_logps`` / ``ref_logps`` are also group inputs: the group loss's declaration is unchanged."""
    kto = losses.get("kto").requirements
    assert kto.kind == "unpaired"
    assert kto.inputs == ("policy_logps", "ref_logps", "labels", "policy_kl_logps", "ref_kl_logps")
    assert kto.optional_inputs == () and set(kto.inputs) == set(registry.UNPAIRED_INPUTS)
    assert losses.UNPAIRED_INPUTS == registry.UNPAIRED_INPUTS
    assert kto.extras == () and kto.optional_extras == ()
    assert kto.needs_reference and not kto.needs_lengths
    apo = losses.get("apo_zero_unpaired").requirements
    assert apo.kind == "unpaired" and apo.inputs == ("policy_logps", "ref_logps", "labels")
    assert apo.optional_inputs == () and apo.extras == () and apo.needs_reference and not apo.needs_lengths
    assert losses.get("rloo").requirements.kind == "group" and losses.get("rloo").requirements.extras == ()
    assert len(registry._BATCH_INPUTS) == len(set(registry._BATCH_INPUTS))  # the shared names appear once


def _unpaired_batch():
    gen = torch.Generator().manual_seed(0)
    return {
        "policy_logps": -torch.rand(4, generator=gen, dtype=torch.float64) * 10,
        "ref_logps": -torch.rand(4, generator=gen, dtype=torch.float64) * 10,
        "labels": torch.tensor([True, False, True, True]),
        "policy_kl_logps": -torch.rand(4, generator=gen, dtype=torch.float64) * 10,
        "ref_kl_logps": -torch.rand(4, generator=gen, dtype=torch.float64) * 10,
    }


def test_unpaired_inputs_a_loss_does_not_use_are_dropped(golden_batch):
    """A trainer passes the same five unpaired tensors to any unpaired loss: the KL inputs are dropped for
    ``apo_zero_unpaired`` (unchanged loss), and unpaired inputs passed to a pair loss are ignored; ``kto`` names a
    missing KL input, and an unknown name is still an error."""
    batch = _unpaired_batch()
    without_kl = {k: v for k, v in batch.items() if "_kl_" not in k}
    apo = losses.get("apo_zero_unpaired")
    assert apo(**batch).loss.item() == apo(**without_kl).loss.item()
    assert losses.get("dpo")(**golden_batch, **batch).loss.item() == losses.get("dpo")(**golden_batch).loss.item()
    with pytest.raises(losses.MissingInputError, match="loss 'kto' needs input.s. policy_kl_logps, ref_kl_logps"):
        losses.get("kto")(**without_kl)
    with pytest.raises(losses.MissingInputError, match="unexpected input.s. label; its extras are none"):
        losses.get("kto")(**batch, label=batch["labels"])


def test_needs_reference_from_either_kind_of_reference_input():
    pair = registry.Requirements(
        inputs=("policy_chosen_logps", *registry.REFERENCE_INPUTS), optional_inputs=(), kind="pair"
    )
    half = registry.Requirements(inputs=("policy_chosen_logps", "ref_chosen_logps"), optional_inputs=(), kind="pair")
    group = registry.Requirements(inputs=("policy_logps", "ref_logps"), optional_inputs=(), kind="group")
    token = registry.Requirements(inputs=("policy_token_logps", "ref_token_logps"), optional_inputs=(), kind="token")
    assert token.needs_reference
    unpaired = registry.Requirements(
        inputs=("policy_logps", "ref_logps", "labels"), optional_inputs=(), kind="unpaired"
    )
    kl_only = registry.Requirements(
        inputs=("policy_logps", "labels", "ref_kl_logps"), optional_inputs=(), kind="unpaired"
    )
    optional_kl = registry.Requirements(
        inputs=("policy_logps", "labels"), optional_inputs=("ref_logps", "ref_kl_logps"), kind="unpaired"
    )
    assert unpaired.needs_reference and kl_only.needs_reference and not optional_kl.needs_reference
    optional = registry.Requirements(inputs=("policy_logps",), optional_inputs=("ref_logps",), kind="group")
    assert pair.needs_reference and group.needs_reference
    assert not half.needs_reference and not optional.needs_reference


def _group_batch():
    gen = torch.Generator().manual_seed(0)
    return {
        "policy_logps": -torch.rand(3, 4, generator=gen, dtype=torch.float64) * 10,
        "ref_logps": -torch.rand(3, 4, generator=gen, dtype=torch.float64) * 10,
        "rewards": torch.randn(3, 4, generator=gen, dtype=torch.float64),
        "lengths": torch.randint(1, 9, (3, 4), generator=gen),
    }


def test_group_inputs_a_loss_does_not_use_are_dropped(golden_batch):
    """A trainer passes the same four group tensors to any group loss: ref_logps is dropped when kl_coef = 0 (the
    loss is unchanged), and group inputs passed to a pairwise loss are ignored like unused standard inputs."""
    batch = _group_batch()
    without_ref = {k: v for k, v in batch.items() if k != "ref_logps"}
    free = losses.get("rloo", kl_coef=0.0)
    assert free(**batch).loss.item() == free(**without_ref).loss.item()
    assert free(**without_ref).metrics["objective/kl"].item() == 0.0
    assert losses.get("dpo")(**golden_batch, **batch).loss.item() == losses.get("dpo")(**golden_batch).loss.item()


def test_group_missing_and_unexpected_inputs_are_named():
    batch = _group_batch()
    with pytest.raises(losses.MissingInputError, match="loss 'rloo' needs input.s. ref_logps"):
        losses.get("rloo")(**{k: v for k, v in batch.items() if k != "ref_logps"})
    with pytest.raises(losses.MissingInputError, match="loss 'rloo' needs input.s. rewards"):
        losses.get("rloo", kl_coef=0.0)(**{k: v for k, v in batch.items() if k != "rewards"})
    with pytest.raises(losses.MissingInputError, match="unexpected input.s. reward; its extras are none"):
        losses.get("rloo")(**batch, reward=batch["rewards"])
    with pytest.raises(losses.MissingInputError, match="loss 'rloo' with kl_coef > 0 needs input.s. ref_logps"):
        losses.rloo_loss(batch["policy_logps"], batch["rewards"], batch["lengths"])


def test_missing_and_unexpected_inputs_are_named(golden_batch):
    with pytest.raises(losses.MissingInputError, match="loss 'dpo' needs input.s. ref_rejected_logps"):
        losses.get("dpo")(**{k: v for k, v in golden_batch.items() if k != "ref_rejected_logps"})
    with pytest.raises(losses.MissingInputError, match="loss 'mpo' needs input.s. reg_logps, reg_lengths"):
        losses.get("mpo")(**golden_batch)
    with pytest.raises(losses.MissingInputError, match="unexpected input.s. reg_logp; its extras are"):
        losses.get("dpo")(**golden_batch, reg_logp=torch.zeros(2))


def test_standard_inputs_a_loss_does_not_use_are_dropped(golden_batch):
    """One trainer passes the same batch to any loss: lengths to DPO, reference log-probs to SimPO."""
    simpo = losses.get("simpo")(**golden_batch)
    without_ref = losses.get("simpo")(**{k: v for k, v in golden_batch.items() if not k.startswith("ref")})
    assert simpo.loss.item() == without_ref.loss.item()


def test_conf_loss_in_step_with_registry():
    """Every registered loss has conf/loss/NAME.yaml, with every hyper-parameter at the code default (house rule 9)."""
    files = {p.stem for p in CONF.glob("*.yaml")}
    assert files == set(losses.available())
    for name in files:
        cfg = config_hparams(name)
        loss_spec = losses.spec(name)
        defaults = {**loss_spec.hparams, **loss_spec.modifier_hparams}  # the modifiers that fit it too
        assert set(cfg) == set(defaults), name
        for key, value in cfg.items():
            default = defaults[key]
            if default is registry.inspect.Parameter.empty:
                continue  # required in code (combo.parts); the YAML supplies the default
            assert value == default or (value == {} and default is None), f"{name}.{key}: yaml {value} != {default}"
        losses.get(name, **cfg)  # and the YAML validates


def test_entry_point_plugins_register(monkeypatch, tmp_path):
    module = tmp_path / "my_plugin_losses.py"
    module.write_text(
        "import torch.nn.functional as F\n"
        "from losses import LossOutput, register\n"
        "@register('plugin_dpo', paper='test plugin', summary='−log σ(β(S_w − S_l))')\n"
        "def plugin_loss(policy_chosen_logps, policy_rejected_logps, *, beta=1.0):\n"
        "    per = -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps))\n"
        "    return LossOutput(per.mean(), per, {})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [
        SimpleNamespace(name="mine", value="my_plugin_losses", load=lambda: __import__("my_plugin_losses")),
        SimpleNamespace(name="broken", value="nowhere", load=lambda: __import__("no_such_module_here")),
    ]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: eps if group == "prefopt.losses" else [])
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.warns(UserWarning, match="could not load loss plugin 'broken'"):
        names = losses.available()
    assert "plugin_dpo" in names
    fn = losses.get("plugin_dpo", beta=2.0)
    assert not fn.needs_reference
    out = fn(policy_chosen_logps=torch.tensor([0.0]), policy_rejected_logps=torch.tensor([0.0]))
    assert out.loss.item() == pytest.approx(0.693147, abs=1e-6)


def test_register_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        registry.register("dpo", paper="", summary="")(losses.dpo_loss.__wrapped__)


def test_losses_package_imports_torch_only():
    code = (
        "import sys, losses; bad = [m for m in ('prefopt', 'transformers', 'datasets', 'hydra', 'accelerate') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
