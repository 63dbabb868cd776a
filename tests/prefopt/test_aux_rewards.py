"""UPO's auxiliary rewards: z-normalised with training statistics only, looked up by content."""

import torch

from prefopt.cache import sequence_key
from prefopt.data.prepare import PreparedData
from prefopt.providers import AuxRewards


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
