"""recipes.exact: population fixed points on a tabular softmax policy against the closed forms (DPO, IPO, SFT, the
hinge LP vertex), the deterministic-preference overfitting argument, and the Hydra app end to end."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import losses
from recipes import exact

REWARDS = [1.0, 0.7, 0.3, 0.0, -0.4, -1.0]
REFERENCE = [0.05, 0.15, 0.30, 0.20, 0.22, 0.08]
PROBLEM = exact.make_problem(REWARDS, REFERENCE)
ROOT = Path(__file__).resolve().parents[2]


def fit(name: str, beta: float, kind: str = "bt", problem: exact.Problem = PROBLEM, **hparams) -> exact.Fit:
    pop = exact.Population(exact.bind(name, beta, hparams), problem, kind)
    return exact.fixed_point(pop, problem.ref_logp)


def test_problem_by_hand():
    """Three responses, uniform μ: the pair weights, P(y ≻ μ) and the chosen marginal written out."""
    problem = exact.make_problem([1.0, 0.0, 0.0], [0.5, 0.25, 0.25], pairs_from="uniform")
    assert problem.chosen.tolist() == [0, 0, 1, 1, 2, 2] and problem.rejected.tolist() == [1, 2, 0, 2, 0, 1]
    hard = problem.weights("deterministic")  # 0≻1, 0≻2 win; 1 vs 2 tie (½ each way)
    assert hard.tolist() == pytest.approx([1 / 3, 1 / 3, 0, 1 / 6, 0, 1 / 6])
    assert problem.win_rate("deterministic").tolist() == pytest.approx([5 / 6, 1 / 3, 1 / 3])
    assert exact.sft_optimum(problem, "deterministic").exp().tolist() == pytest.approx([2 / 3, 1 / 6, 1 / 6])
    s = torch.sigmoid(torch.tensor(1.0, dtype=torch.float64)).item()
    assert problem.win_rate("bt").tolist() == pytest.approx([(0.5 + 2 * s) / 3, (2 - s) / 3, (2 - s) / 3])


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_learned_table_is_reference_tilted_by_reward(beta):
    """Population DPO under BT preferences: the learned table is π_ref·exp(r/β)/Z (Rafailov et al. 2023 §4)."""
    result = fit("dpo", beta)
    target = torch.tensor(REFERENCE, dtype=torch.float64) * torch.exp(torch.tensor(REWARDS, dtype=torch.float64) / beta)
    target = target / target.sum()
    assert result.status == "converged"
    assert 0.5 * (result.logp.exp() - target).abs().sum() < 1e-4
    assert exact.tv(result.logp, exact.dpo_optimum(PROBLEM, beta)) < 1e-6


@pytest.mark.parametrize("kind", ["bt", "deterministic"])
@pytest.mark.parametrize("pairs_from", ["reference", "uniform"])
def test_ipo_learned_table_is_the_closed_form_and_the_least_squares_solution(kind, pairs_from):
    """IPO (Azar et al. 2023 §5): π ∝ π_ref·exp(P(y ≻ μ)/β) equals the direct solve of the quadratic objective, and
    the learned table matches both, with soft and with deterministic preferences."""
    problem = exact.make_problem(REWARDS, REFERENCE, pairs_from=pairs_from)
    beta = 0.25
    closed, solved = exact.ipo_optimum(problem, beta, kind), exact.ipo_least_squares(problem, beta, kind)
    assert torch.allclose(closed, solved, atol=1e-10)
    for length_normalize in (True, False):  # identical at length 1
        result = fit("ipo", beta, kind, problem, length_normalize=length_normalize)
        assert exact.tv(result.logp, closed) < 1e-6


def test_sft_learns_the_chosen_marginal_and_sigmoid_norm_equals_dpo():
    assert exact.tv(fit("sft", None).logp, exact.sft_optimum(PROBLEM)) < 1e-6
    assert exact.tv(fit("sigmoid_norm", 0.5).logp, exact.dpo_optimum(PROBLEM, 0.5)) < 1e-6


def test_hinge_vertex_is_the_exact_minimum():
    """The vertex enumeration finds a loss no larger than L-BFGS's (which stalls at a kink), on integer β-levels."""
    pop = exact.Population(exact.bind("hinge", 0.5), PROBLEM, "bt")
    vertex = exact.vertex_minimum(pop)
    smooth = exact.fixed_point(pop, PROBLEM.ref_logp, max_evals=60)
    assert vertex.value <= smooth.value + 1e-12
    levels = 0.5 * (vertex.logp - PROBLEM.ref_logp)
    levels = levels - levels.max()
    assert torch.allclose(levels, levels.round(), atol=1e-9)
    assert exact.tv(vertex.logp, exact.dpo_optimum(PROBLEM, 0.5)) > 0.05  # not π_ref·exp(r/β)


def test_special_inputs():
    """mpo's regularisation sample is the exact forward KL; aot gets a repeated batch; upo zero aux rewards."""
    mpo = exact.Population(exact.bind("mpo", 0.1), PROBLEM, "bt")
    logp = exact.dpo_optimum(PROBLEM, 1.0)
    out = mpo.loss(**mpo.inputs(logp))
    assert out.metrics["mpo/kl_fwd_est"].item() == pytest.approx(exact.kl(PROBLEM.ref_logp, logp), abs=1e-12)
    aot = exact.Population(exact.bind("aot", 0.1), PROBLEM, "bt", batch_rows=1000)
    assert abs(len(aot.chosen) - 1000) <= len(PROBLEM.chosen) and "approximate" in aot.note
    upo = exact.Population(exact.bind("upo", 0.1, {"alpha": 0.0}), PROBLEM, "bt")  # α = 0: exactly DPO
    assert exact.tv(exact.fixed_point(upo, PROBLEM.ref_logp).logp, exact.dpo_optimum(PROBLEM, 0.1)) < 1e-6
    with pytest.raises(exact.Unsupported):
        exact.Population(exact.bind("rloo", None), PROBLEM, "bt")


