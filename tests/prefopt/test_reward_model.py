"""Reward-model training (``trainer=reward``) on the tiny model, through the generic loop: it learns; ``final/`` is a
sequence classifier the ``classifier`` reward loads and scores with exactly as the trainer did; an online run trains
on it; the reliability guarantees (resume, accumulation, 1 vs 2 processes, one-line config errors); margins from the
data."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prefopt
from prefopt.config import ConfigError
from prefopt.data import synthetic
from prefopt.rewards import build_reward

from .test_cli import cli, one_and_two_processes
from .test_trainer import TINY, TINY_MODEL, metrics

REWARD = [*TINY, "trainer=reward", "trainer.eval_every=0", "trainer.eval_at_start=false", "trainer.lr=0.01"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reward-cache")


def run(tmp_path: Path, cache_dir: Path, *overrides: str, name: str = "run") -> dict:
    cfg = prefopt.compose([*REWARD, f"cache_dir={cache_dir}", *overrides])
    return prefopt.fit(cfg, run_dir=tmp_path / name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> dict:
    """60 steps on 32 pairs (whole texts: no truncation), evaluated at the start and the end."""
    overrides = ["trainer.max_steps=60", "trainer.eval_every=60", "trainer.eval_at_start=true", "data.n_train=32"]
    overrides += ["data.max_length=192", "data.max_prompt_length=64"]
    return run(tmp_path_factory.mktemp("rm"), cache_dir, *overrides, name="rm")


def _eval(summary: dict) -> list[dict]:
    return [line for line in metrics(summary) if "eval/loss" in line]


def test_trains_a_sequence_classifier_that_fits_its_pairs(trained):
    """The generic loop trains the classifier: it fits its training pairs (train loss from ln 2 down, accuracy near 1
    on them); eval is logged at the start and the end. (Generalising takes the SFT-warm-started default model and
    more steps: README, eval accuracy 0.535 -> 0.93.)"""
    train = [line for line in metrics(trained) if "accuracy" in line and "eval/loss" not in line]
    assert len(train) == 60 and train[0]["loss"] == pytest.approx(math.log(2), abs=0.1)
    first, last = (sum(line["loss"] for line in part) / 5 for part in (train[:5], train[-5:]))
    assert last < 0.45 and last < first - 0.2
    assert sum(line["accuracy"] for line in train[-5:]) / 5 >= 0.85
    start, end = _eval(trained)
    assert (start["step"], end["step"]) == (0, 60)
    assert start["eval/loss"] == pytest.approx(math.log(2), abs=0.05)  # a fresh head scores every pair alike
    assert end["eval/accuracy"] == end["eval/rewards/accuracies"] and "eval/margin" in end
    config = json.loads((Path(trained["model_dir"]) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["pad_token_id"] is not None
    assert "reward=classifier reward.model=" in (Path(trained["model_dir"]) / "README.md").read_text()


def test_final_is_what_the_classifier_reward_scores_with(trained):
    """``reward=classifier reward.model=RUN/final`` (model and embedded tokenizer from the directory) scores the eval
    pairs' texts as the trainer scored their token ids: the same accuracy and margin."""
    reward = build_reward({"name": "classifier", "model": trained["model_dir"]})
    _, pairs = synthetic.make_preference_data(0, 16, seed=0)  # the eval pairs of data=synthetic (n_eval=16)
    prompts = [p["prompt"] for p in pairs]
    chosen = reward(prompts, [p["chosen"] for p in pairs])
    rejected = reward(prompts, [p["rejected"] for p in pairs])
    end = _eval(trained)[-1]
    assert float((chosen > rejected).float().mean()) == pytest.approx(end["eval/accuracy"], abs=1e-6)
    assert float((chosen - rejected).mean()) == pytest.approx(end["eval/margin"], abs=1e-4)


def test_online_training_on_the_learned_reward(tmp_path, cache_dir, trained):
    """An online run rewarded by the trained reward model: samples are scored by it (``online/reward/classifier``)."""
    cfg = prefopt.compose(
        [
            *TINY,
            f"cache_dir={cache_dir}",
            "trainer=online",
            "reward=classifier",
            f"reward.model={trained['model_dir']}",
            "trainer.max_steps=2",
            "trainer.batch_size=4",
            "trainer.online.max_new_tokens=8",
            "trainer.online.fit_prompts=4",
            "trainer.online.eval_prompts=4",
            "trainer.online.table_every=0",
        ]
    )
    summary = prefopt.fit(cfg, run_dir=tmp_path / "online")
    assert summary["steps"] == 2 and summary["reward"] == "classifier"
    scored = [line for line in metrics(summary) if "online/reward/classifier" in line]
    assert scored and all(math.isfinite(line["online/reward/classifier"]) for line in scored)


