"""UPO's auxiliary rewards: z-normalised with training statistics only, looked up by content."""

import pytest
import torch

from prefopt.cache import sequence_key
from prefopt.data.prepare import PreparedData
from prefopt.providers import AuxRewards, PromptValue


def pair(i: int, chosen: str, rejected: str) -> dict:
    return {
        "prompt": f"prompt {i}",
        "chosen": chosen,
        "rejected": rejected,
        "prompt_ids": [i],
        "chosen_ids": [100 + i, len(chosen)],
        "rejected_ids": [200 + i, len(rejected)],
    }


TRAIN = [pair(0, "a b c", "a"), pair(1, "a b c d e", "a b"), pair(2, "good", "a b c d")]


def train_values(provider: AuxRewards) -> list[list[float]]:
    keys = [(e["prompt_ids"], e[f"{side}_ids"]) for side in ("chosen", "rejected") for e in TRAIN]
    return [provider.table[sequence_key(*key)] for key in keys]


def test_eval_completions_do_not_move_the_training_rewards():
    short_eval = PreparedData(TRAIN, [pair(9, "x", "y")], "f")
    long_eval = PreparedData(TRAIN, [pair(9, "x " * 40, "y " * 30)], "f")
    first, second = AuxRewards(["length"], short_eval), AuxRewards(["length"], long_eval)
    assert train_values(first) == train_values(second)
    values = torch.tensor(train_values(first))
    assert values.mean().abs() < 1e-6 and (values.std(correction=0) - 1).abs() < 1e-5  # z-scored over train


def test_prompt_values_are_training_expectiles_per_prompt():
    """UPO's prompt_expectile baseline: per prompt, the τ-expectile of the combined rewards of every training
    completion of that prompt (here two pairs share prompt 0); an eval prompt falls back to its own pair."""
    from losses._common import expectile
    from prefopt.providers import MicroBatch
    from prefopt.step import PairLayout

    train = [pair(0, "a b c", "a"), {**pair(1, "a b c d e", "a b"), "prompt_ids": [0]}, pair(2, "good", "a b c d")]
    provider = AuxRewards(["length"], PreparedData(train, [pair(9, "x y", "z")], "f"), value=PromptValue(None, 0.8))
    scores = torch.tensor(
        [
            provider.table[sequence_key(e["prompt_ids"], e[f"{s}_ids"])][0]
            for s in ("chosen", "rejected")
            for e in train
        ],
        dtype=torch.float64,
    )
    shared = scores[[0, 1, 3, 4]]  # prompt 0: both pairs' chosen and rejected
    assert provider.values[sequence_key([0], [])] == pytest.approx(float(expectile(shared, 0.8)))
    layout = PairLayout()
    items = [train[0], pair(9, "x y", "z")]
    micro = MicroBatch(items, layout.rows(items), 0, -1, layout, torch.device("cpu"))
    values = provider.inputs(micro, None)["aux_values"]
    evaluation = torch.tensor(
        [provider.table[sequence_key([9], [109, 3])][0], provider.table[sequence_key([9], [209, 1])][0]]
    )
    assert values[0].item() == pytest.approx(float(expectile(shared, 0.8)), abs=1e-6)
    assert values[1].item() == pytest.approx(float(expectile(evaluation.double(), 0.8)), abs=1e-6)


def test_upo_with_the_value_baseline_trains(tmp_path):
    from .test_trainer import metrics, run

    summary = run(
        tmp_path,
        tmp_path / "c",
        "loss=upo",
        "loss.baseline=prompt_expectile",
        "loss.expectile=0.7",
        "trainer.max_steps=2",
    )
    lines = [line for line in metrics(summary) if "loss" in line]
    assert len(lines) == 2 and all(abs(line["aux/advantage_mean"]) < 10 for line in lines)


def test_upo_with_the_value_head_trains_and_reports_its_fit(tmp_path):
    """baseline=value_head: V(x) from a head on the initial policy's prompt features, fit by expectile regression
    on the training completions; the run reports the fit on train and on held-out completions."""
    from .test_trainer import metrics, run

    summary = run(
        tmp_path, tmp_path / "c", "loss=upo", "loss.baseline=value_head", "aux_value.steps=50", "trainer.max_steps=2"
    )
    assert summary["aux_value_fit_loss"] > 0
    assert summary["aux_value_eval_loss"] > 0 and summary["aux_value_eval_loss_constant"] > 0
    lines = [line for line in metrics(summary) if "loss" in line]
    assert len(lines) == 2 and all(abs(line["aux/advantage_mean"]) < 10 for line in lines)


def test_value_head_settings_are_checked():
    from prefopt.config import ConfigError
    from prefopt.settings import AuxValueSettings

    with pytest.raises(ConfigError, match="aux_value"):
        AuxValueSettings.from_mapping({"hidden": -1})
    with pytest.raises(ConfigError, match="aux_value has no setting"):
        AuxValueSettings.from_mapping({"width": 3})
