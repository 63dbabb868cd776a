"""``python -m recipes.exact [overrides]``: every pairwise loss's exact *population* fixed point on a tabular policy,
against the closed forms; then the IPO/MPO overfitting argument under deterministic preferences.

The problem (config ``conf/recipe/exact.yaml``): one prompt, N one-token responses y with true rewards r(y), a fixed
non-uniform reference π_ref and the policy π_θ = softmax(θ), all float64. Preference pairs are two different
responses drawn from μ × μ (μ = π_ref by default) and labelled by Bradley–Terry, p(y ≻ y') = σ(r(y) − r(y')), or
deterministically (the better response always wins). Every ordered pair (chosen y, rejected y') is one row of a
single batch with weight w ∝ μ(y) μ(y') p(y ≻ y'), Σw = 1, so Σ_i w_i · per_example_i is the population loss
exactly. Each loss is called through ``losses.get(name, beta=β, ...)`` with S = log π(y) (a one-token completion, so
summed = averaged log-prob), lengths 1 and reference log-probs log π_ref(y). Inputs beyond
these are supplied by their names (``recipes.exact.testbed``): MPO's ``reg_logps`` is the exact expectation under
π_ref, UPO's ``aux_rewards`` are zeros. Batch-dependent losses (``LossSpec.batch_dependent``: ``aot`` sorts margins
over the batch) get one batch of ``fit.batch_rows`` rows, each pair repeated round(rows·w) times; piecewise-linear
losses (``LossSpec.piecewise_linear``: ``hinge``) are minimised exactly by enumerating the vertices of the objective,
since L-BFGS stops at a kink. Each loss is described by its registry entry (``LossSpec.optimum``), so a newly
registered loss appears in the tables without editing this recipe.

Closed forms: DPO's optimum π*_DPO ∝ π_ref·exp(r/β) (Rafailov et al. 2023 §4, BT preferences with full support);
IPO's π*_IPO ∝ π_ref·exp(P(y ≻ μ)/β), P(y ≻ μ) = E_{y'∼μ} p(y ≻ y') (Azar et al. 2023 §5), also solved directly as
the weighted least-squares problem Σ w (ρ_w − ρ_l − 1/(2β))² and both reported; SFT on the chosen response has
π ∝ μ(y)·Σ_{y'≠y} μ(y') p(y ≻ y') (the chosen marginal).

Fixed points (one table per β in ``betas``, BT preferences): full-batch L-BFGS on θ from θ = log π_ref, and again
from π*_DPO; the π_ref run is reported unless the other start reaches a clearly lower loss (non-convex losses, noted).
A stationary point where some π(y) has vanished is checked: if pushing those responses further toward 0 does not raise
the loss, the infimum is on the boundary of the simplex (``boundary``), not a minimum.

Overfitting (``overfit``): deterministic preferences, full-batch Adam from π_ref; KL(π‖π_ref) and KL(π_ref‖π) at
a 1-2-5 grid of steps up to ``overfit.max_steps`` for DPO, IPO and MPO at several β. A table's KL(π‖π_ref) is bounded
by −log π_ref(best) (the vertex); DPO runs to it, while the forward KL and the log-ratio gaps grow without bound.

Outputs in ``out_dir`` (default ``outputs/exact``): ``exact.md`` (the printed tables), ``exact.csv`` (every number)
and ``exact.png`` (KL vs steps under deterministic preferences, log-x).
"""

from recipes.exact import report, testbed
from recipes.exact.report import *  # noqa: F403 - the recipe's API is the testbed's and the report's
from recipes.exact.testbed import *  # noqa: F403

__all__ = [*testbed.__all__, *report.__all__]