def test_warm_start_copies_the_decoder(tmp_path, cache_dir):
    """With model.sft.steps > 0 the reward model starts from the SFT policy's decoder weights (only the score head is
    new); the causal LM's head is not part of it."""
    from prefopt import build as build_module

    sft = ["model.sft.steps=3", "model.sft.batch_size=4"]
    causal = build_module.build_policy(
        build_module.read_settings(prefopt.compose([*TINY, *sft, f"cache_dir={cache_dir}"])), torch.device("cpu")
    )
    reward = build_module.build_policy(
        build_module.read_settings(prefopt.compose([*REWARD, *sft, f"cache_dir={cache_dir}"])), torch.device("cpu")
    )
    assert type(reward.model).__name__ == "LlamaForSequenceClassification"
    decoder = causal.model.model.state_dict()
    assert all(torch.equal(decoder[k], v) for k, v in reward.model.model.state_dict().items())
    assert reward.model.score.weight.shape == (1, reward.model.config.hidden_size)
    assert reward.fingerprint != causal.fingerprint


def test_resume_is_bit_identical(tmp_path, cache_dir):
    full = run(tmp_path, cache_dir, "trainer.max_steps=6", "trainer.save_every=3", name="full")
    checkpoint = Path(full["run_dir"]) / "checkpoints" / "step-3"
    resumed = run(tmp_path, cache_dir, "trainer.max_steps=6", f"trainer.resume={checkpoint}", name="resumed")
    tail = [line["loss"] for line in metrics(full) if line["step"] > 3]
    assert [line["loss"] for line in metrics(resumed)] == tail
    expected = load_file(str(Path(full["model_dir"]) / "model.safetensors"))
    got = load_file(str(Path(resumed["model_dir"]) / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, cache_dir):
    one = run(tmp_path, cache_dir, "trainer.max_steps=3", name="one")
    accumulated = run(tmp_path, cache_dir, "trainer.max_steps=3", "trainer.micro_batch_size=2", name="acc")
    for a, b in zip(metrics(one), metrics(accumulated), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-6)


def test_two_processes_log_the_same_losses_as_one(tmp_path):
    common = [*REWARD, "trainer.max_steps=4", "trainer.micro_batch_size=4", "trainer.eval_every=4"]
    one, two, _ = one_and_two_processes(tmp_path, *common, f"cache_dir={tmp_path}/c")
    train_one, train_two = ([x for x in runs if "loss" in x] for runs in (one, two))
    assert len(train_one) == len(train_two) == 4
    assert [x["loss"] for x in train_two] == pytest.approx([x["loss"] for x in train_one], abs=1e-4)
    eval_one, eval_two = ([x for x in runs if "eval/loss" in x][-1] for runs in (one, two))
    for key in ("eval/loss", "eval/accuracy", "eval/margin"):
        assert eval_two[key] == pytest.approx(eval_one[key], abs=1e-4), key


def test_margins_from_the_data_enter_the_loss(tmp_path, cache_dir):
    """A ``margin`` column reaches the loss: a fresh head scores both sides alike (r_w − r_l ≈ 0), so the start's
    eval loss is log(1 + e^m), not ln 2."""
    rows = [{**row, "margin": 2.0} for row in synthetic.make_preference_data(40, 0, seed=3)[0]]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = [*TINY_MODEL, "trainer=reward", "data=local", f"data.path={path}", "data.eval_fraction=0.2"]
    overrides += ["trainer.max_steps=1", "trainer.eval_at_start=true", "trainer.eval_every=1", "trainer.lr=1e-6"]
    summary = prefopt.fit(prefopt.compose([*overrides, f"cache_dir={cache_dir}"]), run_dir=tmp_path / "margin")
    start = _eval(summary)[0]
    assert start["eval/loss"] == pytest.approx(math.log1p(math.exp(2.0)), abs=0.05)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.source=online"], "trains a reward model .* drop trainer=online"),
        (["trainer.sample_eval=true"], "drop trainer.sample_eval=true"),
        (["model.lora.r=4"], "a reward model trains in full: model.lora"),
        (["data.unpair=true"], "trains on pairs but the data are unpaired rows"),
    ],
)
def test_config_errors_are_one_line(tmp_path, cache_dir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(tmp_path, cache_dir, "trainer.max_steps=1", *overrides)


def test_cli_error_exit_code(tmp_path):
    result = cli(
        *REWARD, "trainer.sample_eval=true", f"cache_dir={tmp_path}/c", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("prefopt-train: error: loss 'bradley_terry' trains")
