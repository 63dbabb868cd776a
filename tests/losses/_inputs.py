"""Random, valid inputs for any registered loss, built from its declaration (the way a trainer builds a batch)."""

from pathlib import Path

import torch
import yaml

import losses

CONF = Path(__file__).resolve().parents[2] / "conf" / "loss"
# pairs (or, for group losses, prompts; for token and unpaired losses, completions) per batch; regularisation samples
B, R = 5, 4
K = 4  # samples per prompt for group losses
T = 6  # padded completion length for token losses

# the input that carries the policy's gradient, and that a test perturbs, for each kind of loss
POLICY_INPUT = {
    "pair": "policy_rejected_logps",
    "group": "policy_logps",
    "token": "policy_token_logps",
    "unpaired": "policy_logps",
    "reward": "chosen_scores",
}
UNPAIRED_LABELS = (True, False, True, True, False)  # B rows: unequal sides, 3 desirable and 2 undesirable


def config_hparams(name: str) -> dict:
    """The hyper-parameters of ``conf/loss/NAME.yaml`` (what a user runs by default)."""
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    cfg.pop("name")
    return cfg


def _extra(name: str, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    lengths = {"reg_lengths": R, "sft_lengths": 3}
    if name in lengths:
        return torch.randint(1, 9, (lengths[name],), generator=gen)
    if name in ("reg_logps", "reg_ref_logps"):
        return -(torch.rand(R, generator=gen, dtype=dtype) * 10 + 0.5)
    if name == "sft_logps":
        return -(torch.rand(3, generator=gen, dtype=dtype) * 10 + 0.5)
    if name.startswith("aux_rewards_"):
        return torch.randn(B, generator=gen, dtype=dtype)
    raise KeyError(f"no test generator for extra input {name!r}: add one to tests/losses/_inputs.py")


def make_inputs(loss: losses.BoundLoss, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict:
    """Every input the loss requires or accepts, random but valid (log-probs < 0, lengths >= 1); group losses get
    ``[B, K]`` group inputs (B prompts, K samples each), token losses ``[B, T]`` per-token inputs, unpaired losses
    ``[B]`` labelled completions (and ``[B]`` mismatched pairs), reward losses ``[B]`` scores."""
    gen = torch.Generator().manual_seed(seed)
    if loss.requirements.kind == "group":
        return make_group_inputs(loss, gen, dtype)
    if loss.requirements.kind == "token":
        return make_token_inputs(loss, gen, dtype)
    if loss.requirements.kind == "unpaired":
        return make_unpaired_inputs(loss, gen, dtype)
    if loss.requirements.kind == "reward":
        return make_reward_inputs(loss, gen, dtype)
    lengths = torch.randint(1, 9, (2, B), generator=gen)
    logps = -(torch.rand(4, B, generator=gen, dtype=dtype) * 1.5 + 0.1) * torch.cat([lengths, lengths]).to(dtype)
    standard = dict(
        policy_chosen_logps=logps[0],
        policy_rejected_logps=logps[1],
        ref_chosen_logps=logps[2],
        ref_rejected_logps=logps[3],
        chosen_lengths=lengths[0],
        rejected_lengths=lengths[1],
    )
    req = loss.requirements
    inputs = {k: v for k, v in standard.items() if k in req.inputs or k in req.optional_inputs or k.startswith("pol")}
    for name in (*req.extras, *req.optional_extras):
        inputs[name] = _extra(name, gen, dtype)
    return inputs


def make_group_inputs(loss: losses.BoundLoss, gen: torch.Generator, dtype: torch.dtype) -> dict:
    """``policy_logps``, ``ref_logps``, ``rewards``, ``lengths``, each [B, K], as a sampler and a reward model give."""
    lengths = torch.randint(1, 9, (B, K), generator=gen)
    logps = -(torch.rand(2, B, K, generator=gen, dtype=dtype) * 1.5 + 0.1) * lengths.to(dtype)
    group = dict(
        policy_logps=logps[0],
        ref_logps=logps[1],
        rewards=torch.randn(B, K, generator=gen, dtype=dtype),
        lengths=lengths,
    )
    req = loss.requirements
    inputs = {k: v for k, v in group.items() if k in req.inputs or k in req.optional_inputs}
    for name in (*req.extras, *req.optional_extras):
        inputs[name] = _extra(name, gen, dtype)
    return inputs


def make_token_inputs(loss: losses.BoundLoss, gen: torch.Generator, dtype: torch.dtype) -> dict:
    """``policy_token_logps``, ``old_token_logps``, ``ref_token_logps``, ``completion_mask`` [B, T] and
    ``advantages`` and ``rewards`` [B], as a sampler gives them: completions of 1..T tokens right-padded with zeros,
    per-token log-probs in [-2.05, -0.05] (so log-ratios within ±2 and some ratios clipped), advantages and rewards
    ~ N(0, 1)."""
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    logps = -(torch.rand(3, B, T, generator=gen, dtype=dtype) * 2 + 0.05) * mask.to(dtype)
    token = dict(
        policy_token_logps=logps[0],
        old_token_logps=logps[1],
        ref_token_logps=logps[2],
        completion_mask=mask,
        advantages=torch.randn(B, generator=gen, dtype=dtype),
        rewards=torch.randn(B, generator=gen, dtype=dtype),  # one per completion, for losses that shape their own
        values=torch.randn(B, T, generator=gen, dtype=dtype) * mask.to(dtype),  # a critic's, for ppo
    )
    req = loss.requirements
    return {k: v for k, v in token.items() if k in req.inputs or k in req.optional_inputs}


def make_unpaired_inputs(loss: losses.BoundLoss, gen: torch.Generator, dtype: torch.dtype) -> dict:
    """``policy_logps``, ``ref_logps`` [B] summed over 1..8 tokens, ``labels`` [B] (``UNPAIRED_LABELS``: both sides,
    unequal), and ``policy_kl_logps``, ``ref_kl_logps`` [B] for the B mismatched pairs TRL builds (each prompt with
    the previous row's completion), summed over that completion's tokens."""
    lengths = torch.randint(1, 9, (B,), generator=gen).to(dtype)
    tokens = torch.stack([lengths, lengths, lengths.roll(1), lengths.roll(1)])
    logps = -(torch.rand(4, B, generator=gen, dtype=dtype) * 1.5 + 0.1) * tokens
    unpaired = dict(
        policy_logps=logps[0],
        ref_logps=logps[1],
        labels=torch.tensor(UNPAIRED_LABELS),
        policy_kl_logps=logps[2],
        ref_kl_logps=logps[3],
    )
    req = loss.requirements
    return {k: v for k, v in unpaired.items() if k in req.inputs or k in req.optional_inputs}


def make_reward_inputs(loss: losses.BoundLoss, gen: torch.Generator, dtype: torch.dtype) -> dict:
    """``chosen_scores``, ``rejected_scores`` [B] ~ N(0, 1), a reward model's scores (any sign), and ``margins`` [B]
    in [0, 1) when the loss accepts them."""
    scores = torch.randn(2, B, generator=gen, dtype=dtype)
    reward = dict(
        chosen_scores=scores[0],
        rejected_scores=scores[1],
        margins=torch.rand(B, generator=gen, dtype=dtype),
    )
    req = loss.requirements
    return {k: v for k, v in reward.items() if k in req.inputs or k in req.optional_inputs}
