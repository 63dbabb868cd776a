"""Unpaired losses in the trainer (kind "unpaired": kto, apo_zero_unpaired, upo over kto): the mismatched pairs are
TRL's rotation over the step's batch; the KL reference point is the step's, so accumulation and two processes give
one process's losses; precomputed = live reference; resume is bit-identical; unpaired files (standard and
conversational) train; data of the wrong kind is one line."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prefopt
from prefopt.config import ConfigError
from prefopt.data import synthetic
from prefopt.unpaired import UnpairedSource, mismatched, mismatched_blocks, run_kl_rows

from .test_cli import one_and_two_processes
from .test_trainer import TINY, TINY_MODEL, metrics, run

UNPAIR = ["data.unpair=true"]
KL_UP = ["loss=kto", *UNPAIR, "loss.undesirable_weight=0", "trainer.lr=0.01"]  # z0 > 0 after a step or two


def _rows(n: int) -> list[dict]:
    return [{"prompt_ids": [1, i], "completion_ids": [100 + i], "label": i % 2 == 0} for i in range(n)]


# ------------------------------------------------------------------------------------------------ mismatched pairs
def test_mismatched_pairs_rotate_completions_as_trl():
    """TRL 1.16 ``add_kl_completion_ids``: ``[completion_ids[-1]] + completion_ids[:-1]`` — row j gets row j−1's
    completion, row 0 the last row's; prompts and labels stay."""
    rows = _rows(4)
    out = mismatched(rows)
    completions = [r["completion_ids"] for r in rows]
    assert [r["kl_completion_ids"] for r in out] == [completions[-1]] + completions[:-1]
    assert [r["prompt_ids"] for r in out] == [r["prompt_ids"] for r in rows]
    assert all(r["kl_completion_ids"] != r["completion_ids"] for r in out)
    blocks = mismatched_blocks(_rows(7), 3)  # blocks [0:3], [3:7] (a last block of one joins the previous)
    assert [r["kl_completion_ids"][0] - 100 for r in blocks] == [2, 0, 1, 6, 3, 4, 5]


@pytest.mark.parametrize(("world", "micro"), [(1, 8), (1, 2), (2, 4), (2, 1)])
def test_the_steps_pairs_do_not_depend_on_the_split(world, micro):
    """Processes x micro-batches of one step together hold the rows and mismatched pairs of one process's batch."""
    rows = _rows(21)
    one = UnpairedSource(rows, batch_size=8, micro_batch_size=8, rank=0, world=1, seed=3)
    split = [
        UnpairedSource(rows, batch_size=8, micro_batch_size=micro, rank=rank, world=world, seed=3)
        for rank in range(world)
    ]
    for step in range(5):  # across an epoch boundary (21 rows, 8 per step)
        (whole,) = one.draw(None, step).micro_batches
        parts = [
            item for source in split for micro_batch in source.draw(None, step).micro_batches for item in micro_batch
        ]
        key = lambda r: (tuple(r["prompt_ids"]), tuple(r["kl_completion_ids"]))  # noqa: E731
        assert sorted(map(key, parts)) == sorted(map(key, whole))


def test_run_kl_rows_are_every_pair_the_source_draws():
    rows = _rows(10)
    source = UnpairedSource(rows, batch_size=4, micro_batch_size=4, rank=0, world=1, seed=1)
    drawn = {
        (tuple(r["prompt_ids"]), tuple(r["kl_completion_ids"]))
        for s in range(7)
        for r in source.draw(None, s).micro_batches[0]
    }
    listed = {
        (tuple(r["prompt_ids"]), tuple(r["completion_ids"])) for r in run_kl_rows(rows, batch_size=4, seed=1, steps=7)
    }
    assert drawn == listed


