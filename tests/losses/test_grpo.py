"""The GRPO family (kind "token"): parity with TRL 1.16's own ``GRPOTrainer`` code, golden values, limits, the
reference declaration, gradients and padding.

TRL parity calls TRL's methods unbound on a bare ``GRPOTrainer`` (``object.__new__``, no model, no dataset):
``_compute_loss`` with the model forward (``_get_per_token_logps_and_entropies``) replaced by one that returns the
test's per-token log-probs, and ``_generate_and_score_completions`` with generation (``_generate``) and reward
functions (``_calculate_rewards``) replaced by ones that return fixed tokens and the test's rewards. ``args`` is a real
``GRPOConfig``, and the trainer attributes the methods read are copied from it as ``GRPOTrainer.__init__`` does, so
every line of TRL's loss, clipping, KL, normalisation, metric and advantage code runs as in training (one process,
no gradient accumulation). Skipped when trl is absent.
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

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

TOKEN_NAMES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "gspo"]
N, T = 6, 8
LENGTHS = [8, 3, 5, 1, 8, 0]  # unequal, right-padded; the last one fully masked (TRL mask_truncated_completions)


# ------------------------------------------------------------------------------------------------- TRL, stubbed
class _Accelerator:
    """One process: gather and reduce are the identity (what accelerate does with a single process)."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    sync_gradients = True

    @staticmethod
    def gather(tensor):
        return tensor

    @staticmethod
    def gather_for_metrics(tensor):
        return tensor

    @staticmethod
    def reduce(tensor, reduction="sum"):
        return tensor