def test_deterministic_preferences_dpo_kl_grows_ipo_and_mpo_stay_bounded():
    """The IPO/MPO papers' argument: with p ∈ {0, 1}, DPO's KL(π‖π_ref) keeps increasing with the steps (toward the
    vertex; its forward KL without bound), IPO converges to its closed form and MPO's β bounds it too."""
    steps = [10, 30, 100, 300]
    ref = PROBLEM.ref_logp

    def curve(name, beta):
        pop = exact.Population(exact.bind(name, beta), PROBLEM, "deterministic")
        return exact.train_curve(pop, ref, steps=steps, lr=0.1)[0], pop

    (dpo, _), (ipo, _), (mpo, mpo_pop) = curve("dpo", 0.1), curve("ipo", 0.1), curve("mpo", 1.0)
    dpo_kl = [exact.kl(dpo[s], ref) for s in steps]
    assert all(b > a for a, b in zip(dpo_kl, dpo_kl[1:], strict=False)), dpo_kl
    forward = [exact.kl(ref, dpo[s]) for s in steps]
    assert all(b > a for a, b in zip(forward, forward[1:], strict=False)) and forward[-1] > 10, forward
    assert exact.tv(ipo[300], exact.ipo_optimum(PROBLEM, 0.1, "deterministic")) < 1e-5
    assert dpo_kl[-1] > exact.kl(ipo[300], ref) + 0.5
    assert exact.tv(mpo[300], exact.fixed_point(mpo_pop, ref).logp) < 1e-4
    assert exact.kl(mpo[300], ref) < 0.1


def test_recipe_runs_end_to_end(tmp_path):
    """``python -m recipes.exact`` with a tiny budget prints the tables and writes exact.md, exact.csv, exact.png."""
    out = tmp_path / "exact"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "recipes.exact",
            f"out_dir={out}",
            "betas=[1.0]",
            "losses=[dpo,ipo,mpo,aot,rloo]",
            "overfit.max_steps=20",
            "overfit.report_steps=[5,20]",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for name in ("exact.md", "exact.csv", "exact.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| dpo | beta=1 | = π*_DPO" in result.stdout
    assert "| ipo | beta=1, length_normalize=True | = π*_IPO" in result.stdout
    assert (out / "exact.md").read_text().strip() in result.stdout
    rows = list(csv.DictReader((out / "exact.csv").open()))
    sections = {r["section"] for r in rows}
    assert sections == {"fixed_point", "deterministic"}
    assert {r["loss"] for r in rows if r["section"] == "deterministic"} == {"dpo", "ipo", "mpo"}
    assert not list(tmp_path.glob("**/.hydra"))  # no Hydra leftovers in the out dir


def test_every_pairwise_loss_gets_a_row(tmp_path):
    """The fixed-point table covers every registered pairwise loss (a tiny L-BFGS budget: coverage, not values)."""
    cfg = exact.compose([f"out_dir={tmp_path}", "fit.max_evals=4", "fit.max_vertex_n=0"])
    results = exact.Results()
    text = exact.fixed_point_table(cfg, PROBLEM, 0.5, results)
    pairwise = {n for n in losses.available() if losses.spec(n).kind == "pair"}
    assert {r["loss"] for r in results.rows} == pairwise | {"π_ref", "π*_DPO", "π*_IPO"}
    # every other loss (group: rloo; token: the GRPO family) is listed as not evaluated, after "Not evaluated: "
    not_evaluated = text.split("Not evaluated: ")[1]
    assert "`rloo` (group loss" in not_evaluated
    for name in sorted(set(losses.available()) - pairwise):
        assert f"`{name}` (" in not_evaluated, name


def test_unknown_loss_is_a_user_error(tmp_path):
    with pytest.raises(losses.UnknownLossError, match="unknown loss 'nope'"):
        exact.run(exact.compose([f"out_dir={tmp_path}", "losses=[nope]"]))


def test_a_small_regularisation_pool_pulls_mpo_away_from_the_reference():
    """MPO's KL term on a finite pool is the cross-entropy to the pool's empirical distribution: with 4 samples the
    fixed point's KL to π_ref *rises* with β (the pool is fitted), while the exact expectation (an infinite pool)
    makes it fall. This is why the trainer sizes the pool from the data and the schedule."""
    pool = [5, 4, 2, 5]  # four responses drawn from π_ref (seeded multinomial)

    def kl_at(beta: float, reg_pool=None) -> float:
        pop = exact.Population(exact.bind("mpo", beta), PROBLEM, "bt", reg_pool=reg_pool)
        fit = exact.fixed_point(pop, PROBLEM.ref_logp)
        assert fit.status == "converged"
        return exact.kl(fit.logp, PROBLEM.ref_logp)

    infinite = [kl_at(b) for b in (0.1, 0.5, 2.0)]
    finite = [kl_at(b, pool) for b in (0.1, 0.5, 2.0)]
    assert infinite == sorted(infinite, reverse=True) and infinite[-1] < 0.01
    assert finite == sorted(finite) and finite[-1] > 0.8
