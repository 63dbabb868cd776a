"""The reward-model chain recipe on a tiny model: pairs -> reward model -> online DPO on it and on the gold reward;
every policy re-evaluated by both rewards; the gold run's re-evaluation reproduces its own last evaluation; finished
runs are not trained again."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from recipes import reward_model
from recipes.sweep import CONF

TINY = [
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=1",
    "model.sft.steps=30",
    "model.sft.n_rows=100",
    "data.n_train=64",
    "data.n_eval=16",
    "trainer.batch_size=8",
    "trainer.online.eval_prompts=8",
    "trainer.online.eval_samples_per_prompt=2",
    "trainer.online.fit_prompts=4",
    "trainer.online.max_new_tokens=12",
]


def test_chain_runs_and_reports_gold_and_learned_rewards(tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="reward_model", overrides=[f"out_dir={tmp_path}/rm", f"cache_dir={tmp_path}/c"])
    cfg.common = [*cfg.common, *TINY]
    cfg.quick_overrides = {"reward_model": ["trainer.max_steps=2"], "policy": ["trainer.max_steps=2"]}
    result = reward_model.run_chain(cfg)
    out = Path(result["out_dir"])
    rows = (out / "reward_model.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["sft", "learned", "gold"]
    table = (out / "reward_model.md").read_text()
    for label in ("SFT start", "learned reward", "gold reward", "reward model eval accuracy"):
        assert label in table
    gold_run = json.loads((out / "gold" / "seed=0" / "summary.json").read_text())
    record = json.loads(next(out.glob("recipe-*.json")).read_text())
    gold_row = next(row for row in record["rows"] if row["policy"] == "gold")
    assert gold_row["gold/reward/mean"] == pytest.approx(gold_run["eval"]["reward/mean"], abs=1e-6)
    assert "reward_model/seed=0/final" in (out / "learned" / "seed=0" / "config.yaml").read_text()
    mtime = (out / "gold" / "seed=0" / "summary.json").stat().st_mtime_ns
    reward_model.run_chain(cfg)  # finished runs are not trained again
    assert (out / "gold" / "seed=0" / "summary.json").stat().st_mtime_ns == mtime
