"""Online mode on the tiny model (warm-started by a short cached SFT): sampling -> reward -> pairs or groups -> the
same registered losses; the reward rises with dpo and with rloo; ALaRM runs as a reward, with its statistics and
selection; online runs resume on the same trajectory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import losses
import prefopt
from losses.alarm import alarm_reward
from prefopt.config import ConfigError
from prefopt.rewards.base import Reward, TokenScores
from prefopt.scoring import AlarmScorer, RewardScorer, build_scorer

from .test_cli import LAUNCH_TWO
from .test_trainer import TINY_MODEL

SFT = ["model.sft.steps=200", "model.sft.lr=1e-2", "model.sft.n_rows=600"]
ONLINE = [
    *[
        o
        for o in TINY_MODEL
        if not o.startswith(("model.sft", "model.vocab_size", "trainer.batch_size", "trainer.eval"))
    ],
    *SFT,
    "trainer=online",
    "trainer.batch_size=8",
    "trainer.online.samples_per_prompt=4",
    "trainer.online.max_new_tokens=20",
    "trainer.online.fit_prompts=16",
    "trainer.online.eval_prompts=16",
    "trainer.eval_every=0",
    "trainer.online.table_every=5",
    "data.n_train=200",
    "data.n_eval=40",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("online-cache")


def run(tmp_path: Path, cache_dir: Path, *overrides: str, name: str = "run") -> dict:
    cfg = prefopt.compose([*ONLINE, f"cache_dir={cache_dir}", *overrides])
    return prefopt.fit(cfg, run_dir=tmp_path / name)


def lines(summary: dict) -> list[dict]:
    return [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]


def rewards_by_step(summary: dict) -> list[float]:
    return [line["online/reward/mean"] for line in lines(summary) if "online/reward/mean" in line]


@pytest.mark.parametrize(
    ("loss", "extra"),
    [
        ("dpo", ["loss.beta=0.1", "trainer.lr=2e-3"]),
        ("rloo", ["loss.kl_coef=0.01", "trainer.lr=2e-3"]),
        ("grpo", ["loss.beta=0.01", "trainer.lr=2e-3"]),  # token level, with its per-token KL to the reference
    ],
)
def test_online_training_raises_the_reward(tmp_path, cache_dir, loss, extra):
    summary = run(tmp_path, cache_dir, f"loss={loss}", "reward=lexicon", "trainer.max_steps=24", *extra)
    curve = rewards_by_step(summary)
    assert len(curve) == 24
    first, last = sum(curve[:6]) / 6, sum(curve[-6:]) / 6
    assert last > first + 0.5, curve
    assert summary["source"] == "online"
    final = summary["train"]
    assert final["online/kl"] > 0  # the policy moved away from the reference
    assert 0 < final["online/response_length"] <= 20


def test_online_metrics_and_sample_tables(tmp_path, cache_dir):
    summary = run(tmp_path, cache_dir, "loss=ipo", "reward=length", "trainer.max_steps=5", "trainer.eval_every=5")
    logged = lines(summary)
    tables = [line for line in logged if "samples" in line]
    assert [t["step"] for t in tables] == [1, 5]
    assert set(tables[0]["samples"][0]) >= {"prompt", "completion", "reward", "length"}
    train = [line for line in logged if "loss" in line]
    assert {"online/reward/mean", "online/reward/std", "online/reward/length", "online/kl", "online/eos_frac"} <= set(
        train[-1]
    )
    evaluation = [line for line in logged if "eval/reward/mean" in line]
    assert [line["step"] for line in evaluation] == [0, 5] and "eval/kl" in evaluation[0]
    assert evaluation[0]["eval/kl"] == pytest.approx(0.0, abs=1e-4)  # step 0: the policy is the reference


def test_online_upo_and_mpo_get_their_inputs(tmp_path, cache_dir):
    for loss in ("upo", "mpo"):
        summary = run(tmp_path, cache_dir, f"loss={loss}", "trainer.max_steps=2", name=loss)
        assert summary["steps"] == 2 and "loss" in summary["train"]


TOKEN_LOSSES = [n for n in losses.available() if losses.spec(n).kind == "token"]


@pytest.mark.parametrize("loss", TOKEN_LOSSES)
def test_every_token_loss_trains_online(tmp_path, cache_dir, loss):
    summary = run(tmp_path, cache_dir, f"loss={loss}", "reward=length", "trainer.max_steps=2", name=loss)
    trained = [line for line in lines(summary) if "loss" in line]
    assert [line["step"] for line in trained] == [1, 2]
    assert all(v == v for line in trained for v in line.values() if isinstance(v, float))  # finite, no NaN


def test_token_loss_inputs_are_the_rows_per_token_values(tmp_path, cache_dir, monkeypatch):
    """What a token loss receives: [N, L] policy and reference log-probs of the sampled rows (left-aligned, L = the
    longest completion of the micro-batch), the mask of each row's tokens, one advantage per completion from its
    group's rewards; the reference's values equal the policy's at step 1 (the policy is the reference)."""
    seen = []
    real = losses.get("grpo", beta=0.1)

    def spy(**inputs):
        seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return real(**inputs)

    from prefopt import build as build_module

    original = build_module.build_loss
    monkeypatch.setattr(build_module, "build_loss", lambda cfg: _Wrapped(original(cfg), spy))
    run(tmp_path, cache_dir, "loss=grpo", "loss.beta=0.1", "reward=length", "trainer.max_steps=1", name="spy")
    first = seen[0]
    n, width = first["policy_token_logps"].shape
    assert first["completion_mask"].shape == (n, width) and first["advantages"].shape == (n,)
    assert first["completion_mask"].sum(dim=1).max() == width  # L is the longest completion
    assert torch.allclose(first["ref_token_logps"], first["policy_token_logps"], atol=1e-5)
    assert (first["policy_token_logps"][first["completion_mask"] == 0] == 0).all()
    groups = first["advantages"].reshape(-1, 4)  # K = 4 samples per prompt
    assert torch.allclose(groups.mean(dim=1), torch.zeros(len(groups)), atol=1e-5)  # group-centred


