"""``python -m bench --quick`` end to end (tiny sizes, seconds): the tables and the ratios line are printed with
finite numbers, and every configuration does the same work (same tokens per step; the bare loop's DPO losses equal
prefopt's; online, the same prompts in every step and completions of the same length range). No timing
assertions."""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import plan as plans
from bench import report, worker
from bench.artifacts import scaling_points

ROOT = Path(__file__).resolve().parents[2]
HAS_TRL = importlib.util.find_spec("trl") is not None
RATIOS = re.compile(
    r"ratio_vs_trl_default=(\S+) ratio_vs_trl_best=(\S+) overhead_vs_bare=(\S+) mpo_vs_dpo=(\S+) "
    r"overhead_vs_bare_same_padding=(\S+) online_ratio_vs_trl=(\S+)"
)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, json.loads(out.read_text())


def test_quick_mode_prints_the_tables_and_finite_ratios_last(quick):
    stdout, results = quick
    assert "FAILED" not in stdout, stdout
    match = RATIOS.fullmatch(stdout.strip().splitlines()[-1])
    assert match, stdout[-2000:]
    values = [float(v) for v in match.groups()] if HAS_TRL else [float(v) for v in match.groups()[2:5]]
    assert all(math.isfinite(v) for v in values), match.group(0)
    for name in (*report.DPO_ROWS, "prefopt-mpo"):
        assert re.search(rf"^{name}\s", stdout, re.MULTILINE), name
    assert "ratios, median [min, max] over 1 round(s): ratio_vs_trl_default" in stdout
    for name in ("prefopt-grpo", "trl-grpo"):
        assert re.search(rf"^{name}\s", stdout, re.MULTILINE), name
    titles = ("main table", "online table", "scaling:", "time to first step", "selective log-softmax memory", "vs LoRA")
    for title in titles:
        assert title in stdout, title
    assert len(results["scaling"]) == len(scaling_points(plans.QUICK))
    parts = ("main", "online", "scaling", "startup", "memory", "adapters")
    assert all(r["ok"] for part in parts for r in results[part] if not r.get("missing"))
    lora = {r["name"]: r for r in results["adapters"]}
    assert lora["adapters-lora"]["trainable_params"] < lora["adapters-full"]["trainable_params"]
    assert lora["adapters-lora-live"]["reference_model"] and not lora["adapters-lora"]["reference_model"]


def test_every_dpo_configuration_forwards_the_same_tokens(quick):
    _, results = quick
    expected = results["manifest"]["main"]["tokens_per_step"]
    main = {r["name"]: r for r in results["main"]}
    names = ["prefopt-default", "prefopt-best", "prefopt-padded", "prefopt-ckpt", "bare-pytorch", "prefopt-dpo-live"]
    names += ["trl-default", "trl-best"] if HAS_TRL else []
    for name in names:
        assert [int(t) for t in main[name]["tokens"]] == expected, name  # prefopt: the trainer's perf/tokens
    assert all(t > e for t, e in zip(main["prefopt-mpo"]["tokens"], expected, strict=True))  # + its reg. samples
    if HAS_TRL:  # same weights, same tokens: the same step-1 policy log-probs (trl-best runs fp32 like prefopt)
        assert main["trl-best"]["logps_chosen"][0] == pytest.approx(
            main["prefopt-default"]["logps_chosen"][0], rel=1e-5
        )


def test_online_configurations_sample_the_same_prompts_and_lengths(quick):
    """prefopt's online GRPO and TRL's GRPOTrainer: the same prompts in every step (digests of their token ids), k
    completions each of at most max_new_tokens tokens, every step timed and split into phases that fit in it."""
    _, results = quick
    plan = plans.QUICK
    online = {r["name"]: r for r in results["online"]}
    names = ["prefopt-grpo", *(["trl-grpo"] if HAS_TRL else [])]
    for name in names:
        run = online[name]
        assert len(run["step_seconds"]) == plan.online_steps, name
        assert run["samples"] == [plan.online_batch * plan.online_k] * plan.online_steps, name
        assert all(1 <= n <= plan.online_max_new_tokens for n in run["completion_length"]), name
        assert len(run["prompts"]) == plan.online_steps, name
        for seconds, phases in zip(run["step_seconds"], run["phases"], strict=True):
            assert set(phases) == {"generate", "score", "logps", "train"}
            assert phases["generate"] > 0 and sum(phases.values()) == pytest.approx(seconds, rel=1e-6), name
    if HAS_TRL:
        assert online["prefopt-grpo"]["prompts"] == online["trl-grpo"]["prompts"]
        assert report.online_ratios(plan, results["online"])["online_ratio_vs_trl"] > 0


