"""build_reward from names, configs and `_target_`s, and the conf/reward/*.yaml group."""

import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from prefopt.rewards import (
    REWARDS,
    FunctionReward,
    LexiconReward,
    RepetitionReward,
    Reward,
    SentimentReward,
    build_reward,
)
from prefopt.rewards.simple import length_reward, lexicon_reward

CONF = Path(__file__).resolve().parents[2] / "conf" / "reward"
OURS = ("length", "conciseness", "lexicon", "repetition", "sentiment", "readability", "classifier", "custom")
YAMLS = sorted(p for p in CONF.glob("*.yaml") if p.stem != "alarm")  # alarm.yaml is another module's
PROMPTS = ["p1", "p2", "p3"]
COMPLETIONS = ["the kettle was great .", "awful, noisy and broken!", "it came"]


def test_build_by_name_with_kwargs_dict_and_dictconfig():
    reward = build_reward({"name": "repetition", "n": 1})
    assert isinstance(reward, RepetitionReward) and reward.n == 1 and reward.name == "repetition"
    reward = build_reward(OmegaConf.create({"name": "lexicon", "lexicon": {"kettle": 2.0}}))
    assert isinstance(reward, LexiconReward) and type(reward.lexicon) is dict
    assert reward(PROMPTS, COMPLETIONS).tolist() == [2.0, 0.0, 0.0]
    assert isinstance(build_reward("sentiment"), SentimentReward)
    assert build_reward(reward) is reward
    resolved = OmegaConf.create({"order": 3, "reward": {"name": "repetition", "n": "${order}"}})
    assert build_reward(resolved.reward).n == 3  # interpolations are resolved


def test_build_errors():
    with pytest.raises(KeyError, match=r"unknown reward 'bleu'; valid: \[.*'length'.*\]"):
        build_reward({"name": "bleu"})
    with pytest.raises(ValueError, match="needs `name`"):
        build_reward({"n": 2})
    with pytest.raises(TypeError, match="accepted arguments"):
        build_reward({"name": "length", "scale": 2})
    with pytest.raises(TypeError, match="mapping"):
        build_reward(3)
    with pytest.raises(MissingMandatoryValue):
        build_reward(OmegaConf.create({"name": "classifier", "model": "???"}))
    with pytest.raises(TypeError, match="neither a Reward nor a callable"):
        build_reward({"_target_": "builtins.int"})


def test_target_function_is_the_reward_itself():
    reward = build_reward({"_target_": "prefopt.rewards.simple.length_reward"})
    assert isinstance(reward, FunctionReward) and reward.name == "length_reward"
    assert torch.equal(reward(PROMPTS, COMPLETIONS), length_reward(PROMPTS, COMPLETIONS))
    explicit = build_reward({"_target_": "prefopt.rewards.simple.length_reward", "_partial_": True, "name": "words"})
    assert explicit.name == "words" and explicit(PROMPTS, COMPLETIONS).tolist() == [5.0, 4.0, 2.0]


def test_target_function_with_bound_kwargs_from_yaml():
    cfg = OmegaConf.create(
        {"_target_": "prefopt.rewards.simple.lexicon_reward", "lexicon": {"kettle": 0.5, "came": -2.0}, "name": "lex"}
    )
    reward = build_reward(cfg)
    assert reward.name == "lex" and reward(PROMPTS, COMPLETIONS).tolist() == [0.5, 0.0, -2.0]
    expected = lexicon_reward(PROMPTS, COMPLETIONS, {"kettle": 0.5, "came": -2.0})
    assert torch.equal(reward(PROMPTS, COMPLETIONS), expected)


def test_target_reward_class_and_factory():
    reward = build_reward({"_target_": "prefopt.rewards.repetition.RepetitionReward", "n": 1})
    assert type(reward) is RepetitionReward and reward.n == 1 and reward.name == "repetition"
    renamed = build_reward(
        {"_target_": "prefopt.rewards.length.ConcisenessReward", "target": 3, "name": "short", "higher_is_better": True}
    )
    assert renamed.name == "short" and renamed(PROMPTS, COMPLETIONS).tolist() == [-2.0, -1.0, 0.0]
    assert type(renamed).name == "conciseness"  # the class (and registry) keep theirs
    factory = build_reward({"_target_": "prefopt.rewards.get_reward", "_partial_": False, "_args_": ["sentiment"]})
    assert isinstance(factory, SentimentReward)
    flipped = build_reward({"_target_": "prefopt.rewards.simple.length_reward", "higher_is_better": False})
    assert flipped.higher_is_better is False


def test_our_yaml_files_exist_and_document_every_argument():
    assert {p.stem for p in YAMLS} >= set(OURS)
    for name in OURS[:-1]:
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        assert cfg.name == name
        params = set(inspect.signature(REWARDS[name]).parameters)
        assert set(cfg) - {"name"} == params, name
        text = (CONF / f"{name}.yaml").read_text()
        for param in params:
            line = next(line for line in text.splitlines() if line.startswith(f"{param}:"))
            assert "#" in line, f"{name}.{param} has no comment"


@pytest.mark.parametrize("path", [p for p in YAMLS if p.stem != "classifier"], ids=lambda p: p.stem)
def test_every_yaml_builds(path):
    cfg = OmegaConf.load(path)
    assert "name" in cfg
    reward = build_reward(cfg)
    assert isinstance(reward, Reward)
    out = reward(PROMPTS, COMPLETIONS)
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_custom_yaml_points_at_a_real_function():
    reward = build_reward(OmegaConf.load(CONF / "custom.yaml"))
    assert isinstance(reward, FunctionReward) and reward.name == "custom_length"
    assert torch.equal(reward(PROMPTS, COMPLETIONS), length_reward(PROMPTS, COMPLETIONS))


@pytest.mark.parametrize("name", OURS)
def test_hydra_composes_the_reward_group(name):
    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        cfg = compose(overrides=[f"+reward={name}"])
    assert set(cfg) == {"reward"} and "name" in cfg.reward
    assert cfg.reward == OmegaConf.load(CONF / f"{name}.yaml")