class _Wrapped:
    """A bound loss whose call goes through ``fn`` (to see its inputs); everything else is the loss's."""

    def __init__(self, loss, fn):
        self._loss, self._fn = loss, fn

    def __getattr__(self, name):
        return getattr(self._loss, name)

    def __call__(self, **inputs):
        return self._fn(**inputs)


def test_group_loss_offline_is_a_config_error(tmp_path, cache_dir):
    cfg = prefopt.compose([*TINY_MODEL, "loss=rloo", f"cache_dir={cache_dir}"])
    with pytest.raises(ConfigError, match="group loss .* trainer=online"):
        prefopt.fit(cfg, run_dir=tmp_path / "x")


def test_online_resume_continues_the_same_trajectory(tmp_path, cache_dir):
    base = ["loss=dpo", "reward=lexicon", "trainer.max_steps=6", "trainer.online.table_every=0"]
    full = run(tmp_path, cache_dir, *base, "trainer.save_every=3", name="full")
    checkpoint = Path(full["run_dir"]) / "checkpoints" / "step-3"
    resumed = run(tmp_path, cache_dir, *base, f"trainer.resume={checkpoint}", name="resumed")
    tail = [line for line in lines(full) if line["step"] > 3]
    again = lines(resumed)
    assert [line["step"] for line in again] == [4, 5, 6]
    for a, b in zip(tail, again, strict=True):
        assert a["online/reward/mean"] == b["online/reward/mean"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


# ---------------------------------------------------------------------------------------------------------- ALaRM
def test_alarm_online_run_writes_statistics_and_gate_metrics(tmp_path, cache_dir):
    summary = run(tmp_path, cache_dir, "loss=rloo", "reward=alarm", "trainer.max_steps=3")
    stats = json.loads((Path(summary["run_dir"]) / "reward_stats.json").read_text())
    assert set(stats) == {"holistic", "readability", "conciseness", "repetition"}
    assert all(s["std"] > 0 for s in stats.values())
    final = summary["train"]
    for key in ("alarm/frac_above_threshold", "alarm/holistic_z_mean", "reward/holistic", "reward/repetition"):
        assert f"online/{key}" in final
    assert 0.0 <= final["online/alarm/frac_above_threshold"] <= 1.0


def test_alarm_select_auto_keeps_the_consistent_aspect(tmp_path, cache_dir):
    # holistic = word count; aspect "longer" agrees with it by construction, "shorter" (conciseness) disagrees.
    overrides = [
        "loss=dpo",
        "reward=alarm",
        "reward.holistic={name: length}",
        "~reward.aspects",
        "+reward.aspects={longer: {name: length}, shorter: {name: conciseness}}",
        "~reward.weights",
        "+reward.weights={longer: 1.0, shorter: 1.0}",
        "reward.token_level=[]",
        "reward.select=auto",
        "reward.select_top_k=1",
        "reward.select_prompts=16",
        "trainer.max_steps=1",
    ]
    summary = run(tmp_path, cache_dir, *overrides)
    selection = json.loads((Path(summary["run_dir"]) / "reward_selection.json").read_text())
    assert selection["selected"] == ["longer"]
    assert selection["rates"]["longer"] == 0.0 and selection["rates"]["shorter"] == 1.0
    assert selection["weights"] == {"longer": 1.0, "shorter": 0.0}


def test_gate_never_ranks_a_passing_response_below_a_failing_one():
    torch.manual_seed(0)
    n, width = 400, 12
    holistic = torch.randn(n) * 2
    aspects = {"a": torch.randn(n, width) * 3, "b": torch.randn(n, width)}
    assigned = {name: torch.rand(n, width) < 0.4 for name in aspects}
    lengths = torch.randint(1, width + 1, (n,))
    kwargs = {"aspect_weights": {"a": 1.0, "b": 0.5}, "holistic_mean": 0.0, "holistic_std": 1.0, "threshold": 0.5}
    out = alarm_reward(holistic, aspects, assigned, lengths, holistic_weight=3.0, sigmoid_shaping=True, **kwargs)
    passed, returns = out.passed_gate, out.sequence_rewards
    assert passed.any() and (~passed).any()
    assert returns[passed].min() > returns[~passed].max()
    # at equal holistic score, adding the aspect layer never lowers a response below holistic-only
    only = alarm_reward(holistic, aspects, assigned, lengths, holistic_weight=3.0, mode="holistic_only", **kwargs)
    assert bool((returns >= only.sequence_rewards - 1e-6).all())


def test_alarm_scorer_matches_spec_arithmetic():
    # ALaRM's MT setting: raw 0.0, z = 0.795637 >= 0.5; ten tokens, two in an error span (w = 1): 8*0.5 + 2*0.268941
    # plus 3z = 6.924794. Here the error-span aspect is a per-token reward: -1 on tokens 3 and 4, 0 elsewhere.
    scorer = AlarmScorer(
        {
            "name": "alarm",
            "holistic": {"_target_": "tests.prefopt.test_online.zero_reward"},
            "aspects": {"grammar": {"_target_": "tests.prefopt.test_online.ErrorSpanReward"}},
            "weights": {"grammar": 1.0},
            "token_level": ["grammar"],
            "mode": "hierarchical",
            "threshold": 0.5,
            "holistic_weight": 3.0,
            "sigmoid_shaping": True,
            "min_tokens": 2,
            "holistic_mean": -2.34417221913525,
            "holistic_std": 2.946283030347152,
        }
    )
    pieces = [[f"t{i} " for i in range(10)], ["x"]]
    scores = scorer(["p", "p"], ["".join(pieces[0]), "x"], pieces)
    assert scores.total[0].item() == pytest.approx(6.924794, abs=1e-5)
    assert scores.total[1].item() == pytest.approx(-30.0)  # too short: W_h * -10
    assert set(scores.components) == {"holistic", "grammar"}


def zero_reward(prompts, completions):
    return torch.zeros(len(completions))


class ErrorSpanReward(Reward):
    """A per-token reward like ALaRM's grammar aspect: every token assigned, -1 on tokens 3 and 4."""

    name = "grammar"

    def score(self, prompts, completions):
        return torch.zeros(len(completions))

    def token_scores(self, prompts, completions, tokens):
        values = [torch.tensor([-1.0 if i in (3, 4) else 0.0 for i in range(len(t))]) for t in tokens]
        return TokenScores(values, [torch.ones(len(t), dtype=torch.bool) for t in tokens])


def test_build_scorer_picks_the_composite_for_alarm():
    assert isinstance(build_scorer({"name": "lexicon"}), RewardScorer)
    assert isinstance(build_scorer(dict(prefopt.compose(["reward=alarm"]).reward)), AlarmScorer)
    with pytest.raises(ConfigError, match="unknown aspect"):
        AlarmScorer({**dict(prefopt.compose(["reward=alarm"]).reward), "weights": {"nope": 1.0}})


def test_select_rewards_command_writes_a_config_prefopt_train_uses(tmp_path, cache_dir):
    out = tmp_path / "selection"
    args = [o for o in ONLINE if not o.startswith("trainer=")]
    command = [sys.executable, "-m", "prefopt.select_rewards", *args, f"cache_dir={cache_dir}", f"out_dir={out}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "disagreement %" in result.stdout and "reward=alarm_selected" in result.stdout
    selection = json.loads((out / "selection.json").read_text())
    assert set(selection["rates"]) == {"readability", "conciseness", "repetition"}
    assert len(selection["selected"]) <= 1
    cfg = prefopt.compose(
        [
            *ONLINE,
            f"cache_dir={cache_dir}",
            "reward=alarm_selected",
            f"hydra.searchpath=[file://{out}]",
            "trainer.max_steps=2",
        ]
    )
    assert cfg.reward.select == "none"
    assert dict(cfg.reward.weights) == selection["weights"]
    summary = prefopt.fit(cfg, run_dir=tmp_path / "run")
    assert summary["steps"] == cfg.trainer.max_steps


def test_select_rewards_needs_the_alarm_reward(tmp_path):
    command = [sys.executable, "-m", "prefopt.select_rewards", "reward=lexicon", f"out_dir={tmp_path}/o"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("prefopt-select-rewards: error: ")


def test_online_training_under_two_processes(tmp_path, cache_dir):
    """Two processes (torchrun, gloo): each process samples its share of the prompts; every collective
    call (skipped steps, evaluation, metrics) matches up, and rank 0 alone writes the logs."""
    overrides = [*ONLINE, f"cache_dir={cache_dir}", "loss=rloo", "reward=alarm", "reward.select=auto"]
    overrides += [
        "reward.select_prompts=8",
        "trainer.max_steps=3",
        "trainer.eval_every=3",
        f"hydra.run.dir={tmp_path}/two",
    ]
    result = subprocess.run([*LAUNCH_TWO, *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run dir: ") == 1
    logged = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged if "loss" in x] == [1, 2, 3]
    assert [x["step"] for x in logged if "eval/reward/mean" in x] == [0, 3]
    assert (tmp_path / "two" / "reward_selection.json").exists()
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["distributed"] == "MULTI_CPU x 2"


def _alarm(normalize: dict) -> AlarmScorer:
    return AlarmScorer(
        {
            "name": "alarm",
            "holistic": {"name": "length"},
            "aspects": {"completeness": {"name": "length"}, "concise": {"name": "conciseness"}},
            "weights": {"completeness": 1.0, "concise": 1.0},
            "token_level": [],
            "normalize": normalize,
            "mode": "weighted_sum",
            "threshold": 0.5,
            "holistic_weight": 3.0,
            "sigmoid_shaping": False,
            "min_tokens": 0,
            "holistic_mean": 0.0,
            "holistic_std": 1.0,
        }
    )


def test_alarm_aspects_with_fixed_or_no_normalisation():
    """normalize.<aspect>: fixed statistics (e.g. the authors' completeness x 0.3 + bias) or raw values, then scale
    and bias, on the last token of a sequence-level aspect; the default fits statistics on reference samples."""
    prompts, texts = ["p", "p"], ["one two three", "one two three four five"]
    pieces = [["one", " two", " three"], ["one", " two", " three", " four", " five"]]
    scorer = _alarm(
        {
            "completeness": {"mode": "fixed", "mean": 4.0, "std": 2.0, "scale": 0.3, "bias": 0.1},
            "concise": {"mode": "none", "scale": 2.0},
        }
    )
    values, assigned, raw = scorer._aspect_tensors(prompts, texts, pieces, width=5)
    assert values["completeness"][0, 2].item() == pytest.approx(0.3 * (3 - 4) / 2 + 0.1)
    assert values["completeness"][1, 4].item() == pytest.approx(0.3 * (5 - 4) / 2 + 0.1)
    assert values["concise"][:, -1].tolist() == pytest.approx([0.0, 2.0 * -5])  # row 0's last token is index 2
    assert values["concise"][0, 2].item() == pytest.approx(2.0 * -3)
    assert assigned["completeness"].sum().item() == 2
    fitted = _alarm({})
    fitted.fit(prompts, texts, pieces)  # mean 4, std 1 on these two samples
    assert fitted._aspect_tensors(prompts, texts, pieces, width=5)[0]["completeness"][1, 4].item() == pytest.approx(1)
    with pytest.raises(ConfigError, match="mode fixed needs mean and a non-zero std"):
        _alarm({"completeness": {"mode": "fixed"}})
    with pytest.raises(ConfigError, match="normalize names unknown aspect"):
        _alarm({"nope": {"mode": "none"}})


def test_fixed_normalisation_equals_the_authors_completeness_arithmetic():
    """ALaRM's long-form QA completeness aspect (halfrot/ALaRM @ f5b3cf8d, long-form-QA/my_reward.py
    PreferenceReward.get_reward and train_ppo.py's defaults): a sequence-level score r on the last token,
    reward_shape(((r − mean)/std)·scale + bias, sigmoid_shaping) with mean −0.44677690555995353,
    std 8.301160619054132, scale 0.3, bias 0, zeros on the other tokens. Declared here as a sequence-level aspect with
    normalize {mode: fixed, ...}: the same numbers."""
    import math

    from losses.alarm import shaped_aspects

    mean, std, scale, bias = -0.44677690555995353, 8.301160619054132, 0.3, 0.0
    scorer = _alarm(
        {
            "completeness": {"mode": "fixed", "mean": mean, "std": std, "scale": scale, "bias": bias},
            "concise": {"mode": "none"},
        }
    )
    prompts, texts = ["p", "p", "p"], ["one two three", "one two three four five", "one"]
    pieces = [["one", " two", " three"], ["one", " two", " three", " four", " five"], ["one"]]
    values, assigned, raw = scorer._aspect_tensors(prompts, texts, pieces, width=5)
    for shaping in (False, True):
        ours = shaped_aspects(
            {"c": values["completeness"]}, {"c": assigned["completeness"]}, {"c": 1.0}, sigmoid_shaping=shaping
        )
        for row, (r, n) in enumerate(zip(raw["completeness"].tolist(), [3, 5, 1], strict=True)):
            x = ((r - mean) / std) * scale + bias  # the authors' reward_shape argument
            theirs = [0.0] * (n - 1) + [1 / (1 + math.exp(-x)) if shaping else x]
            assert ours[row, :n].tolist() == pytest.approx(theirs, abs=1e-5)
            assert ours[row, n:].abs().sum().item() == 0.0


def test_num_iterations_reuses_each_draw_with_the_sampling_policys_log_probs(tmp_path, cache_dir, monkeypatch):
    """trainer.online.num_iterations=2: two optimizer steps per draw of samples; token losses get the sampling
    policy's per-token log-probs as old_token_logps, equal to the policy's at the draw's first step and not at its
    second (the policy has moved)."""
    seen = []
    real = losses.get("grpo")

    def spy(**inputs):
        seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return real(**inputs)

    from prefopt import build as build_module

    original = build_module.build_loss
    monkeypatch.setattr(build_module, "build_loss", lambda cfg: _Wrapped(original(cfg), spy))
    summary = run(
        tmp_path,
        cache_dir,
        "loss=grpo",
        "reward=length",
        "trainer.max_steps=4",
        "trainer.online.num_iterations=2",
        "trainer.lr=5e-3",
        name="mu",
    )
    curve = rewards_by_step(summary)
    assert curve[0] == curve[1] and curve[2] == curve[3] and curve[1] != curve[2]  # one draw per two steps
    first, second = seen[0], seen[1]
    assert torch.equal(first["old_token_logps"], second["old_token_logps"])
    assert torch.allclose(first["old_token_logps"], first["policy_token_logps"], atol=1e-5)
    assert not torch.allclose(second["old_token_logps"], second["policy_token_logps"], atol=1e-4)


def test_resume_between_iterations_over_one_draw_continues_the_same_trajectory(tmp_path, cache_dir):
    common = ["loss=grpo", "reward=length", "trainer.max_steps=4", "trainer.online.num_iterations=2", "trainer.lr=5e-3"]
    full = run(tmp_path, cache_dir, *common, "trainer.save_every=1", name="full")
    checkpoint = Path(full["run_dir"]) / "checkpoints" / "step-1"  # after the first of the draw's two steps
    assert (checkpoint / "source_state_0.json").exists()
    resumed = run(tmp_path, cache_dir, *common, f"trainer.resume={checkpoint}", name="resumed")
    tail = [line["loss"] for line in lines(full) if "loss" in line and line["step"] > 1]
    assert [line["loss"] for line in lines(resumed) if "loss" in line] == tail  # bit-identical
