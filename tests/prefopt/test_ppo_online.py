"""PPO in the online trainer: the value head (provider 'values') trains with the policy, per-token rewards (ALaRM's
token vector) reach the loss with every response's values right-aligned to its own last token, and PPO raises the
reward on the embedded task."""

import pytest
import torch

import losses
from prefopt.critic import HEAD
from prefopt.scoring import AlarmScorer
from prefopt.step import right_aligned

from .test_online import cache_dir, lines, run  # noqa: F401 - the module's cached SFT base

__all__ = ["cache_dir"]


def test_right_aligned_puts_each_vector_on_its_own_rows_last_tokens():
    """Rows of 3, 5 and 1 real tokens (left-aligned, T = 6): a vector as long as its row fills it; a shorter one
    ends on the row's last real token (not on column T − 1, not on the longest row's last token); a longer one keeps
    its last values."""
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    out = right_aligned([[1.0, 2.0, 3.0], [4.0, 5.0], [6.0, 7.0]], mask)
    assert out.tolist() == [
        [1.0, 2.0, 3.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 4.0, 5.0, 0.0],
        [7.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ]


class _Spy:
    def __init__(self, bound, seen):
        self.bound, self.seen = bound, seen

    def __getattr__(self, name):
        return getattr(self.bound, name)

    def __call__(self, **inputs):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return self.bound(**inputs)


def test_alarm_token_rewards_reach_ppo_on_each_rows_last_token(tmp_path, cache_dir, monkeypatch):  # noqa: F811
    """reward=alarm with ppo: the loss gets ALaRM's per-token rewards [N, T] — each row's values on its own tokens,
    the last value (holistic term + last-token aspects) on the row's last real token, zeros after it, summing to the
    row's sequence reward — and the value head's values for the same positions."""
    seen, scored = [], []
    from prefopt import build as build_module

    original_loss = build_module.build_loss
    monkeypatch.setattr(build_module, "build_loss", lambda cfg: _Spy(original_loss(cfg), seen))
    original_call = AlarmScorer.__call__

    def record(self, prompts, texts, pieces):
        scores = original_call(self, prompts, texts, pieces)
        scored.append(scores)
        return scores

    monkeypatch.setattr(AlarmScorer, "__call__", record)
    overrides = ["loss=ppo", "reward=alarm", "trainer.max_steps=1", "trainer.micro_batch_size=8"]
    run(tmp_path, cache_dir, *overrides, name="alarm")
    inputs, scores = seen[0], scored[-1]  # the step's one micro-batch and the draw's scores (after the fit's)
    mask, placed = inputs["completion_mask"], inputs["token_rewards"]
    lengths = mask.sum(dim=1).long()
    assert len(set(lengths.tolist())) > 1  # unequal lengths: where the bug would show
    assert len(scores.tokens) == mask.shape[0]
    for row, vector in enumerate(scores.tokens):
        n = int(lengths[row])
        assert vector.numel() == n  # one value per completion token (EOS included)
        assert placed[row, n - 1].item() == pytest.approx(vector[-1].item())  # the last term on the last token
        assert torch.allclose(placed[row, :n], vector)
        assert (placed[row, n:] == 0).all()
    assert torch.allclose(placed.sum(dim=1), inputs["rewards"].reshape(-1), atol=1e-5)  # Σ_t R_t = the reward
    assert inputs["values"].shape == mask.shape and (inputs["values"] == 0).all()  # zero-initialised head


def test_ppo_trains_its_value_head_and_raises_the_reward(tmp_path, cache_dir):  # noqa: F811
    summary = run(
        tmp_path, cache_dir, "loss=ppo", "reward=lexicon", "trainer.max_steps=12", "trainer.lr=3e-3",
        "trainer.eval_every=12", "trainer.online.eval_prompts=8", name="ppo",
    )  # fmt: skip
    logged = lines(summary)
    rewards = [x["online/reward/mean"] for x in logged if "online/reward/mean" in x]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4  # the reward rises
    assert logged[-2]["value/loss"] > 0 and "policy/clipfrac" in logged[-2]
    from safetensors.torch import load_file

    weights = load_file(f"{summary['model_dir']}/model.safetensors")
    assert weights[f"{HEAD}.weight"].abs().sum() > 0  # trained (it starts at zero) and saved with the policy
    assert losses.spec("ppo").kind == "token"
