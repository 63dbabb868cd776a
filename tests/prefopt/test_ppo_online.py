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


def test_adaptive_kl_controller_by_hand():
    """Ziegler et al.'s controller with ALaRM's setting (β0 0.2, target 6, horizon 10000) and 32 samples a step:
    KL 9 is 50% over: the error is clipped to 0.2, β × (1 + 0.2·32/10000); KL 6.6: error 0.1; KL 3: clipped −0.2."""
    from prefopt.critic import AdaptiveKL

    controller = AdaptiveKL(0.2, 6.0, 10000, 32)
    controller.on_metrics(1, {"online/kl": 9.0})
    assert controller.value == pytest.approx(0.2 * 1.00064)
    controller.on_metrics(2, {"online/kl": 6.6})
    assert controller.value == pytest.approx(0.2 * 1.00064 * 1.00032)
    controller.on_metrics(3, {"online/kl": 3.0})
    assert controller.value == pytest.approx(0.2 * 1.00064 * 1.00032 * (1 - 0.00064))
    controller.on_metrics(4, {})  # nothing sampled: unchanged
    assert controller.state() == {"kl_coef": pytest.approx(0.2 * 1.00064 * 1.00032 * (1 - 0.00064))}


def test_adaptive_kl_coefficient_moves_and_resumes(tmp_path, cache_dir):  # noqa: F811
    """loss.kl_target: the coefficient the loss used each step is logged (ppo/kl_coef), moves with the sampled KL
    (here the target is far below it, so it only grows), and a run resumed from step 2 continues with the same
    coefficients and losses."""
    common = ["loss=ppo", "loss.beta=0.2", "loss.kl_target=0.01", "loss.kl_horizon=100", "reward=lexicon"]
    common += ["trainer.lr=3e-3", "trainer.max_steps=4", "trainer.save_every=2"]
    full = run(tmp_path, cache_dir, *common, name="full")
    logged = [x for x in lines(full) if "ppo/kl_coef" in x]
    coefs = [x["ppo/kl_coef"] for x in logged]
    assert coefs[0] == pytest.approx(0.2) and all(b > a for a, b in zip(coefs[1:], coefs[2:], strict=False))
    resumed = run(tmp_path, cache_dir, *common, f"trainer.resume={tmp_path}/full/checkpoints/step-2", name="resumed")
    again = [x for x in lines(resumed) if "ppo/kl_coef" in x]
    assert [(x["step"], x["ppo/kl_coef"], x["loss"]) for x in again] == [
        (x["step"], x["ppo/kl_coef"], x["loss"]) for x in logged if x["step"] > 2
    ]


def test_old_values_are_the_sampling_time_values_when_a_draw_serves_two_steps(tmp_path, cache_dir, monkeypatch):  # noqa: F811
    """num_iterations=2 with ppo: the values at sampling time come with the draw as old_values: equal to the values at
    the draw's first step (same weights), unchanged at its second step while the values have moved."""
    seen = []
    from prefopt import build as build_module

    original = build_module.build_loss
    monkeypatch.setattr(build_module, "build_loss", lambda cfg: _Spy(original(cfg), seen))
    overrides = ["loss=ppo", "reward=lexicon", "trainer.max_steps=2", "trainer.online.num_iterations=2"]
    run(tmp_path, cache_dir, *overrides, "trainer.lr=1e-2", "trainer.micro_batch_size=8", name="mu")
    first, second = seen[0], seen[1]
    mask = first["completion_mask"].bool()
    assert torch.allclose(first["old_values"][mask], first["values"][mask], atol=1e-5)
    assert torch.equal(first["old_values"], second["old_values"])
    assert not torch.allclose(second["values"][mask], second["old_values"][mask], atol=1e-4)