# ------------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize(
    "loss", ["loss=kto", "loss=apo_zero_unpaired", "loss=upo loss.base=kto", "loss=upo loss.base=apo_zero_unpaired"]
)
def test_unpaired_losses_train_on_unpaired_pairs(tmp_path, cache_dir, loss):
    summary = run(tmp_path, cache_dir, *loss.split(), *UNPAIR, "trainer.max_steps=3", "trainer.eval_every=3")
    assert summary["steps"] == 3 and summary["train_pairs"] == 96  # 48 pairs -> 96 rows
    lines = [line for line in metrics(summary) if "loss" in line]
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        assert all(isinstance(v, (int, float)) and v == v for v in line.values()), line
        assert {"kl", "rewards/accuracies", "rewards/chosen", "rewards/rejected"} <= set(line)
    assert summary["eval"]["rewards/accuracies"] >= 0.0 and "kl" in summary["eval"]


def test_kto_reference_point_is_the_steps_mean_log_ratio_of_the_mismatched_pairs(tmp_path, cache_dir):
    """The logged kl is z0 = max(0, mean over the step's mismatched pairs): 0 at the start (policy = reference),
    then positive when training raises the likelihood of reviews in general (desirable rows only, w_U = 0: the
    policy puts more mass on mismatched completions than the reference)."""
    summary = run(tmp_path, cache_dir, *KL_UP, "trainer.max_steps=6")
    kls = [line["kl"] for line in metrics(summary) if "kl" in line]
    assert kls[0] == 0.0 and all(k >= 0.0 for k in kls) and max(kls) > 0.0


def test_precomputed_and_live_reference_give_the_same_losses(tmp_path, cache_dir):
    common = [*KL_UP, "trainer.max_steps=4"]
    live = run(tmp_path, cache_dir, *common, "reference.mode=live", name="live")
    cached = run(tmp_path, cache_dir, *common, "reference.mode=precomputed", name="cached")
    assert live["reference_model"] and not cached["reference_model"]
    for a, b in zip(metrics(live), metrics(cached), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-4)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, cache_dir):
    """z0 is the step's statistic, so 4 micro-batches of 2 give the losses (and z0) of one batch of 8."""
    common = [*KL_UP, "trainer.max_steps=4"]
    one = run(tmp_path, cache_dir, *common, name="one")
    accumulated = run(tmp_path, cache_dir, *common, "trainer.micro_batch_size=2", name="acc")
    for a, b in zip(metrics(one), metrics(accumulated), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-5)
    assert max(line["kl"] for line in metrics(one)) > 0.0  # the reference point was in play


