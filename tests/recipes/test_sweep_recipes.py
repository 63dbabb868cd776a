"""The sweep recipes (sentiment, multiobjective, deterministic, alarm) end to end on a tiny model: every method's
overrides compose, the runs train, resume skips finished runs, and the comparison table covers every method."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import prefopt
from recipes.sweep import CONF, compare_runs, run_overrides, run_recipe

TINY = [
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=1",
    "model.sft.steps=150",
    "model.sft.lr=1e-2",
    "model.sft.n_rows=400",
    "data.n_train=64",
    "data.n_eval=16",
    "data.eval_items=3",
    "trainer.online.eval_samples_per_prompt=2",
    "trainer.online.fit_prompts=8",
    "regularization.max_new_tokens=8",
]
STEPS = ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.batch_size=8"]


def recipe(name: str, tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            config_name=name, overrides=[f"out_dir={tmp_path}/{name}", f"cache_dir={tmp_path}/cache", *overrides]
        )
    cfg.common = [*cfg.common, *TINY]
    for mode in ("quick_overrides", "full_overrides"):
        cfg[mode] = {"offline": STEPS, "online": STEPS}
    return cfg


@pytest.mark.parametrize("name", ["sentiment", "multiobjective", "deterministic"])
def test_every_method_of_the_recipe_composes(tmp_path, name):
    cfg = recipe(name, tmp_path)
    for method in cfg.methods:
        composed = prefopt.compose(run_overrides(cfg, method, 0.1, 0))
        assert composed.recipe.method == method and composed.recipe.beta == 0.1
        assert composed.trainer.sample_eval and composed.data.source == "sampled"


def test_sentiment_recipe_runs_resumes_and_compares(tmp_path):
    cfg = recipe("sentiment", tmp_path, "run_methods=[dpo,rloo]", "betas_quick=[0.1]")
    result = run_recipe(cfg)
    assert len(result["runs"]) == 2
    for run in result["runs"]:
        lines = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        evals = [x for x in lines if "eval/reward/mean" in x]
        assert [x["step"] for x in evals] == [0, 2] and "eval/kl" in evals[-1]
    mtimes = [(Path(r) / "summary.json").stat().st_mtime for r in result["runs"]]
    again = run_recipe(cfg)  # finished runs are not trained again
    assert [(Path(r) / "summary.json").stat().st_mtime for r in again["runs"]] == mtimes
    table = compare_runs(cfg, again)
    assert "dpo" in table and "rloo" in table
    assert (Path(cfg.out_dir) / "compare" / "frontier.png").stat().st_size > 0


def test_compose_works_inside_a_running_hydra_app():
    """Recipe drivers are Hydra apps that compose prefopt-train configs: the app's Hydra state is set aside and
    restored around each compose."""
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        outer = compose(config_name="sentiment")
        assert prefopt.compose(["loss=ipo"]).loss.name == "ipo"
        assert GlobalHydra.instance().is_initialized()
        assert compose(config_name="sentiment") == outer  # the app's search path still answers


def test_a_method_with_its_own_beta_grid(tmp_path, monkeypatch):
    """``method_betas`` replaces the shared grid for that method (MPO's β weighs a per-token KL)."""
    trained = []

    def fake_fit(cfg, run_dir):
        trained.append((cfg.recipe.method, cfg.recipe.beta))
        Path(run_dir).mkdir(parents=True)
        (Path(run_dir) / "summary.json").write_text("{}")
        return {"eval": {}}

    monkeypatch.setattr(prefopt, "fit", fake_fit)
    cfg = recipe("sentiment", tmp_path, "run_methods=[dpo,mpo]")
    run_recipe(cfg)
    assert trained == [("dpo", 0.1), ("dpo", 0.5), ("mpo", 0.1), ("mpo", 0.5), ("mpo", 2.0)]


def test_alarm_recipe_sweeps_the_aspect_weight_and_plots_the_gate(tmp_path):
    """The ALaRM recipe's rloo methods differ only in ``reward.mode`` (hierarchical_ppo: the hierarchical mode with
    ppo); its swept parameter is the aspect weight, and the comparison draws the gate's open fraction over
    training."""
    cfg = recipe("alarm", tmp_path)
    for method in cfg.methods:
        composed = prefopt.compose(run_overrides(cfg, method, 7.0, 0))
        mode, loss = ("hierarchical", "ppo") if method == "hierarchical_ppo" else (method, "rloo")
        assert composed.reward.mode == mode and composed.loss.name == loss
        assert dict(composed.reward.weights) == {"readability": 7.0}
        assert list(composed.reward.aspects) == ["readability"]
        assert composed.reward.threshold == 0.0 and composed.trainer.source == "online"
    cfg = recipe("alarm", tmp_path, "run_methods=[hierarchical,holistic_only]")
    result = run_recipe(cfg)
    assert len(result["runs"]) == 4  # hierarchical over the weight grid, holistic_only at one weight
    for run in result["runs"]:
        lines = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        assert any("online/alarm/frac_above_threshold" in x for x in lines)
    compare_runs(cfg, result)
    assert (Path(cfg.out_dir) / "compare" / "curves.png").stat().st_size > 0


def test_a_recipe_online_through_its_common_overrides_gets_the_online_mode_settings(tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="alarm", overrides=[f"out_dir={tmp_path}"])
    cfg.quick_overrides = {"offline": ["trainer.max_steps=7"], "online": ["trainer.max_steps=9"]}
    assert "trainer.max_steps=9" in run_overrides(cfg, "hierarchical", 1.0, 0)
