"""LoRA (peft): adapters train alone, the reference is right (a fresh adapter's reference is the model with its
adapters disabled, no copy; a trained adapter's reference is that adapter), final/ is a peft adapter, resume and two
processes agree, config errors are one line."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prefopt
from prefopt import reference as reference_module
from prefopt.adapters import AdapterSettings, LoraSettings, apply_adapters
from prefopt.build import build_policy, read_settings
from prefopt.config import ConfigError
from prefopt.reference import Reference, logps_of

from .test_cli import one_and_two_processes
from .test_trainer import TINY, metrics, run

LORA = ["model.lora.r=4", "model.lora.alpha=8", "trainer.lr=0.01"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


ROWS = [{"prompt_ids": [1, 2, 3], "completion_ids": [4, 5]}, {"prompt_ids": [6], "completion_ids": [7, 8, 9]}]


def test_fresh_adapter_reference_is_the_base_with_adapters_disabled(monkeypatch):
    base = _tiny_model()
    base_logps = logps_of(base, ROWS, 0, None, "cpu")
    policy, _ = apply_adapters(base, AdapterSettings(LoraSettings(r=4), None, None), "f")
    assert torch.allclose(logps_of(policy, ROWS, 0, None, "cpu"), base_logps, atol=1e-6)  # B = 0: identity at start
    with torch.no_grad():  # "train" the adapter
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_()
    monkeypatch.setattr(reference_module, "frozen_copy", lambda model: pytest.fail("a fresh adapter needs no copy"))
    reference = Reference.live(policy, pad_id=0, device="cpu", adapters="fresh")
    assert reference.model is policy
    assert torch.allclose(reference.logps(ROWS), base_logps, atol=1e-6)
    trained = logps_of(policy, ROWS, 0, None, "cpu")
    assert not torch.allclose(trained, base_logps, atol=1e-3)  # the adapters are back on after the reference ran


def test_lora_trains_the_adapter_only_and_saves_a_peft_adapter(tmp_path, cache_dir):
    from peft import PeftModel

    summary = run(tmp_path, cache_dir, *LORA, "model.lora.merge=true", "trainer.max_steps=3")
    assert summary["adapters"] == "fresh"
    assert 0 < summary["trainable_params"] < 0.2 * summary["total_params"]
    final = Path(summary["model_dir"])
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())  # trained away from zero
    # peft loads it onto the base; the merged model computes the same log-probs
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    base = AutoModelForCausalLM.from_pretrained(final / "merged")  # same architecture; weights replaced below
    config = prefopt.compose([*TINY, f"cache_dir={cache_dir}"])
    start = build_policy(read_settings(config), torch.device("cpu"))
    base.load_state_dict(start.model.state_dict())
    loaded = PeftModel.from_pretrained(base, str(final))
    rows = [{"prompt_ids": e["prompt_ids"], "completion_ids": e["chosen_ids"]} for e in start.data.eval[:4]]
    pad = start.tokenizer.pad_token_id
    assert torch.allclose(logps_of(loaded, rows, pad, None, "cpu"), logps_of(merged, rows, pad, None, "cpu"), atol=1e-4)


@pytest.mark.parametrize("mode", ["precomputed", "live"])
def test_a_trained_adapter_is_its_own_reference(tmp_path, cache_dir, mode):
    """Continuing a trained adapter (model.adapter): at the first step the policy equals the reference, so DPO's
    log-ratios are zero — they would not be if the reference were the bare base."""
    first = run(tmp_path, cache_dir, *LORA, "trainer.max_steps=3", name="sft_adapter")
    second = run(
        tmp_path,
        cache_dir,
        f"model.adapter={first['model_dir']}",
        f"reference.mode={mode}",
        "trainer.max_steps=1",
        name=f"continued_{mode}",
    )
    assert second["adapters"] == "trained" and second["trainable_params"] < second["total_params"]
    line = next(line for line in metrics(second) if "loss" in line)
    assert line["loss"] == pytest.approx(0.69314718, abs=1e-5)
    assert abs(line["logratio/chosen"]) < 1e-4 and abs(line["logratio/rejected"]) < 1e-4


def test_live_reference_with_a_fresh_adapter_holds_no_copy(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(reference_module, "frozen_copy", lambda model: pytest.fail("no copy with a fresh adapter"))
    summary = run(tmp_path, cache_dir, *LORA, "reference.mode=live", "trainer.max_steps=2")
    assert summary["reference_model"] and summary["steps"] == 2


def test_precomputed_and_live_references_agree_under_lora(tmp_path, cache_dir):
    pre = run(tmp_path, cache_dir, *LORA, "trainer.max_steps=3", name="pre")
    live = run(tmp_path, cache_dir, *LORA, "reference.mode=live", "trainer.max_steps=3", name="live")
    for a, b in zip(metrics(pre, "loss"), metrics(live, "loss"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_lora_resume_continues_the_same_trajectory(tmp_path, cache_dir):
    full = run(tmp_path, cache_dir, *LORA, "trainer.max_steps=6", "trainer.save_every=3", name="full")
    checkpoint = Path(full["run_dir"]) / "checkpoints" / "step-3"
    resumed = run(tmp_path, cache_dir, *LORA, "trainer.max_steps=6", f"trainer.resume={checkpoint}", name="resumed")
    tail = [line["loss"] for line in metrics(full) if line["step"] > 3]
    assert [line["loss"] for line in metrics(resumed)] == pytest.approx(tail, abs=1e-6)
    expected = load_file(str(Path(full["model_dir"]) / "adapter_model.safetensors"))
    got = load_file(str(Path(resumed["model_dir"]) / "adapter_model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_lora_online(tmp_path, cache_dir):
    summary = run(
        tmp_path,
        cache_dir,
        *LORA,
        "trainer=online",
        "loss=rloo",
        "reward=length",
        "trainer.max_steps=2",
        "trainer.batch_size=4",
    )
    assert summary["steps"] == 2 and summary["adapters"] == "fresh"


def test_two_processes_with_lora_log_the_same_losses_as_one(tmp_path):
    common = [*TINY, *LORA, "trainer.max_steps=4", "trainer.micro_batch_size=4", f"cache_dir={tmp_path}/c"]
    one, two, _ = one_and_two_processes(tmp_path, *common)
    assert [x["loss"] for x in two] == pytest.approx([x["loss"] for x in one], abs=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.lora.r=-1"], "model.lora.r must be"),
        (["model.lora.dropout=1.5"], "model.lora.dropout"),
        (["+model.lora.rank=3"], "model.lora has no setting rank"),
        (["model.adapter=/nonexistent"], "not a peft adapter directory"),
        (["model.quantization=2bit"], "model.quantization must be"),
    ],
)
def test_adapter_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        read_settings(prefopt.compose([*TINY, *overrides]))


def test_quantization_without_cuda_is_refused_in_one_line():
    settings = read_settings(prefopt.compose([*TINY, "model.quantization=4bit", "model.lora.r=4"]))
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        build_policy(settings, torch.device("cpu"))


def test_adapter_and_fresh_lora_together_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="set one of them"):
        read_settings(prefopt.compose([*TINY, f"model.adapter={tmp_path}", "model.lora.r=4"]))