def test_resume_is_bit_identical(tmp_path, cache_dir):
    common = [*KL_UP, "trainer.max_steps=6", "trainer.micro_batch_size=4"]
    full = run(tmp_path, cache_dir, *common, "trainer.save_every=3", name="full")
    checkpoint = Path(full["run_dir"]) / "checkpoints" / "step-3"
    resumed = run(tmp_path, cache_dir, *common, f"trainer.resume={checkpoint}", name="resumed")
    expected = load_file(str(Path(full["model_dir"]) / "model.safetensors"))
    got = load_file(str(Path(resumed["model_dir"]) / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    tail = [line["loss"] for line in metrics(full) if line["step"] > 3]
    assert [line["loss"] for line in metrics(resumed)] == tail


def test_two_processes_log_the_same_losses_as_one(tmp_path):
    """torchrun, 2 gloo processes, each 1 micro-batch of 4, against 1 process accumulating 2 of 4: z0 is gathered
    over the processes, so the losses and z0 agree."""
    common = [*TINY, *KL_UP, "trainer.max_steps=5", "trainer.warmup_steps=0"]
    common += ["trainer.micro_batch_size=4", "trainer.eval_every=5", f"cache_dir={tmp_path}/c"]
    one, two, _ = one_and_two_processes(tmp_path, *common)
    train_one, train_two = ([x for x in lines if "loss" in x] for lines in (one, two))
    assert [x["loss"] for x in train_two] == pytest.approx([x["loss"] for x in train_one], abs=1e-4)
    assert [x["kl"] for x in train_two] == pytest.approx([x["kl"] for x in train_one], abs=1e-4)
    assert max(x["kl"] for x in train_one) > 0.0
    eval_one, eval_two = ([x for x in lines if "eval/loss" in x] for lines in (one, two))
    assert eval_two[-1]["eval/loss"] == pytest.approx(eval_one[-1]["eval/loss"], abs=1e-4)
    assert eval_two[-1]["eval/kl"] == pytest.approx(eval_one[-1]["eval/kl"], abs=1e-4)


# ------------------------------------------------------------------------------------------------- unpaired files
def _unpaired_file(path: Path, conversational: bool) -> Path:
    train, _ = synthetic.make_preference_data(16, 1, seed=5)
    rows = []
    for pair in train:
        for side, label in (("chosen", True), ("rejected", False)):
            if conversational:
                prompt = [{"role": "user", "content": pair["prompt"]}]
                rows.append(
                    {"prompt": prompt, "completion": [{"role": "assistant", "content": pair[side]}], "label": label}
                )
            else:
                rows.append({"prompt": pair["prompt"], "completion": pair[side], "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("conversational", [False, True])
def test_unpaired_files_train(tmp_path, conversational):
    path = _unpaired_file(tmp_path / "rows.jsonl", conversational)
    cfg = prefopt.compose(
        [
            *TINY_MODEL,
            "loss=kto",
            "data=local",
            f"data.path={path}",
            "data.eval_fraction=0.25",
            "data.max_length=96",
            "data.max_prompt_length=48",
            "trainer.max_steps=2",
            f"cache_dir={tmp_path}/c",
        ]
    )
    summary = prefopt.fit(cfg, run_dir=tmp_path / "run")
    assert summary["train_pairs"] == 24 and summary["eval_pairs"] == 8  # rows
    assert summary["steps"] == 2


# -------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=kto"], "loss 'kto' trains on unpaired rows (prompt, completion, label) but the data are pairs; set "
         "data.unpair=true"),
        (["loss=dpo", *UNPAIR], "loss 'dpo' trains on pairs but the data are unpaired rows"),
        (["loss=kto", *UNPAIR, "trainer.batch_size=1"], "trainer.batch_size must be at least 2"),
        (["loss=kto", "trainer=online"], "loss 'kto' is an unpaired loss"),
    ],
)  # fmt: skip
def test_data_of_the_wrong_kind_is_one_line(tmp_path, cache_dir, overrides, message):
    with pytest.raises(ConfigError) as error:
        run(tmp_path, cache_dir, *overrides, "trainer.max_steps=1")
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


# ---------------------------------------------------------------------------------------------- upo's aux rewards
def test_aux_rewards_per_row_and_the_prompts_mean_for_pair_mean():
    """UPO over an unpaired base: each row gets its rewards [K]; with pair_mean, V(x) is the mean combined reward
    of the prompt's training rows — on unpaired pairs (one pair per prompt) the pairwise pair_mean baseline."""
    from types import SimpleNamespace

    from prefopt.cache import sequence_key
    from prefopt.providers import AuxRewards, MicroBatch, PromptValue

    pairs, _ = synthetic.make_preference_data(6, 1, seed=2)
    rows = []
    for i, pair in enumerate(pairs):
        for side, label in (("chosen", True), ("rejected", False)):
            ids = {"prompt_ids": [1, i], "completion_ids": [10 + len(rows)], "label": label}
            rows.append({**ids, "prompt": pair["prompt"], "completion": pair[side]})
    data = SimpleNamespace(kind="unpaired", train=rows, eval=[])
    provider = AuxRewards(["lexicon", "length"], data=data, value=PromptValue(None, 0.5))
    micro = MicroBatch(rows, [], 0, 0, SimpleNamespace(kind="unpaired"), torch.device("cpu"))
    micro.rows = [{"prompt_ids": r["prompt_ids"], "completion_ids": r["completion_ids"]} for r in rows]
    out = provider.inputs(micro, None)
    assert out["aux_rewards"].shape == (12, 2)
    combined = out["aux_rewards"].mean(dim=1)
    pair_means = combined.reshape(6, 2).mean(dim=1).repeat_interleave(2)
    assert out["aux_values"].tolist() == pytest.approx(pair_means.tolist(), abs=1e-6)
    assert sequence_key([1, 0], []) in provider.values