def _trl_trainer(**config) -> GRPOTrainer:
    """A ``GRPOTrainer`` without ``__init__``: a real ``GRPOConfig`` and the attributes ``__init__`` derives from it
    that ``_compute_loss`` / ``_generate_and_score_completions`` read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' gradient_checkpointing rename
        args = GRPOConfig(output_dir="unused", use_cpu=True, report_to=[], **config)
    trainer = object.__new__(GRPOTrainer)
    trainer.args = args
    # copied from GRPOTrainer.__init__ (trl 1.16)
    trainer.max_completion_length = args.max_completion_length
    trainer.num_generations = args.num_generations
    trainer.pad_to_multiple_of = args.pad_to_multiple_of
    trainer.use_vllm = args.use_vllm
    trainer.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    trainer.loss_type = args.loss_type
    trainer.multi_objective_aggregation = args.multi_objective_aggregation
    trainer.aux_loss_enabled = False  # no MoE router
    trainer.scale_rewards = args.scale_rewards
    trainer.importance_sampling_level = args.importance_sampling_level
    trainer.off_policy_mask_threshold = args.off_policy_mask_threshold
    trainer.mask_truncated_completions = args.mask_truncated_completions
    trainer.top_entropy_quantile = args.top_entropy_quantile
    trainer.entropy_coef = args.entropy_coef
    trainer.use_adaptive_entropy = args.use_adaptive_entropy
    trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0 or trainer.use_adaptive_entropy
    trainer.num_iterations = args.num_iterations
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer.beta = args.beta
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    # what transformers' Trainer provides while training: accelerator, model in train mode, one accumulation step
    trainer.accelerator = _Accelerator()
    trainer.model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _run_trl_loss(policy, mask, advantages, old, ref, *, loss_type, level="token", **config):
    """TRL 1.16 ``GRPOTrainer._compute_loss`` on these per-token tensors; returns (loss, metrics)."""
    n, t = policy.shape
    trainer = _trl_trainer(
        per_device_train_batch_size=n,
        num_generations=2,
        loss_type=loss_type,
        importance_sampling_level=level,
        **config,
    )

    def forward(model, input_ids, attention_mask, logits_to_keep, **_):  # the model's per-token log-probs
        assert input_ids.shape == (n, 2 + t) and logits_to_keep == t
        return policy, torch.zeros(n, t, dtype=policy.dtype), None

    trainer._get_per_token_logps_and_entropies = forward
    inputs = {
        "prompt_ids": torch.ones(n, 2, dtype=torch.long),
        "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.ones(n, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": mask.sum(),  # TRL: accelerator.gather(loss_mask.sum()).sum() over the generation batch
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _run_trl_advantages(rewards: torch.Tensor, scale_rewards: str) -> tuple[torch.Tensor, dict]:
    """TRL 1.16 ``GRPOTrainer._generate_and_score_completions`` with generation and the reward function stubbed:
    every completion is 3 tokens, the single reward function returns ``rewards`` [G, K] (row-major)."""
    g, k = rewards.shape
    trainer = _trl_trainer(per_device_train_batch_size=g * k, num_generations=k, scale_rewards=scale_rewards)
    trainer.environment_factories = None
    trainer.environments = None
    trainer.tools = None
    trainer._tokenizer = SimpleNamespace(pad_token_id=0)
    trainer.reward_weights = torch.ones(1)
    trainer.reward_func_names = ["reward"]
    trainer._logs = {
        "prompt": [],
        "completion": [],
        "rewards": defaultdict(list),
        "advantages": [],
        "extra": defaultdict(list),
    }
    trainer._pending_extra_logs = {}
    trainer._pending_metrics = {}
    trainer.log_multimodal = False

    def generate(prompts):  # (prompt ids, completion ids, tool mask, completions, sampling logps, extras, images x2)
        return [[1, 2]] * len(prompts), [[3, 4, 5]] * len(prompts), None, ["c"] * len(prompts), None, {}, None, None

    trainer._generate = generate
    trainer._calculate_rewards = lambda inputs, prompts, completions, ids: rewards.reshape(-1, 1)
    out = GRPOTrainer._generate_and_score_completions(trainer, [{"prompt": f"q{i // k}"} for i in range(g * k)])
    return out["advantages"], {key: v[-1] for key, v in trainer._metrics["train"].items()}


# ---------------------------------------------------------------------------------------------------- inputs
def _mask(lengths=LENGTHS, t: int = T) -> torch.Tensor:
    return (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()


def _token_batch(seed: int, lengths=LENGTHS, t: int = T, token_advantages: bool = False) -> dict[str, torch.Tensor]:
    """float64 per-token log-probs: old and reference within ~0.3 / 0.5 of the policy per token (so some ratios are
    clipped), arbitrary finite values on padding, advantages from ``group_advantages`` of random rewards."""
    gen = torch.Generator().manual_seed(seed)
    n = len(lengths)
    mask = _mask(lengths, t)
    policy = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 3
    old = policy + 0.3 * torch.randn(n, t, generator=gen, dtype=torch.float64)
    ref = policy + 0.5 * torch.randn(n, t, generator=gen, dtype=torch.float64)
    padding = mask == 0
    for tensor in (policy, old, ref):  # whatever a padded forward pass leaves there
        tensor[padding] = -30 * torch.rand(int(padding.sum()), generator=gen, dtype=torch.float64)
    if token_advantages:
        advantages = torch.randn(n, t, generator=gen, dtype=torch.float64)
    else:
        rewards = torch.randn(n // 2, 2, generator=gen, dtype=torch.float64)
        advantages = losses.group_advantages(rewards)
    return dict(
        policy_token_logps=policy,
        old_token_logps=old,
        ref_token_logps=ref,
        completion_mask=mask,
        advantages=advantages,
    )


# ----------------------------------------------------------------------------------------------------- parity
# (our name, our hyper-parameters, TRL loss_type, TRL importance_sampling_level, tolerance)
# TRL builds SAPO's temperatures as a float32 tensor (torch.where of Python floats), so with τ_neg = 1.05 its float64
# loss carries float32 rounding of τ (~4e-8 here); with temperatures exact in float32 it agrees to 1e-12 like the rest.
CASES = [
    ("grpo", {}, "grpo", "token", 1e-12),
    ("grpo", {"epsilon": 0.1, "epsilon_high": 0.3, "delta": 1.25}, "grpo", "token", 1e-12),
    ("bnpo", {}, "bnpo", "token", 1e-12),
    ("dr_grpo", {}, "dr_grpo", "token", 1e-12),  # max_completion_length None: T (TRL is given T)
    ("dr_grpo", {"max_completion_length": 20, "epsilon_high": 0.28}, "dr_grpo", "token", 1e-12),
    ("dapo", {"epsilon_high": 0.28}, "dapo", "token", 1e-12),
    ("dapo", {"delta": 1.1}, "dapo", "token", 1e-12),
    ("cispo", {}, "cispo", "token", 1e-12),  # ε_max = 5 (passed to TRL explicitly)
    ("cispo", {"epsilon_high": 1.1}, "cispo", "token", 1e-12),
    ("sapo", {}, "sapo", "token", 1e-6),
    ("sapo", {"sapo_temperature_pos": 2.0, "sapo_temperature_neg": 0.5}, "sapo", "token", 1e-12),
    ("gspo", {}, "grpo", "sequence", 1e-12),
    ("gspo", {"epsilon": 0.02, "epsilon_high": 0.03, "delta": 1.04}, "grpo", "sequence", 1e-12),
]
# (β, setting): TRL's default off-policy batch, no old log-probs (on-policy), per-token advantages [N, T], and the KL
# without TRL's importance-ratio bias correction (which only exists with β > 0)
SETTINGS = [
    (beta, setting)
    for beta in (0.0, 0.04)
    for setting in ("off_policy", "on_policy", "token_advantages", "no_bias_correction")
    if beta > 0 or setting != "no_bias_correction"
]


def _trl_config(name: str, hparams: dict, beta: float, setting: str) -> dict:
    config = {"beta": beta, "use_bias_correction_kl": setting != "no_bias_correction"}
    for key in ("epsilon", "epsilon_high", "delta", "sapo_temperature_pos", "sapo_temperature_neg"):
        if key in hparams:
            config[key] = hparams[key]
    if name == "cispo":
        config["epsilon_high"] = hparams.get("epsilon_high", 5.0)
    config["max_completion_length"] = hparams.get("max_completion_length") or T
    return config


@pytest.mark.parametrize(("beta", "setting"), SETTINGS, ids=[f"beta{b}-{s}" for b, s in SETTINGS])
@pytest.mark.parametrize(
    ("name", "hparams", "loss_type", "level", "tol"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_token_losses_equal_trl(name, hparams, loss_type, level, tol, beta, setting):
    """Loss, gradient w.r.t. the policy's per-token log-probs and every shared metric equal TRL's."""
    seed = CASES.index((name, hparams, loss_type, level, tol))
    batch = _token_batch(seed, token_advantages=setting == "token_advantages")
    old = None if setting == "on_policy" else batch["old_token_logps"]
    ref = batch["ref_token_logps"] if beta > 0 else None

    trl_policy = batch["policy_token_logps"].clone().requires_grad_(True)
    trl_loss, trl_metrics = _run_trl_loss(
        trl_policy,
        batch["completion_mask"],
        batch["advantages"],
        old,
        ref,
        loss_type=loss_type,
        level=level,
        **_trl_config(name, hparams, beta, setting),
    )
    trl_loss.backward()

    policy = batch["policy_token_logps"].clone().requires_grad_(True)
    ours = losses.get(name, **hparams, beta=beta, use_bias_correction_kl=setting != "no_bias_correction")
    inputs = dict(batch, policy_token_logps=policy, old_token_logps=old, ref_token_logps=ref)
    out = ours(**{k: v for k, v in inputs.items() if v is not None})
    out.loss.backward()

    assert out.loss.item() == pytest.approx(trl_loss.item(), rel=tol, abs=tol)
    assert (policy.grad - trl_policy.grad).abs().max().item() <= tol
    trl_metrics.pop("entropy")  # TRL's entropy needs the logits; not a loss quantity
    assert set(out.metrics) == set(trl_metrics)
    for key, value in trl_metrics.items():  # TRL's clip rates are float32 (`.float()`)
        assert out.metrics[key].item() == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("case", ["random", "constant_group", "unscorable"])
def test_group_advantages_equal_trl(scale_rewards, case):
    """``group_advantages`` equals the advantages TRL's ``_generate_and_score_completions`` returns, including a
    group whose rewards are all equal (σ = 0: the 1e-4 keeps it finite) and an unscorable (NaN) reward."""
    gen = torch.Generator().manual_seed(11)
    rewards = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    if case == "constant_group":
        rewards[1] = 0.7
    if case == "unscorable":
        rewards[2, 1] = float("nan")
    trl_advantages, trl_metrics = _run_trl_advantages(rewards, scale_rewards)
    ours = losses.group_advantages(rewards, scale_rewards)
    assert ours.shape == (12,) and ours.dtype == torch.float64
    # TRL's nanstd computes Bessel's n/(n − 1) from integer counts, i.e. in float32 (12/11 here; 3/2 is exact), so its
    # float64 batch std carries float32 rounding (~4e-8 relative); ours is exact in the rewards' dtype.
    tol = 1e-6 if scale_rewards == "batch" else 1e-12
    assert torch.allclose(ours, trl_advantages, rtol=0, atol=tol)
    float32 = losses.group_advantages(rewards.float(), scale_rewards)  # TRL's usual reward dtype: no difference
    assert torch.allclose(float32, _run_trl_advantages(rewards.float(), scale_rewards)[0], rtol=0, atol=1e-6)
    if case == "constant_group":
        # σ = 0, so the mean's rounding (~1e-16) is divided by 1e-4: ~1e-12, not 0, in TRL and here alike
        assert ours[3:6].abs().max().item() <= 1e-11
        assert trl_metrics["frac_reward_zero_std"] == pytest.approx(0.25 if scale_rewards != "batch" else 0.0)


# --------------------------------------------------------------------------------------------------- golden values
def _golden_batch() -> dict[str, torch.Tensor]:
    """2 completions × 3 tokens; the second is 2 tokens long. old log-probs −1 everywhere; the policy's log-ratios
    are log 1.5, 0, log 0.5 (row 0, A = +1) and log 0.5, log 1.5, padding (row 1, A = −1)."""
    old = torch.full((2, 3), -1.0, dtype=torch.float64)
    log_ratio = torch.tensor(
        [[math.log(1.5), 0.0, math.log(0.5)], [math.log(0.5), math.log(1.5), 0.0]], dtype=torch.float64
    )
    return dict(
        policy_token_logps=(old + log_ratio).requires_grad_(True),
        old_token_logps=old,
        completion_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        advantages=torch.tensor([1.0, -1.0], dtype=torch.float64),
    )


def test_golden_grpo_and_dr_grpo():
    """ε = 0.2, so clip(r) ∈ [0.8, 1.2]; per-token loss ℓ = −min(r·A, clip(r)·A):

    row 0 (A = +1): r = 1.5 → −min(1.5, 1.2) = −1.2 (high-clipped); r = 1 → −1; r = 0.5 → −min(0.5, 0.8) = −0.5.
                    Σ = −2.7, mean over its 3 tokens −0.9.
    row 1 (A = −1): r = 0.5 → −min(−0.5, −0.8) = 0.8 (low-clipped); r = 1.5 → −min(−1.5, −1.2) = 1.5.
                    Σ = 2.3, mean over its 2 tokens 1.15.
    grpo    = (−0.9 + 1.15) / 2 = 0.125
    dr_grpo = (−2.7 + 2.3) / (2 · 3) = −0.0666…   (max_completion_length = T = 3)
    bnpo = dapo = (−2.7 + 2.3) / 5 = −0.08
    Clip rates over the 5 tokens: low 1/5, high 1/5, region 2/5; per sequence low {0, 1/2} → min 0, high {1/3, 0} →
    max 1/3.
    Gradients ∂L/∂log π = ∂ℓ/∂r · r / (normaliser), zero where the clipped branch is the minimum:
    row 0: 0 (clipped), −A·1 = −1, −A·0.5 = −0.5; row 1: 0 (clipped), −A·1.5 = 1.5, 0 (padding);
    grpo divides row 0 by 2·3 and row 1 by 2·2; dr_grpo divides everything by 2·3.
    """
    batch = _golden_batch()
    out = losses.get("grpo")(**batch)
    assert out.loss.item() == pytest.approx(0.125, abs=1e-12)
    assert out.per_example.tolist() == pytest.approx([-0.9, 1.15], abs=1e-12)
    expected = {
        "clip_ratio/low_mean": 0.2,
        "clip_ratio/high_mean": 0.2,
        "clip_ratio/region_mean": 0.4,
        "clip_ratio/low_min": 0.0,
        "clip_ratio/high_max": 1 / 3,
    }
    assert {k: v.item() for k, v in out.metrics.items()} == pytest.approx(expected, abs=1e-12)
    out.loss.backward()
    grpo_grad = torch.tensor([[0.0, -1 / 6, -0.5 / 6], [0.0, 1.5 / 4, 0.0]], dtype=torch.float64)
    assert torch.allclose(batch["policy_token_logps"].grad, grpo_grad, atol=1e-12)

    batch = _golden_batch()
    out = losses.get("dr_grpo")(**batch)
    assert out.loss.item() == pytest.approx(-0.4 / 6, abs=1e-12)
    assert out.per_example.tolist() == pytest.approx([-2.7 / 3, 2.3 / 3], abs=1e-12)
    out.loss.backward()
    dr_grad = torch.tensor([[0.0, -1 / 6, -0.5 / 6], [0.0, 1.5 / 6, 0.0]], dtype=torch.float64)
    assert torch.allclose(batch["policy_token_logps"].grad, dr_grad, atol=1e-12)
    # a larger constant only rescales: L_max = 6 halves the loss
    assert losses.get("dr_grpo", max_completion_length=6)(**_golden_batch()).loss.item() == pytest.approx(-0.4 / 12)

    for name in ("bnpo", "dapo"):
        assert losses.get(name)(**_golden_batch()).loss.item() == pytest.approx(-0.08, abs=1e-12), name


def test_golden_kl_term():
    """β·k3 per token, k3 = e^d − d − 1 with d = log π_ref − log π_θ: at d = 1 on every token of the golden batch's
    on-policy version (A = 0, so only the KL remains) the grpo loss is β(e − 2) and so is the ``kl`` metric / β;
    with the bias correction the KL is multiplied by r = 1 (same value)."""
    batch = _golden_batch()
    policy = batch["policy_token_logps"].detach()
    for correction in (True, False):
        out = losses.get("grpo", beta=0.5, use_bias_correction_kl=correction)(
            policy_token_logps=policy,
            completion_mask=batch["completion_mask"],
            advantages=torch.zeros(2, dtype=torch.float64),
            ref_token_logps=policy + 1.0,
        )
        assert out.loss.item() == pytest.approx(0.5 * (math.e - 2), abs=1e-12)
        assert out.metrics["kl"].item() == pytest.approx(math.e - 2, abs=1e-12)


# ------------------------------------------------------------------------------------------------- on-policy limit
_ON_POLICY_LENGTHS = [8, 3, 5, 1, 8, 2]  # no empty completion: every row has a per-sequence mean


@pytest.mark.parametrize("name", TOKEN_NAMES)
def test_on_policy_limit(name):
    """Without ``old_token_logps`` the loss uses ``policy.detach()``: every ratio is 1, nothing is clipped, and

    * grpo / gspo (clipped, per-sequence mean): ℓ = −A, L = −mean_i A_i, ∂L/∂log π_it = −A_i / (N |o_i|) (GSPO's
      sequence ratio spreads its derivative 1/|o_i| over the tokens: the same gradient);
    * sapo: ℓ = −(4/τ)σ(0)A = −2A/τ, gradient as grpo (the gate's slope 4σ(1−σ) is 1 at r = 1);
    * bnpo / dapo: L = −Σ_i A_i |o_i| / Σ|o|, gradient −A_i / Σ|o|;
    * dr_grpo: L = −Σ_i A_i |o_i| / (N T), gradient −A_i / (N T);
    * cispo (ε_max = 5 > 1): ℓ = −A·log π, L = −Σ_it m A log π / Σ|o|, gradient −A_i / Σ|o|.
    """
    batch = _token_batch(5, lengths=_ON_POLICY_LENGTHS)
    advantages, mask = batch["advantages"], batch["completion_mask"].double()
    counts = mask.sum(-1)
    policy = batch["policy_token_logps"].clone().requires_grad_(True)
    inputs = {"policy_token_logps": policy, "completion_mask": batch["completion_mask"], "advantages": advantages}
    out = losses.get(name)(**inputs)
    out.loss.backward()
    same = losses.get(name)(**dict(inputs, old_token_logps=policy.detach()))
    assert same.loss.item() == out.loss.item()
    assert all(v.item() == 0.0 for v in out.metrics.values())  # every clip rate is 0 (β = 0: no kl)

    n = len(_ON_POLICY_LENGTHS)
    a = advantages[:, None]
    if name in ("grpo", "gspo", "sapo"):
        grad = -a / (n * counts[:, None])
        tau = torch.where(advantages > 0, *advantages.new_tensor([1.0, 1.05]))
        value = -advantages.mean() if name != "sapo" else (-2 * advantages / tau).mean()
    elif name == "dr_grpo":
        grad, value = -a / (n * T) + 0 * mask, -(advantages * counts).sum() / (n * T)
    elif name == "cispo":
        masked = policy.detach() * mask
        grad, value = -a / counts.sum() + 0 * mask, -(a * masked).sum() / counts.sum()
    else:
        grad, value = -a / counts.sum() + 0 * mask, -(advantages * counts).sum() / counts.sum()
    assert out.loss.item() == pytest.approx(value.item(), abs=1e-12)
    assert torch.allclose(policy.grad, grad * mask, atol=1e-12)


def test_dapo_equals_bnpo_in_one_call_and_bnpo_equals_grpo_for_one_completion():
    """For one call on one process TRL's DAPO normaliser (the generation batch's token count, per process and
    accumulation window) is the call's token count, BNPO's; with one completion the token mean is its mean."""
    batch = _token_batch(6)
    assert losses.get("dapo")(**batch).loss.item() == pytest.approx(losses.get("bnpo")(**batch).loss.item(), 1e-14)
    one = {k: v[:1] for k, v in batch.items()}
    assert losses.get("bnpo")(**one).loss.item() == pytest.approx(losses.get("grpo")(**one).loss.item(), rel=1e-14)


# ---------------------------------------------------------------------------------------------- the reference input
@pytest.mark.parametrize("name", TOKEN_NAMES)
def test_beta_zero_needs_no_reference_and_beta_positive_names_it(name):
    batch = _token_batch(7)
    without_ref = {k: v for k, v in batch.items() if k != "ref_token_logps"}
    free = losses.get(name)  # β = 0, TRL's default
    assert not free.needs_reference
    assert free(**without_ref).loss.item() == free(**batch).loss.item()  # a passed reference is ignored
    plain = losses.spec(name).fn
    assert plain(**without_ref).loss.item() == free(**without_ref).loss.item()
    with pytest.raises(losses.MissingInputError, match=f"loss '{name}' needs input.s. ref_token_logps"):
        losses.get(name, beta=0.04)(**without_ref)
    with pytest.raises(losses.MissingInputError, match=f"loss '{name}' with beta > 0 needs input.s. ref_token_logps"):
        plain(**without_ref, beta=0.04)


def test_trainer_batches_of_other_kinds_are_dropped(golden_batch):
    """One trainer can pass the same batch to any loss: pair and group inputs are ignored by a token loss and token
    inputs by a pair loss; an unknown name is still an error."""
    batch = _token_batch(8)
    group = {"policy_logps": torch.zeros(2, 2), "rewards": torch.zeros(2, 2)}
    assert losses.get("grpo")(**batch, **golden_batch, **group).loss.item() == losses.get("grpo")(**batch).loss.item()
    assert losses.get("dpo")(**golden_batch, **batch).loss.item() == losses.get("dpo")(**golden_batch).loss.item()
    with pytest.raises(losses.MissingInputError, match="unexpected input.s. old_logps; its extras are none"):
        losses.get("grpo")(**batch, old_logps=batch["old_token_logps"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"policy_token_logps": torch.zeros(6)}, r"'policy_token_logps' must be \[N, T\]"),
        ({"completion_mask": torch.ones(6, 7, dtype=torch.long)}, r"'completion_mask' has shape \(6, 7\)"),
        ({"old_token_logps": torch.zeros(5, 8)}, r"'old_token_logps' has shape \(5, 8\)"),
        ({"advantages": torch.zeros(5)}, r"'advantages' must be \[N\] or \[N, T\] = \(6,\) or \(6, 8\), got \(5,\)"),
    ],
)
def test_shape_errors_name_the_input(change, message):
    with pytest.raises(losses.LossError, match=message):
        losses.get("grpo")(**dict(_token_batch(9), **change))


# ------------------------------------------------------------------------------------------- gradients and padding
@pytest.mark.parametrize("name", ["grpo", "gspo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gradcheck(name, beta):
    """Analytic gradients w.r.t. the policy's per-token log-probs equal finite differences (float64), off-policy,
    with clipping active on some tokens (GSPO: a tight ε so some sequences are clipped) and the KL term."""
    batch = _token_batch(10)
    hparams = {"beta": beta, **({"epsilon": 0.05} if name == "gspo" else {})}
    loss = losses.get(name, **hparams)
    rest = {k: v for k, v in batch.items() if k != "policy_token_logps"}
    if beta == 0:
        rest.pop("ref_token_logps")
    assert loss(**batch).metrics["clip_ratio/region_mean"].item() > 0  # the clipped branch is exercised

    def fn(policy):
        return loss(policy_token_logps=policy, **rest).loss

    policy = batch["policy_token_logps"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (policy,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", TOKEN_NAMES)
def test_padding_never_reaches_the_loss_or_the_gradient(name):
    """Anything at masked positions — log-probs whose e^x overflows float64, per-token advantages — changes neither
    the loss, the per-example values, the metrics nor the gradient, and padding receives an exact-zero gradient."""
    batch = _token_batch(12, token_advantages=True)
    padding = batch["completion_mask"] == 0
    wild = {k: v.clone() for k, v in batch.items()}
    wild["policy_token_logps"][padding] = 900.0
    wild["old_token_logps"][padding] = -900.0
    wild["ref_token_logps"][padding] = 800.0
    wild["advantages"][padding] = 1e6
    loss = losses.get(name, beta=0.04)
    grads, outs = [], []
    for inputs in (batch, wild):
        policy = inputs["policy_token_logps"].clone().requires_grad_(True)
        out = loss(**dict(inputs, policy_token_logps=policy))
        out.loss.backward()
        grads.append(policy.grad)
        outs.append(out)
    assert torch.equal(outs[0].loss, outs[1].loss) and torch.equal(outs[0].per_example, outs[1].per_example)
    assert {k: v.item() for k, v in outs[0].metrics.items()} == {k: v.item() for k, v in outs[1].metrics.items()}
    assert torch.equal(grads[0], grads[1])
    assert not grads[1][padding].any() and grads[1][~padding].any()


# ---------------------------------------------------------------------------------------------------- advantages
def test_group_advantages_golden():
    """rewards [[1, 2, 3], [0, 0, 0]]: group means 2 and 0; group std 1 (Bessel) and 0; batch std of all six
    sqrt(Σ(r − 1)² / 5) = sqrt(8/5)."""
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    centred = [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert losses.group_advantages(rewards, "none").tolist() == centred
    group = losses.group_advantages(rewards)  # "group" is TRL's default
    assert group.tolist() == pytest.approx([c / (1 + 1e-4) for c in centred[:3]] + [0.0] * 3, abs=1e-15)
    batch = losses.group_advantages(rewards, "batch")
    assert batch.tolist() == pytest.approx([c / (math.sqrt(8 / 5) + 1e-4) for c in centred], abs=1e-15)
    assert not losses.group_advantages(torch.randn(4, 1), "group").any()  # K = 1: no signal (σ = 0 as in TRL)


def test_group_advantages_rejects_bad_input():
    with pytest.raises(losses.HyperParameterError, match=r"scale_rewards must be one of \['group', 'batch', 'none'\]"):
        losses.group_advantages(torch.zeros(2, 2), "std")
    with pytest.raises(losses.LossError, match=r"'rewards' must be \[G, K\].*got shape \(4,\)"):
        losses.group_advantages(torch.zeros(4))


# ------------------------------------------------------------------------------------------------------- properties
@st.composite
def _on_policy_batches(draw):
    n = draw(st.integers(min_value=1, max_value=5))
    t = draw(st.integers(min_value=1, max_value=6))
    lengths = draw(st.lists(st.integers(min_value=1, max_value=t), min_size=n, max_size=n))
    values = st.floats(min_value=-20.0, max_value=-0.01)
    policy = torch.tensor(draw(st.lists(values, min_size=n * t, max_size=n * t)), dtype=torch.float64)
    advantages = torch.tensor(draw(st.lists(st.floats(-10, 10), min_size=n, max_size=n)), dtype=torch.float64)
    return policy.reshape(n, t), _mask(lengths, t), advantages


@settings(max_examples=30, deadline=None)
@given(batch=_on_policy_batches(), name=st.sampled_from(["grpo", "gspo", "sapo"]))
def test_on_policy_gradient_is_minus_advantage_over_tokens(batch, name):
    """On-policy, grpo, gspo and sapo all have the gradient −A_i / (N |o_i|) on every completion token (GRPO's
    policy gradient), whatever the log-probs; zero on padding."""
    policy, mask, advantages = batch
    leaf = policy.clone().requires_grad_(True)
    losses.get(name)(policy_token_logps=leaf, completion_mask=mask, advantages=advantages).loss.backward()
    counts = mask.sum(-1, keepdim=True).double()
    expected = -advantages[:, None] / (len(advantages) * counts) * mask
    assert torch.allclose(leaf.grad, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", TOKEN_NAMES)
def test_kl_estimators_by_hand(name):
    """kl_estimator: the masked token mean of k3 = e^d − d − 1 (the default, TRL's), k2 = d²/2, k1 = −d with
    d = log π_ref − log π_θ, on-policy (ratio 1, so the bias correction changes nothing)."""
    policy = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    ref = policy + torch.tensor([[0.5, -0.3, 0.2]], dtype=torch.float64)  # d
    mask = torch.tensor([[1, 1, 0]])
    d = torch.tensor([0.5, -0.3])
    expected = {"k3": (torch.expm1(d) - d).mean(), "k2": (d.square() / 2).mean(), "k1": (-d).mean()}
    for estimator, value in expected.items():
        out = losses.get(name, beta=0.1, kl_estimator=estimator)(
            policy_token_logps=policy, completion_mask=mask, advantages=torch.zeros(1), ref_token_logps=ref
        )
        assert out.metrics["kl"].item() == pytest.approx(value.item()), estimator
    with pytest.raises(losses.HyperParameterError, match="kl_estimator must be one of"):
        losses.get(name, kl_estimator="k4")
