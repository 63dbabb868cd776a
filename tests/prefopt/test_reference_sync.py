"""TR-DPO's moving reference (reference.sync): the update equals TRL's SyncRefModelCallback, a hard copy makes the
next step's log-ratios zero (DPO's loss is then exactly log 2), the reference's weights are checkpointed (a resumed
run logs the same losses), and configs it cannot work with are one-line errors."""

import math

import pytest
import torch

from prefopt.config import ConfigError
from prefopt.reference import Reference

from .test_trainer import cache_dir, metrics, run  # noqa: F401 - the module's cache

__all__ = ["cache_dir"]


def _tiny(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    return LlamaForCausalLM(config)


def test_soft_update_equals_trls_sync_ref_model_callback():
    from trl.trainer.callbacks import SyncRefModelCallback

    policy, start = _tiny(0), _tiny(1)
    ours = Reference(_tiny(1), pad_id=0, device="cpu")
    theirs = _tiny(1)
    ours.sync(policy, 0.6)
    SyncRefModelCallback._sync_target_model(policy, theirs, 0.6)
    for (name, a), (_, b), (_, p), (_, r) in zip(
        ours.model.named_parameters(), theirs.named_parameters(), policy.named_parameters(),
        start.named_parameters(), strict=True,
    ):  # fmt: skip
        assert torch.equal(a, b), name
        assert torch.allclose(a, 0.6 * p + 0.4 * r), name


def test_hard_copy_zeroes_the_next_steps_log_ratios_and_a_resume_continues_exactly(tmp_path, cache_dir):  # noqa: F811
    common = ["loss=dpo", "reference.mode=live", "reference.sync.every=2", "trainer.max_steps=4", "trainer.lr=0.01"]
    full = run(tmp_path, cache_dir, *common, "reference.sync.alpha=1.0", "trainer.save_every=2", name="hard")
    losses = {x["step"]: x["loss"] for x in metrics(full) if "loss" in x}
    assert losses[3] == pytest.approx(math.log(2), abs=1e-6)  # the reference is the policy of step 2
    assert losses[2] != pytest.approx(math.log(2), abs=1e-4)
    fixed = run(tmp_path, cache_dir, "loss=dpo", "reference.mode=live", "trainer.max_steps=4", "trainer.lr=0.01",
                name="fixed")  # fmt: skip
    assert {x["step"]: x["loss"] for x in metrics(fixed) if "loss" in x}[3] != pytest.approx(losses[3], abs=1e-4)
    resumed = run(
        tmp_path, cache_dir, *common, "reference.sync.alpha=1.0",
        f"trainer.resume={tmp_path}/hard/checkpoints/step-2", name="resumed",
    )  # fmt: skip
    assert {x["step"]: x["loss"] for x in metrics(resumed) if "loss" in x} == {k: v for k, v in losses.items() if k > 2}


def test_soft_update_resumes_exactly(tmp_path, cache_dir):  # noqa: F811
    common = ["loss=ipo", "reference.mode=live", "reference.sync.every=1", "reference.sync.alpha=0.5"]
    common += ["trainer.max_steps=4", "trainer.lr=0.01"]
    full = run(tmp_path, cache_dir, *common, "trainer.save_every=2", name="soft")
    resumed = run(tmp_path, cache_dir, *common, f"trainer.resume={tmp_path}/soft/checkpoints/step-2", name="again")
    tail = {x["step"]: x["loss"] for x in metrics(full) if "loss" in x and x["step"] > 2}
    assert {x["step"]: x["loss"] for x in metrics(resumed) if "loss" in x} == tail


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=dpo", "reference.sync.every=2"], "cannot be a precomputed table: set reference.mode=live"),
        (["loss=simpo", "reference.mode=live", "reference.sync.every=2"], "uses no reference model to move"),
        (["loss=dpo", "reference.mode=live", "reference.sync.every=2", "model.lora.r=4"], "fresh LoRA adapter"),
        (["loss=dpo", "reference.sync.alpha=0"], r"reference.sync.alpha must lie in \(0, 1\]"),
        (["loss=dpo", "reference.sync.every=-1"], "reference.sync.every must be >= 0"),
    ],
)
def test_sync_config_errors_are_one_line(tmp_path, cache_dir, overrides, message):  # noqa: F811
    with pytest.raises(ConfigError, match=message) as error:
        run(tmp_path, cache_dir, *overrides, "trainer.max_steps=1", name="bad")
    assert "\n" not in str(error.value)