def test_skip_leaves_parts_out_and_online_runs_alone(tmp_path):
    """``--skip`` with every part but the online one: only the online table, and the ratios line holds its ratio."""
    skip = "main,scaling,startup,memory,adapters"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--skip", skip, "--workdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "online table" in result.stdout and "main table" not in result.stdout and "scaling:" not in result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"online_ratio_vs_trl=\S+", last), last


def test_the_bare_loop_computes_prefopts_dpo_loss(quick):
    _, results = quick
    main = {r["name"]: r for r in results["main"]}
    bare, prefopt = main["bare-pytorch"], main["prefopt-default"]
    assert bare["losses"][0] == pytest.approx(prefopt["losses"][0], abs=1e-5)
    assert bare["logps_chosen"][0] == pytest.approx(prefopt["logps_chosen"][0], rel=1e-5)
    # and the whole short trajectory (same AdamW, lr, clipping, data order), not just the log 2 of step 1
    assert bare["losses"] == pytest.approx(prefopt["losses"], abs=1e-4)
    assert bare["logps_chosen"] == pytest.approx(prefopt["logps_chosen"], rel=1e-4)


def test_setup_time_and_memory_check_are_reported(quick):
    _, results = quick
    assert all(r["setup_seconds"] > 0 for r in results["startup"])
    assert [r["cache"] for r in results["startup"]] == ["first", "cold", "warm"]
    checksums = [r["checksum"] for r in results["memory"]]
    for checksum in checksums[1:]:  # the selective log-softmax gives the naive one's values and gradients
        assert checksum == pytest.approx(checksums[0], rel=1e-4, abs=1e-4)


def test_without_trl_the_rows_say_so(quick, monkeypatch):
    _, results = quick
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ImportError
    missing = worker.run_spec({"kind": "trl", "name": "trl-default", "threads": 1})
    assert not missing["ok"] and missing["missing"] == "TRL not installed (pip install -e .[bench])"
    main = [missing if r["name"] == "trl-default" else r for r in results["main"]]
    main = [{**missing, "name": "trl-best"} if r["name"] == "trl-best" else r for r in main]
    online = [{**missing, "name": "trl-grpo"} if r["name"] == "trl-grpo" else r for r in results["online"]]
    results = {**results, "main": main, "main_rounds": [main], "online": online, "online_rounds": [online]}
    text = report.render(plans.QUICK, results["manifest"], results, threads=1, repeats=1, elapsed=1.0)
    assert text.count("TRL not installed (pip install -e .[bench])") == 3
    last = RATIOS.fullmatch(text.splitlines()[-1])
    assert last and last.group(1) == last.group(2) == last.group(6) == "n/a"
    assert all(math.isfinite(float(last.group(i))) for i in (3, 4, 5))


def test_ratios_are_taken_per_round_and_targets_within_the_spread_are_noise(quick):
    _, results = quick
    plan, manifest = plans.QUICK, results["manifest"]
    main = results["main"]

    def slowed(name: str, factor: float) -> list[dict]:
        return [
            {**r, "step_seconds": [t * factor for t in r["step_seconds"]]} if r["name"] == name else r for r in main
        ]

    spread = report.ratio_spread(plan, manifest, [main, slowed("prefopt-mpo", 2.0), slowed("prefopt-mpo", 0.5)])
    one = report.ratios(plan, manifest, main)["mpo_vs_dpo"]
    median, lo, hi = spread["mpo_vs_dpo"]
    assert (median, lo, hi) == pytest.approx((one, one / 2, one * 2))
    assert report.verdict((median, lo, hi), one, at_least=True).startswith("within noise")
    assert report.verdict((median, lo, hi), one / 4, at_least=True) == "met"
    assert report.verdict((median, lo, hi), one * 4, at_least=True) == "NOT met"
    assert report.verdict((median, lo, hi), one * 4, at_least=False) == "met"
    assert report.verdict(float("nan"), 1.0, at_least=True) == "n/a"


def test_the_gpu_check_runs_end_to_end_on_a_cpu_with_a_tiny_model(tmp_path, capsys):
    """bench.gpu --tiny: the same script the GPU machine runs; QLoRA is refused in one line without CUDA."""
    from bench import gpu

    assert gpu.main(["--tiny", "--workdir", str(tmp_path), "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert "ratio prefopt-full / trl-best tokens/s:" in out and "FSDP: no GPU, not run" in out
    results = {r["name"]: r for r in json.loads((tmp_path / "out.json").read_text())["results"]}
    assert results["prefopt-full"]["ok"] and results["prefopt-lora"]["ok"]
    assert "needs a CUDA GPU" in results["prefopt-qlora"]["error"]
    assert results["trl-best"]["ok"] or results["trl-best"].get("missing")
