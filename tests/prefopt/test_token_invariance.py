"""Token losses give the same update however the step's batch is split: 1 micro-batch vs 4 accumulated, and 1
process vs 2 (each process's gradient of its half, averaged as DDP averages them), for every token loss and every
kind of normaliser. What makes it hold is what the sampler computes over the whole step's batch (advantages with
``scale_rewards=batch``'s global std, ``batch_tokens`` for the token-mean losses), every call's T being
``max_new_tokens`` (Dr. GRPO's constant), and the step sums of the losses that whiten (ppo, reinforce_pp), totalled
over the step before its first micro-batch. TRL #5619 and ms-swift #10117 were this bug."""

from pathlib import Path

import pytest
import torch

import losses
import prefopt
from prefopt.build import build
from prefopt.step import forward_backward, step_totals

from .test_online import ONLINE

TOKEN_LOSSES = sorted(n for n in losses.available() if losses.spec(n).kind == "token")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("invariance-cache")


def gradient(run, micro_batches: list[list[dict]], shared: dict) -> dict[str, torch.Tensor]:
    run.optimizer.zero_grad()
    _, problem = forward_backward(run.accelerator, run.policy, run.step, micro_batches, 0, shared)
    assert problem is None
    return {n: p.grad.detach().clone() for n, p in run.policy.named_parameters() if p.grad is not None}


def built(tmp_path: Path, cache_dir: Path, loss: str, micro: int, name: str):
    overrides = [f"loss={loss}", "reward=length", "trainer.batch_size=4", f"trainer.micro_batch_size={micro}"]
    overrides += ["trainer.online.scale_rewards=batch", "trainer.online.fit_prompts=4"]
    overrides += ["loss.beta=0.04"] if loss not in ("reinforce_pp", "ppo") else []  # their default beta > 0
    run = build(prefopt.compose([*ONLINE, f"cache_dir={cache_dir}", *overrides]), tmp_path / name)
    draw = run.source.draw(run.accelerator.unwrap_model(run.policy), 0)
    return run, draw


@pytest.mark.parametrize("loss", TOKEN_LOSSES)
def test_accumulation_and_processes_do_not_change_the_update(tmp_path, cache_dir, loss):
    whole, draw_1 = built(tmp_path, cache_dir, loss, micro=4, name="one")
    split, draw_4 = built(tmp_path, cache_dir, loss, micro=1, name="four")
    assert len(draw_1.micro_batches) == 1 and len(draw_4.micro_batches) == 4
    groups = draw_1.micro_batches[0]
    assert [g["completions"] for g in groups] == [m[0]["completions"] for m in draw_4.micro_batches]  # same samples
    rewards = torch.tensor([g["rewards"] for g in groups])
    assert len({c for g in groups for c in map(len, g["completions"])}) > 1 and rewards.std() > 0  # not a tie
    reference = gradient(whole, draw_1.micro_batches, draw_1.inputs)
    accumulated = gradient(split, draw_4.micro_batches, draw_4.inputs)
    assert reference.keys() == accumulated.keys() and reference
    for name, value in reference.items():
        assert torch.allclose(accumulated[name], value, rtol=1e-4, atol=1e-7), name
    # two processes, each with half of the groups: the statistics are the global batch's (a process's batch_tokens
    # is the global count per call; the loss's step sums are all-reduced, i.e. the whole batch's), and DDP averages
    # the two gradients
    halves = [groups[:2], groups[2:]]
    shared = {k: v / 2 if k == "batch_tokens" else v for k, v in draw_1.inputs.items()}
    shared.update(step_totals(whole.accelerator, whole.policy, whole.step, [groups], 0, shared))
    assert set(shared) == {"batch_tokens", *whole.step.step_sums}
    per_process = [gradient(whole, [half], shared) for half in halves]
    for name, value in reference.items():
        averaged = (per_process[0][name] + per_process[1][name]) / 2
        assert torch.allclose(averaged, value, rtol=1e-4, atol=1e-7), name
