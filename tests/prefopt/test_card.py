"""final/README.md (the model card) and trainer.push_to_hub."""

import pytest

from prefopt.config import ConfigError
from prefopt.trainer import push_to_hub

from .test_trainer import run


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_every_run_writes_a_model_card(tmp_path, cache_dir):
    summary = run(tmp_path, cache_dir, "loss=ipo", "loss.beta=0.2", "trainer.max_steps=2", "trainer.eval_every=2")
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "# ipo — trained with prefopt" in card
    assert "Azar et al." in card and "beta=0.2" in card  # the loss's paper and hyper-parameters
    assert "full fine-tuning" in card and "tiny-llama" in card and "`synthetic`" in card
    assert f"| `eval loss` | {summary['eval']['loss']:.4g} |" in card
    assert "library_name: transformers" in card and "perf/" not in card


def test_the_card_of_an_adapter_run_says_so(tmp_path, cache_dir):
    run(tmp_path, cache_dir, "model.lora.r=4", "trainer.max_steps=1")
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "LoRA adapter (r 4" in card and "library_name: peft" in card


def test_push_to_hub_without_network_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "final").mkdir()
    with pytest.raises(ConfigError, match="trainer.push_to_hub=me/model: could not upload") as error:
        push_to_hub(tmp_path / "final", "me/model")
    assert "\n" not in str(error.value)
