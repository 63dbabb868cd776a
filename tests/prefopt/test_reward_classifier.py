"""The classifier reward on a tiny random LlamaForSequenceClassification saved to disk (no download)."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

from prefopt.data.synthetic import corpus, make_preference_data, words
from prefopt.rewards import ClassifierReward, build_reward, get_reward

PROMPTS = ["Write a review of the kettle:", "Write a review of the lamp:", "Write a review of the fan:"]
COMPLETIONS = [" it was great .", " the lamp was awful and noisy and it broke after a week .", " fine"]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = dict.fromkeys(["[PAD]", "[UNK]", "[EOS]", ":", "."])
    for text in corpus(make_preference_data(50, 0, seed=0)[0]) + PROMPTS + COMPLETIONS:
        vocab.update(dict.fromkeys(words(text)))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def _config(tokenizer, **config) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )


def _save(path, num_labels, **config):
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    cfg = _config(tokenizer, num_labels=num_labels, **config)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A two-label classifier (labels "neg", "pos")."""
    return _save(tmp_path_factory.mktemp("cls2"), 2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A single-logit reward model."""
    return _save(tmp_path_factory.mktemp("rm"), 1)


def direct(path, texts, label):
    """The logit of ``label`` from one unpadded forward per text."""
    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt")
            out.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0, label])
    return torch.stack(out).float()


def test_scores_equal_a_direct_forward(checkpoint):
    reward = get_reward("classifier", model=str(checkpoint), batch_size=2)
    assert isinstance(reward, ClassifierReward) and reward.label == 1 and reward.higher_is_better
    out = reward(PROMPTS, COMPLETIONS)
    assert out.shape == (3,) and out.dtype == torch.float32
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    torch.testing.assert_close(out, direct(checkpoint, texts, 1), atol=1e-5, rtol=1e-5)
    neg = get_reward("classifier", model=str(checkpoint), label="neg")(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(neg, direct(checkpoint, texts, 0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(neg, out)


def test_single_logit_default_and_template(reward_model):
    reward = build_reward({"name": "classifier", "model": str(reward_model), "template": "{completion}"})
    assert reward.label == 0
    torch.testing.assert_close(reward(PROMPTS, COMPLETIONS), direct(reward_model, COMPLETIONS, 0), atol=1e-5, rtol=1e-5)


def test_padding_side_and_batch_size_do_not_change_scores(checkpoint):
    reference = get_reward("classifier", model=str(checkpoint), batch_size=1)(PROMPTS, COMPLETIONS)
    for side in ("left", "right"):
        for batch_size in (2, 3, 8):
            reward = get_reward("classifier", model=str(checkpoint), batch_size=batch_size)
            reward.tokenizer.padding_side = side
            torch.testing.assert_close(reward(PROMPTS, COMPLETIONS), reference, atol=1e-5, rtol=1e-5)


def test_truncation_dtype_device_and_empty(checkpoint):
    reward = get_reward("classifier", model=str(checkpoint), max_length=4, dtype="bfloat16")
    assert next(reward.model.parameters()).dtype == torch.bfloat16
    out = reward(PROMPTS, COMPLETIONS)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert reward.to("cpu") is reward and reward.device == torch.device("cpu")
    assert reward([], []).shape == (0,)


def test_model_object_and_bad_arguments(checkpoint):
    model = LlamaForSequenceClassification.from_pretrained(checkpoint)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    from_obj = ClassifierReward(model=model, tokenizer=tokenizer)
    from_path = ClassifierReward(model=str(checkpoint))
    torch.testing.assert_close(from_obj(PROMPTS, COMPLETIONS), from_path(PROMPTS, COMPLETIONS))
    with pytest.raises(ValueError, match="pass `tokenizer`"):
        ClassifierReward(model=model)
    with pytest.raises(ValueError, match="unknown label 'meh'.*'neg', 'pos'"):
        ClassifierReward(model=str(checkpoint), label="meh")
    with pytest.raises(ValueError, match="out of range"):
        ClassifierReward(model=str(checkpoint), label=2)
    with pytest.raises(ValueError, match="template"):
        ClassifierReward(model=str(checkpoint), template="{question}{completion}")
    with pytest.raises(OSError):
        ClassifierReward(model=str(checkpoint / "missing"))


def test_no_pad_token_pads_with_eos(tmp_path):
    path = _save(tmp_path, 1)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer.pad_token = None
    model = LlamaForSequenceClassification.from_pretrained(path)
    model.config.pad_token_id = None
    reward = ClassifierReward(model=model, tokenizer=tokenizer, batch_size=3)
    assert tokenizer.pad_token == "[EOS]" and model.config.pad_token_id == tokenizer.eos_token_id
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    torch.testing.assert_close(reward(PROMPTS, COMPLETIONS), direct(path, texts, 0), atol=1e-5, rtol=1e-5)


def test_classifier_yaml_builds_with_the_model_overridden(checkpoint):
    path = Path(__file__).resolve().parents[2] / "conf" / "reward" / "classifier.yaml"
    cfg = OmegaConf.load(path)
    assert OmegaConf.is_missing(cfg, "model")  # must be set: reward.model=/path/to/checkpoint
    cfg.model = str(checkpoint)
    reward = build_reward(cfg)
    assert isinstance(reward, ClassifierReward) and reward.name == "classifier" and reward.label == 1
    expected = get_reward("classifier", model=str(checkpoint))(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(reward(PROMPTS, COMPLETIONS), expected)


def test_a_checkpoint_without_its_head_is_refused(tmp_path):
    """A model saved without a sequence-classification head (a causal LM, or an UltraRM-style `regression_head`) would
    get a freshly initialised `score` head: random scores. One line says so instead."""
    from transformers import LlamaForCausalLM

    from prefopt.config import ConfigError

    tokenizer = _tokenizer()
    LlamaForCausalLM(_config(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"has no weights for score\.weight: its classification head would be"):
        ClassifierReward(tmp_path)
