"""The online trainer's sampling options for the RL family: steps_per_generation (one draw, several optimizer steps
on its slices, resumable inside a generation), mask_truncated_completions, DAPO's soft overlong punishment and
dynamic sampling, and the KL in the reward; their config errors are one line."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import prefopt
from prefopt.build import build
from prefopt.config import ConfigError
from prefopt.scoring import Scores
from prefopt.settings import SamplingSettings
from prefopt.sources import OnlineSource

from .test_online import ONLINE, cache_dir, lines, run  # noqa: F401 - the module's cached SFT base

__all__ = ["cache_dir"]


def test_steps_per_generation_trains_on_slices_of_one_draw_and_resumes_inside_it(tmp_path, cache_dir):  # noqa: F811
    """Two steps per draw: steps 1 and 2 train on the two halves of one generation (different prompts, the same
    sampling statistics), steps 3 and 4 on the next; a run resumed at step 1 (inside a generation) continues with the
    same losses."""
    common = ["loss=grpo", "reward=length", "trainer.max_steps=4", "trainer.online.steps_per_generation=2"]
    common += ["trainer.lr=5e-3", "trainer.save_every=1", "trainer.online.table_every=0"]
    full = run(tmp_path, cache_dir, *common, name="full")
    logged = [x for x in lines(full) if "loss" in x]
    rewards = [x["online/reward/mean"] for x in logged]
    assert rewards[0] == rewards[1] and rewards[2] == rewards[3] and rewards[1] != rewards[2]  # one draw per 2 steps
    assert logged[0]["loss"] != logged[1]["loss"]  # different slices
    resumed = run(tmp_path, cache_dir, *common, f"trainer.resume={tmp_path}/full/checkpoints/step-1", name="resumed")
    again = [x for x in lines(resumed) if "loss" in x]
    assert [(x["step"], x["loss"]) for x in again] == [(x["step"], x["loss"]) for x in logged[1:]]


def test_slices_are_different_prompts_and_later_slices_get_old_log_probs(tmp_path, cache_dir):  # noqa: F811
    cfg = prefopt.compose(
        [*ONLINE, f"cache_dir={cache_dir}", "loss=grpo", "reward=length", "trainer.online.steps_per_generation=2"]
    )
    run_ = build(cfg, tmp_path / "run")
    policy = run_.accelerator.unwrap_model(run_.policy)
    first, second = run_.source.draw(policy, 0), run_.source.draw(policy, 1)
    prompts = [[tuple(g["prompt_ids"]) for m in d.micro_batches for g in m] for d in (first, second)]
    assert len(prompts[0]) == len(prompts[1]) == 8 and not set(prompts[0]) & set(prompts[1])
    assert all("old_token_logps" in g for d in (first, second) for m in d.micro_batches for g in m)
    assert run_.source.draw(policy, 2) is not first  # step 2 starts the next generation


def test_early_stopping_ends_a_draw_once_the_policy_has_moved_and_resumes_after_it(tmp_path, cache_dir):  # noqa: F811
    """num_iterations=3: each draw serves 3 steps. The first step on a draw trains on its own samples (approx KL to
    the sampling policy ~0); after it the policy has moved, so with a tiny target_kl the second step's approx KL is
    past 1.5 × target: that step still trains (as TRL's PPO finishes its minibatch) and the third draws anew, so
    draws begin at steps 1, 3, 5. A huge target never stops (draws at 1, 4). Runs resumed from the checkpoint of an
    early-stopped step and from inside the draw after it continue with the same losses."""
    common = ["loss=ppo", "reward=length", "trainer.max_steps=5", "trainer.online.num_iterations=3"]
    common += ["trainer.lr=5e-3", "trainer.save_every=1", "trainer.online.table_every=0"]
    common += ["trainer.online.early_stopping=true"]

    def draws_and_lines(name, *extra):
        logged = [x for x in lines(run(tmp_path, cache_dir, *common, *extra, name=name)) if "loss" in x]
        rewards = [x["online/reward/mean"] for x in logged]
        return [i + 1 for i in range(len(rewards)) if i == 0 or rewards[i] != rewards[i - 1]], logged

    starts, logged = draws_and_lines("tiny", "trainer.online.target_kl=1e-9")
    assert starts == [1, 3, 5]
    assert [x.get("online/early_stopped", 0.0) for x in logged] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert logged[0]["policy/approxkl"] < 1e-9 < logged[1]["policy/approxkl"]
    starts, _ = draws_and_lines("huge", "trainer.online.target_kl=1e9")
    assert starts == [1, 4]
    for at in (2, 3):  # after the early stop (a new draw next), inside the draw that began after it
        resumed = run(
            tmp_path,
            cache_dir,
            *common,
            "trainer.online.target_kl=1e-9",
            f"trainer.resume={tmp_path}/tiny/checkpoints/step-{at}",
            name=f"resumed-{at}",
        )
        again = [x for x in lines(resumed) if "loss" in x]
        assert [(x["step"], x["loss"]) for x in again] == [(x["step"], x["loss"]) for x in logged[at:]]


def test_token_layout_reports_the_approx_kl_to_the_sampling_policy():
    """0.5 · mean over real tokens of (log π − log π_old)²: rows with log-ratios (0.2, −0.4) and (0.6, pad)."""
    from prefopt.step import TokenLayout

    inputs = {
        "policy_token_logps": torch.tensor([[-1.0, -2.0], [-0.5, -9.0]]),
        "old_token_logps": torch.tensor([[-1.2, -1.6], [-1.1, 0.0]]),
        "completion_mask": torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
    }
    expected = 0.5 * (0.2**2 + 0.4**2 + 0.6**2) / 3
    assert TokenLayout.metrics(inputs)["policy/approxkl"].item() == pytest.approx(expected)
    assert TokenLayout.metrics({k: v for k, v in inputs.items() if k != "old_token_logps"}) == {}


def _settings(**values) -> SimpleNamespace:
    return SimpleNamespace(sampling=SamplingSettings.from_mapping(values))


def test_overlong_punishment_and_kl_in_the_reward_by_hand():
    """DAPO §3.4 with L = 20, buffer 8 (punished from 12 tokens): lengths 10, 16, 20 lose 0, 4/8 and 8/8 (× the
    penalty 2); the KL in the reward subtracts 0.1 × (log π − log π_ref) of each completion."""
    sampled = {
        "scores": Scores(torch.tensor([1.0, 1.0, 1.0]), {}),
        "completions": [[5] * 10, [5] * 16, [5] * 20],
        "policy_logps": torch.tensor([-3.0, -4.0, -5.0]),
        "ref_logps": torch.tensor([-4.0, -4.0, -2.0]),
    }
    shaped = OnlineSource._shaped(_settings(max_new_tokens=20, overlong_buffer=8, overlong_penalty=2.0), sampled)
    assert shaped.tolist() == pytest.approx([1.0, 1.0 - 2 * 0.5, 1.0 - 2 * 1.0])
    shaped = OnlineSource._shaped(_settings(kl_reward_coef=0.1), sampled)
    assert shaped.tolist() == pytest.approx([1.0 - 0.1 * 1.0, 1.0, 1.0 - 0.1 * -3.0])
    assert OnlineSource._shaped(_settings(), sampled).tolist() == [1.0, 1.0, 1.0]  # both off by default


def test_mask_truncated_completions_gives_no_loss_to_completions_cut_short(tmp_path, cache_dir, monkeypatch):  # noqa: F811
    """max_new_tokens 6: most completions are cut before their EOS; their mask rows are zero, the others' are not."""
    from .test_ppo_online import _Spy

    seen = []
    from prefopt import build as build_module

    original = build_module.build_loss
    monkeypatch.setattr(build_module, "build_loss", lambda cfg: _Spy(original(cfg), seen))
    overrides = ["loss=grpo", "reward=length", "trainer.max_steps=1", "trainer.online.max_new_tokens=6"]
    overrides += ["trainer.online.mask_truncated_completions=true", "trainer.micro_batch_size=8"]
    drawn = []
    original_groups = OnlineSource._groups

    def groups(self, sampled, n):
        drawn.append((sampled["completions"], self.tokenizer.eos_token_id))
        return original_groups(self, sampled, n)

    monkeypatch.setattr(OnlineSource, "_groups", groups)
    run(tmp_path, cache_dir, *overrides, name="mask")
    mask, (completions, eos) = seen[0]["completion_mask"], drawn[-1]
    cut = [len(c) >= 6 and c[-1] != eos for c in completions]
    assert any(cut) and not all(cut)
    for row, is_cut in enumerate(cut):
        assert bool((mask[row] == 0).all()) == is_cut, row


def test_dynamic_sampling_replaces_tied_groups(tmp_path, cache_dir):  # noqa: F811
    """A constant reward ties every group: dynamic sampling takes its 2 extra rounds, still finds none, and fills
    the batch with tied groups (counted); a reward that rarely ties needs no extra round."""
    common = ["loss=grpo", "trainer.max_steps=1", "trainer.online.dynamic_sampling=true"]
    common += ["trainer.online.dynamic_sampling_rounds=2"]
    tied = run(tmp_path, cache_dir, *common, "reward=constant", name="tied")
    line = [x for x in lines(tied) if "loss" in x][0]
    assert line["online/dynamic_sampling_rounds"] == 2 and line["online/dynamic_sampling_filled_frac"] == 1.0
    assert line["online/items"] == 8  # the batch is full all the same
    varied = run(tmp_path, cache_dir, *common, "reward=length", name="varied")
    line = [x for x in lines(varied) if "loss" in x][0]
    assert line["online/dynamic_sampling_rounds"] == 0 and line["online/dynamic_sampling_filled_frac"] == 0.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=dpo", "trainer.online.steps_per_generation=2"], "steps_per_generation=2 needs a token loss"),
        (["loss=rloo", "trainer.online.mask_truncated_completions=true"], "needs a token loss"),
        (["loss=dpo", "trainer.online.dynamic_sampling=true"], "dynamic_sampling is for group and token losses"),
        (["loss=grpo", "trainer.online.overlong_buffer=99"], "overlong_buffer=99 must be <= max_new_tokens"),
        (["loss=grpo", "trainer.online.steps_per_generation=0"], "steps_per_generation must be >= 1"),
        (["loss=grpo", "trainer.online.early_stopping=true"], "early_stopping=true ends the later steps of a draw"),
        (["loss=rloo", "trainer.online.early_stopping=true", "trainer.online.num_iterations=2"], "needs a token loss"),
        (["loss=ppo", "trainer.online.target_kl=0"], "target_kl must be > 0"),
    ],
)
def test_option_errors_are_one_line(tmp_path, cache_dir, overrides, message):  # noqa: F811
    with pytest.raises(ConfigError, match=message) as error:
        run(tmp_path, cache_dir, *overrides, "reward=length", "trainer.max_steps=1", name="bad")
    assert "\n" not in str(error.value)
    assert Path(tmp_path).exists()
