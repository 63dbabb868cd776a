"""MPO's regularisation pool: sized from the data and the schedule (no deduplication), drawn without replacement
within an epoch of the pool (disjoint across processes), reuse and memorisation warned about."""

import logging

import pytest

from prefopt.providers import MicroBatch, RegularizationPool, pool_size

from .test_trainer import metrics, run


def test_the_pool_covers_every_pair_and_every_draw():
    assert pool_size(961, max_steps=10, batch_size=32, batch_ratio=1.0) == 961  # at least one per train pair
    assert pool_size(961, max_steps=60, batch_size=32, batch_ratio=1.0) == 1920  # or one per draw of the run
    assert pool_size(961, max_steps=60, batch_size=32, batch_ratio=0.25) == 961


def pool(n: int, **kwargs) -> RegularizationPool:
    samples = [{"prompt_ids": [1], "completion_ids": [2 + i], "ref_logps": -float(i)} for i in range(n)]
    defaults = {"ratio": 1.0, "seed": 0, "per_micro": 2, "draws": n}
    return RegularizationPool(samples, **{**defaults, **kwargs})


def drawn(provider: RegularizationPool, step: int, index: int, items: int = 2) -> list[int]:
    micro = MicroBatch([{}] * items, [], step, index, None, None)
    return [s["completion_ids"][0] - 2 for s in provider.sequences(micro)]


def test_draws_are_without_replacement_within_an_epoch_and_deterministic():
    provider = pool(10)
    epoch = [i for step in range(5) for i in drawn(provider, step, 0)]
    assert sorted(epoch) == list(range(10))  # every sample once in the first 10 draws
    second = [i for step in range(5, 10) for i in drawn(provider, step, 0)]
    assert sorted(second) == list(range(10)) and second != epoch  # a new permutation each epoch
    assert drawn(pool(10), 3, 0) == drawn(provider, 3, 0)  # a pure function of (seed, step, micro-batch)


def test_processes_and_accumulation_steps_draw_disjoint_samples():
    ranks = [pool(12, accumulation=2, rank=r, world=2) for r in range(2)]
    step = [i for provider in ranks for index in range(2) for i in drawn(provider, 0, index)]
    assert sorted(step) == sorted(set(step)) and len(step) == 8


def test_reuse_and_memorisation_are_warned(caplog):
    with caplog.at_level(logging.INFO, logger="prefopt"):
        provider = pool(4, draws=64)
    assert "each of its 4 samples is drawn 16.0 times" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        for step in range(1, 10):
            provider.on_metrics(step, {"mpo/kl_fwd_est": -1.0})
        assert "negative" not in caplog.text  # not before a full window
        provider.on_metrics(10, {"mpo/kl_fwd_est": -1.0})
        provider.on_metrics(11, {"mpo/kl_fwd_est": -1.0})
    assert caplog.text.count("forward-KL estimate on the regularisation samples is negative") == 1


def test_noise_around_zero_is_not_a_warning(caplog):
    provider = pool(10)
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        for step in range(1, 30):
            provider.on_metrics(step, {"mpo/kl_fwd_est": 0.02 * (-1) ** step - 0.01})
    assert "negative" not in caplog.text


def test_the_trainer_pools_one_sample_per_pair_without_deduplicating_prompts(tmp_path):
    summary = run(tmp_path, tmp_path / "c", "loss=mpo", "trainer.max_steps=2")
    assert summary["regularization_pool"] >= 48  # data.n_train=48 pairs over far fewer distinct prompts
    assert summary["regularization_reuse"] == pytest.approx(16 / summary["regularization_pool"], abs=1e-3)
    assert all(line["mpo/ess"] == pytest.approx(2.0, abs=1e-6) for line in metrics(summary)[:1])  # σ(0) at start


def test_mpo_sft_term_is_fed_from_a_data_source(tmp_path):
    """ptx_weight > 0: MPO's second NLL term reads sft_data (the train pairs' chosen completions by default, or the
    embedded SFT corpus) through its provider, instead of stopping on a missing input."""
    for source in ("chosen", "synthetic"):
        summary = run(
            tmp_path / source,
            tmp_path / "c",
            "loss=mpo",
            "loss.ptx_weight=0.5",
            f"sft_data.source={source}",
            "sft_data.n_rows=40",
            "trainer.max_steps=2",
        )
        lines = [line for line in metrics(summary) if "loss" in line]
        assert all(line["mpo/ptx_nll"] > 0 for line in lines), lines
