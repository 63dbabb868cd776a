"""``python -m recipes.exact [overrides]``: every pairwise loss's exact *population* fixed point on a tabular policy,
against the closed forms; then the IPO/MPO overfitting argument under deterministic preferences.

The problem (config ``conf/recipe/exact.yaml``): one prompt, N one-token responses y with true rewards r(y), a fixed
non-uniform reference π_ref and the policy π_θ = softmax(θ), all float64. Preference pairs are two different
responses drawn from μ × μ (μ = π_ref by default) and labelled by Bradley–Terry, p(y ≻ y') = σ(r(y) − r(y')), or
deterministically (the better response always wins). Every ordered pair (chosen y, rejected y') is one row of a
single batch with weight w ∝ μ(y) μ(y') p(y ≻ y'), Σw = 1, so Σ_i w_i · per_example_i is the population loss
exactly. Each loss is called through ``losses.get(name, beta=β, ...)`` with S = log π(y) (a one-token completion, so
summed = averaged log-prob), lengths 1 and reference log-probs log π_ref(y). Special inputs:

* ``mpo``: its regularisation "sample" is the exact expectation, ``reg_logps = [E_{y∼π_ref} log π_θ(y)]`` with
  length 1, so β·NLL(reg) is β times the forward cross-entropy H(π_ref, π_θ) = KL(π_ref‖π_θ) + const, exactly;
* ``upo``: no designer reward exists in this problem, so ``aux_rewards`` are zeros: every weight is 1 and the
  auxiliary term becomes α·NLL of both completions (a pull toward the pairs' marginal ∝ μ(y)(1 − μ(y)));
* ``combo``: the parts of ``hparams.combo`` (InternVL's Mixed PO by default);
* batch-dependent losses (``aot``, ``aot_unpaired`` sort margins over the batch, so rows cannot be weighted): the
  population is approximated by one batch of ``fit.batch_rows`` rows, each pair repeated round(rows·w) times;
* ``hinge`` is piecewise linear: L-BFGS stops at a kink, so its exact minimiser is found by enumerating the
  vertices of the objective (β·log-ratios on integer levels, below).

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

from __future__ import annotations

import csv
import itertools
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

import losses

__all__ = [
    "CONF_DIR",
    "Problem",
    "Population",
    "Fit",
    "make_problem",
    "dpo_optimum",
    "ipo_optimum",
    "ipo_least_squares",
    "sft_optimum",
    "bind",
    "fixed_point",
    "hinge_vertex",
    "train_curve",
    "log_grid",
    "setup_table",
    "fixed_point_table",
    "overfit_table",
    "Results",
    "Unsupported",
    "render",
    "kl",
    "tv",
    "compose",
    "run",
    "main",
]

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf" / "recipe")
F64 = torch.float64
KINDS = ("bt", "deterministic")
PIECEWISE_LINEAR = ("hinge",)  # minimised exactly by vertex enumeration (BT preferences, N <= max_vertex_n)
SKIP_REASONS = {"group": "group loss (k on-policy samples per prompt), not pairwise; see tests/losses/test_tabular.py"}


# ---------------------------------------------------------------------------------------------------- the problem
@dataclass(frozen=True)
class Problem:
    """One prompt, N one-token responses: true reward, reference, pair distribution μ and every ordered pair y≠y'."""

    reward: Tensor  # [N]
    ref_logp: Tensor  # [N] log π_ref
    mu: Tensor  # [N] distribution the two members of a pair are drawn from
    chosen: Tensor  # [P] long, P = N(N−1)
    rejected: Tensor  # [P]

    @property
    def n(self) -> int:
        return self.reward.numel()

    @property
    def best(self) -> int:
        return int(self.reward.argmax())

    def pref_matrix(self, kind: str) -> Tensor:
        """[N, N] p(y ≻ y'): Bradley–Terry σ(r − r'), or 1 / 0 / ½ (tie) when deterministic."""
        diff = self.reward[:, None] - self.reward[None, :]
        if kind == "bt":
            return torch.sigmoid(diff)
        if kind == "deterministic":
            return (diff > 0).to(F64) + 0.5 * (diff == 0).to(F64)
        raise ValueError(f"preference kind must be one of {KINDS}, got {kind!r}")

    def weights(self, kind: str) -> Tensor:
        """[P] population weight of each row (chosen, rejected): μ(y)μ(y')p(y ≻ y'), normalised to sum 1."""
        w = self.mu[self.chosen] * self.mu[self.rejected] * self.pref_matrix(kind)[self.chosen, self.rejected]
        return w / w.sum()

    def win_rate(self, kind: str) -> Tensor:
        """[N] P(y ≻ μ) = Σ_y' μ(y') p(y ≻ y') with p(y ≻ y) = ½ (Azar et al.'s preference of y over μ)."""
        return self.pref_matrix(kind) @ self.mu


def make_problem(rewards: Sequence[float], reference: Sequence[float], pairs_from: str = "reference") -> Problem:
    reward = torch.tensor(list(rewards), dtype=F64)
    ref = torch.tensor(list(reference), dtype=F64)
    if reward.dim() != 1 or reward.numel() < 2 or ref.shape != reward.shape:
        raise ValueError(f"rewards and reference need the same length >= 2, got {len(rewards)} and {len(reference)}")
    if not bool((ref > 0).all()):
        raise ValueError("reference probabilities must be > 0 (full support)")
    ref_logp = torch.log(ref / ref.sum())
    if pairs_from == "reference":
        mu = ref_logp.exp()
    elif pairs_from == "uniform":
        mu = torch.full_like(reward, 1.0 / reward.numel())
    else:
        raise ValueError(f"pairs_from must be 'reference' or 'uniform', got {pairs_from!r}")
    chosen, rejected = torch.cartesian_prod(torch.arange(reward.numel()), torch.arange(reward.numel())).T
    keep = chosen != rejected
    return Problem(reward, ref_logp, mu, chosen[keep], rejected[keep])


# --------------------------------------------------------------------------------------------------- closed forms
def dpo_optimum(problem: Problem, beta: float) -> Tensor:
    """log π*_DPO = log softmax(log π_ref + r/β)."""
    return torch.log_softmax(problem.ref_logp + problem.reward / beta, 0)


def ipo_optimum(problem: Problem, beta: float, kind: str = "bt") -> Tensor:
    """log π*_IPO = log softmax(log π_ref + P(y ≻ μ)/β) (Azar et al. 2023 §5, τ = β)."""
    return torch.log_softmax(problem.ref_logp + problem.win_rate(kind) / beta, 0)


def ipo_least_squares(problem: Problem, beta: float, kind: str = "bt") -> Tensor:
    """IPO's population objective Σ_i w_i (ρ_w − ρ_l − 1/(2β))² solved directly: weighted least squares in the
    log-ratios ρ (minimum-norm solution; the constant is fixed by normalising π ∝ π_ref·e^ρ)."""
    w = problem.weights(kind).sqrt()
    design = torch.zeros(len(w), problem.n, dtype=F64)
    rows = torch.arange(len(w))
    design[rows, problem.chosen] = 1.0
    design[rows, problem.rejected] = -1.0
    target = torch.full((len(w), 1), 1 / (2 * beta), dtype=F64)
    rho = torch.linalg.lstsq(w[:, None] * design, w[:, None] * target, driver="gelsd").solution[:, 0]
    return torch.log_softmax(problem.ref_logp + rho, 0)


def sft_optimum(problem: Problem, kind: str = "bt") -> Tensor:
    """SFT on the chosen response: π(y) = Σ_{y'} w(y, y'), the marginal of the chosen column."""
    marginal = torch.zeros(problem.n, dtype=F64).index_add_(0, problem.chosen, problem.weights(kind))
    return marginal.log()


def kl(p_logp: Tensor, q_logp: Tensor) -> float:
    """KL(p‖q) of two log-probability vectors."""
    return float((p_logp.exp() * (p_logp - q_logp)).sum())


def tv(p_logp: Tensor, q_logp: Tensor) -> float:
    return float(0.5 * (p_logp.exp() - q_logp.exp()).abs().sum())


# --------------------------------------------------------------------------------------------- population losses
class Unsupported(ValueError):
    """A loss this recipe cannot evaluate exactly (group losses, unknown extra inputs)."""


class Population:
    """The population loss of one bound loss: every ordered pair is a row of one batch, weighted (``__call__``).

    ``logp`` is [N], or [K, N] (K tables in one call) for losses whose rows are independent (``hinge``'s vertex
    enumeration; not ``mpo``, whose regularisation NLL is a batch mean)."""

    def __init__(self, loss: losses.BoundLoss, problem: Problem, kind: str, batch_rows: int = 20000):
        req = loss.requirements
        if req.kind != "pair":
            raise Unsupported(SKIP_REASONS["group"])
        handled = {"reg_logps", "reg_lengths", "aux_rewards_chosen", "aux_rewards_rejected"}
        unknown = [n for n in req.extras if n not in handled]
        if unknown:
            raise Unsupported(f"needs input(s) {', '.join(unknown)}, which this tabular problem has no value for")
        self.loss, self.problem, self.kind = loss, problem, kind
        chosen, rejected, weights = problem.chosen, problem.rejected, problem.weights(kind)
        self.note = ""
        if loss.spec.batch_dependent:  # rows cannot be weighted: repeat each pair round(rows·w) times
            counts = torch.round(weights * batch_rows).long()
            chosen, rejected = chosen.repeat_interleave(counts), rejected.repeat_interleave(counts)
            weights = torch.full((len(chosen),), 1.0 / len(chosen), dtype=F64)
            self.note = f"batch of {len(chosen)} rows ∝ w (approximate population)"
        self.chosen, self.rejected, self.weights = chosen, rejected, weights
        accepted = set(req.inputs) | set(req.optional_inputs)
        rows = len(chosen)
        # the inputs that do not depend on θ, built once: lengths 1, reference log-probs, zero auxiliary rewards
        self._fixed: dict[str, Tensor] = {
            "chosen_lengths": torch.ones(rows, dtype=torch.long),
            "rejected_lengths": torch.ones(rows, dtype=torch.long),
        }
        if req.needs_reference:
            self._fixed.update(ref_chosen_logps=problem.ref_logp[chosen], ref_rejected_logps=problem.ref_logp[rejected])
        if "aux_rewards_chosen" in accepted:
            zeros = torch.zeros(rows, dtype=F64)
            self._fixed.update(aux_rewards_chosen=zeros, aux_rewards_rejected=zeros)
        self._reg = "reg_logps" in accepted
        if self._reg:  # reg_ref_logps = E_{π_ref} log π_ref, so mpo/kl_fwd_est is KL(π_ref‖π) exactly
            self._fixed.update(
                reg_lengths=torch.ones(1, dtype=torch.long),
                reg_ref_logps=(problem.ref_logp.exp() * problem.ref_logp).sum().reshape(1),
            )

    def inputs(self, logp: Tensor) -> dict[str, Tensor]:
        lead = logp.shape[:-1]
        out = {k: v.expand(*lead, *v.shape) if lead else v for k, v in self._fixed.items()}
        out["policy_chosen_logps"] = logp[..., self.chosen]
        out["policy_rejected_logps"] = logp[..., self.rejected]
        if self._reg:  # one "sample" holding the exact expectation under π_ref: NLL = H(π_ref, π)
            out["reg_logps"] = (self.problem.ref_logp.exp() * logp).sum(-1, keepdim=True)
        return out

    def __call__(self, logp: Tensor) -> Tensor:
        return (self.weights * self.loss(**self.inputs(logp)).per_example).sum(-1)

    def gradient(self, logits: Tensor) -> tuple[float, Tensor]:
        logits = logits.detach().clone().requires_grad_(True)
        value = self(torch.log_softmax(logits, -1))
        (grad,) = torch.autograd.grad(value, logits)
        return float(value.detach()), grad


def bind(name: str, beta: float | None, hparams: Mapping[str, Any] | None = None) -> losses.BoundLoss:
    """``losses.get(name, beta=β, **hparams)``; β is passed to every loss that has a ``beta``."""
    kwargs = dict(hparams or {})
    if beta is not None and "beta" in losses.spec(name).hparams:
        kwargs.setdefault("beta", beta)
    return losses.get(name, **kwargs)


# ----------------------------------------------------------------------------------------------- optimisation
@dataclass
class Fit:
    logp: Tensor  # [N] log π at the end
    status: str  # converged | not converged | LP vertex | non-finite
    value: float
    grad_norm: float
    evals: int
    detail: str = ""


def fixed_point(
    pop: Population, init: Tensor, *, max_evals: int = 150, grad_tol: float = 1e-8, history: int = 20
) -> Fit:
    """Full-batch L-BFGS on θ from ``init`` logits until ‖∇θ‖ < ``grad_tol``·max(1, |loss|) or ``max_evals`` loss
    evaluations: two-loop recursion, backtracking (Armijo) line search, curvature pairs with sᵀy ≤ 0 dropped (the
    non-convex losses). Written out because ``torch.optim``'s first use imports TorchDynamo (seconds), and because a
    trial step that makes a loss non-finite just halves the step here."""
    theta = init.detach().clone()
    evals = 0

    def evaluate(x: Tensor) -> tuple[float, Tensor] | None:
        nonlocal evals
        evals += 1
        try:
            value, grad = pop.gradient(x)
        except losses.NonFiniteError:
            return None
        return (value, grad) if math.isfinite(value) and bool(torch.isfinite(grad).all()) else None

    first = evaluate(theta)
    if first is None:
        return Fit(torch.log_softmax(theta, 0), "non-finite", math.nan, math.nan, evals, "at the start")
    value, grad = first
    pairs: list[tuple[Tensor, Tensor, float]] = []  # (s, y, 1/(yᵀs))
    while evals < max_evals and float(grad.norm()) >= grad_tol * max(1.0, abs(value)):
        q, alphas = grad.clone(), []
        for s_k, y_k, rho in reversed(pairs):
            alpha = rho * float(s_k @ q)
            q -= alpha * y_k
            alphas.append(alpha)
        if pairs:
            s_k, y_k, _ = pairs[-1]
            q *= float(s_k @ y_k) / float(y_k @ y_k)
        else:
            q /= max(1.0, float(grad.abs().max()))  # first step: at most 1 in each logit
        for (s_k, y_k, rho), alpha in zip(pairs, reversed(alphas), strict=True):
            q += s_k * (alpha - rho * float(y_k @ q))
        direction = -q
        slope = float(grad @ direction)
        if not slope < 0:  # not a descent direction: restart from the gradient
            pairs.clear()
            direction = -grad / max(1.0, float(grad.abs().max()))
            slope = float(grad @ direction)
        step, accepted = 1.0, None
        while evals < max_evals and step > 1e-20:
            trial = evaluate(theta + step * direction)
            if trial is not None and trial[0] <= value + 1e-4 * step * slope:
                accepted = trial
                break
            step *= 0.5
        if accepted is None:  # no decrease along the direction: as far as float64 goes
            break
        s_k = step * direction
        y_k = accepted[1] - grad
        curvature = float(s_k @ y_k)
        if curvature > 1e-12 * float(s_k.norm() * y_k.norm()):
            pairs = [*pairs[-(history - 1) :], (s_k, y_k, 1.0 / curvature)]
        theta = theta + s_k
        value, grad = accepted
    logp = torch.log_softmax(theta, 0)
    grad_norm = float(grad.norm())
    status = "converged" if grad_norm < grad_tol * max(1.0, abs(value)) else "not converged"
    return Fit(logp, status, value, grad_norm, evals)


def hinge_vertex(pop: Population, *, chunk: int = 50000) -> Fit:
    """Exact minimiser of a piecewise-linear population loss with breakpoints at β·(ρ_w − ρ_l) = ±1 (``hinge``, BT
    preferences, both orders of every pair weighted): the objective is convex with bounded level sets, so a minimiser
    is a vertex of the hyperplane arrangement, where N−1 independent margins equal ±1/β, i.e. every β·ρ(y) lies on an
    integer level 0..N−1 (up to a constant). All N^N level assignments are evaluated through the loss."""
    problem, beta = pop.problem, pop.loss.hparams["beta"]
    n = problem.n
    best_value, best_levels = math.inf, None
    product = itertools.product(range(n), repeat=n)
    while batch := list(itertools.islice(product, chunk)):
        levels = torch.tensor(batch, dtype=F64)
        logp = torch.log_softmax(problem.ref_logp + levels / beta, -1)
        values = pop(logp)
        i = int(values.argmin())
        if float(values[i]) < best_value - 1e-15:
            best_value, best_levels = float(values[i]), levels[i]
    logp = torch.log_softmax(problem.ref_logp + best_levels / beta, 0)
    shown = ", ".join(f"{v:g}" for v in (best_levels - best_levels.max()).tolist())
    return Fit(logp, "LP vertex", best_value, math.nan, n**n, f"β·log-ratios (max = 0): [{shown}]")


def log_grid(max_steps: int, extra: Iterable[int] = ()) -> list[int]:
    """Steps 1, 2, 5, 10, 20, 50, ... up to ``max_steps`` (and ``extra`` and ``max_steps`` itself)."""
    grid = {m * 10**e for e in range(int(math.log10(max(max_steps, 1))) + 1) for m in (1, 2, 5)}
    return sorted(s for s in grid | set(extra) | {max_steps} if 1 <= s <= max_steps)


def train_curve(
    pop: Population,
    init: Tensor,
    *,
    steps: Sequence[int],
    lr: float,
    optimizer: str = "adam",
    update_tol: float = 1e-12,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
) -> tuple[dict[int, Tensor], str]:
    """Full-batch training on θ from ``init`` logits: Adam (``torch.optim.Adam``'s update, written out: this loop
    runs 10⁴ steps on a 6-entry table, where the optimizer's own overhead would dominate) or plain gradient descent.
    Returns ({step: log π at each of ``steps``}, end state). Stops early once an update moves θ by less than
    ``update_tol``: θ is then numerically fixed, and the later checkpoints repeat the final table."""
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"overfit.optimizer must be adam or sgd, got {optimizer!r}")
    logits = init.detach().clone().requires_grad_(True)
    m, v = torch.zeros_like(init), torch.zeros_like(init)
    (b1, b2), wanted, out = adam_betas, sorted(set(steps)), {}
    state = f"ran {wanted[-1]} steps"
    for step in range(1, wanted[-1] + 1):
        (grad,) = torch.autograd.grad(pop(torch.log_softmax(logits, 0)), logits)
        with torch.no_grad():
            if optimizer == "adam":
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2**step)).add_(adam_eps)
                update = m.div(denom).mul_(lr / (1 - b1**step))
            else:
                update = grad.mul(lr)
            logits.sub_(update)
        if step in wanted:
            out[step] = torch.log_softmax(logits.detach(), 0)
        if float(update.abs().max()) < update_tol:
            _, grad = pop.gradient(logits)
            word = "converged" if float(grad.norm()) < 1e-8 else "stalled"
            state = f"{word} at step {step} (update < {update_tol:g})"
            final = torch.log_softmax(logits.detach(), 0)
            out.update({s: final for s in wanted if s > step})
            break
    return out, state


# ----------------------------------------------------------------------------------------------------- tables
NOTES = {
    "dpo": "closed form π_ref·exp(r/β): BT's logit p = r − r' is additive over pairs",
    "sigmoid_norm": "= DPO at length 1 (per-token normalisation is the identity)",
    "cdpo": "label smoothing fits σ(βΔ) to (1−2ε)p+ε, not p: margins shrink toward π_ref",
    "robust": "fits σ(βΔ) to the de-noised label (p−ε)/(1−2ε): sharper than π*_DPO on clean labels",
    "hinge": "piecewise linear: the minimiser is an LP vertex, β·log-ratios on integer levels, not exp(r/β)",
    "discopop": "non-monotone per-pair loss (logistic below 0, exponential above, switch width τ): no exp(r/β) tilt",
    "exo_pair": "reverse-KL fit to the smoothed hard label: βΔ = (2p−1)·log((1−ε)/ε), not additive in r",
    "nca_pair": "acts on each log-ratio, not only the margin; normalisation couples them",
    "bco_pair": "per-response logistic regression of βρ (chosen vs rejected); δ = 0 does not normalise",
    "apo_zero": "= Σ_y (W⁻(y) − W⁺(y))·σ(βρ(y)) + const (W± = weight as chosen/rejected): linear in σ(βρ), so "
    "responses rejected more often than chosen are pushed to π(y) → 0",
    "apo_down": "σ(βρ_w) lowers every chosen ratio while 1 − σ(βΔ) rewards margins: no interior minimum",
    "aot": "quantile matching of the margins (sorted over the batch), not a per-pair optimum",
    "aot_unpaired": "quantile matching of ρ_w against ρ_l (each sorted over the batch): spreading the ratios apart "
    "keeps lowering it",
    "ipo": "closed form π_ref·exp(P(y≻μ)/β) (Azar et al. §5)",
    "sppo_hard": "regresses each ρ to ±1/(2β): IPO's shape, but each ratio absolutely, so π must renormalise",
    "mpo": "targets IPO's objective E_π P(y≻μ) − β·KL; σ(S_w − S_l) and forward KL only approximate it",
    "upo": "no designer reward here (aux = 0): weights 1, so + α·NLL(both completions) pulls toward the pair "
    "marginal ∝ μ(y)(1 − μ(y))",
    "combo": "Mixed PO: the SFT part pulls toward the chosen marginal μ·P(y≻μ)",
    "simpo": "reference-free with target margin γ: π_ref does not enter",
    "cpo": "reference-free DPO (uniform reference) + α·NLL(chosen): pulled toward the SFT closed form",
    "orpo": "NLL(chosen) + λ·odds ratio (β passed as λ): near the SFT closed form",
    "sft": "closed form: the chosen marginal μ(y)·Σ μ(y')p(y≻y')",
}
MATCH_TV = 1e-6


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10 ** (-digits) or abs(value) >= 1e5):
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _hparam_text(loss: losses.BoundLoss) -> str:
    defaults = losses.spec(loss.name).hparams
    shown = {k: v for k, v in loss.hparams.items() if k == "beta" or v != defaults.get(k)}
    if loss.name == "ipo":
        shown["length_normalize"] = loss.hparams["length_normalize"]
    if loss.name == "simpo":
        shown["gamma"] = loss.hparams["gamma"]
    if loss.name in ("cdpo", "robust", "exo_pair"):
        shown["ε"] = shown.pop("label_smoothing", loss.hparams["label_smoothing"])
    if "parts" in shown:
        shown["parts"] = "+".join(f"{w:g}·{n}" for n, w in dict(shown["parts"]).items())
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()) or "—"


def _loss_hparams(cfg: DictConfig, name: str) -> dict[str, Any]:
    value = (cfg.get("hparams") or {}).get(name)
    return dict(OmegaConf.to_container(value, resolve=True)) if value is not None else {}


def _pairwise_names(cfg: DictConfig) -> tuple[list[str], list[tuple[str, str]]]:
    requested = list(losses.available()) if cfg.losses in ("all", None) else [str(n) for n in cfg.losses]
    names, skipped = [], []
    for name in requested:
        spec = losses.spec(name)  # unknown names raise UnknownLossError
        if name in set(cfg.get("skip") or []):
            skipped.append((name, "skipped by config"))
        elif spec.kind != "pair":
            skipped.append((name, SKIP_REASONS["group"]))
        else:
            names.append(name)
    return names, skipped


@dataclass
class Results:
    setup: str = ""
    sections: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # the CSV
    curves: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)  # run -> step -> metrics
    references: dict[str, float] = field(default_factory=dict)  # horizontal lines of the plot
    files: dict[str, str] = field(default_factory=dict)


def _fit_from_starts(pop: Population, starts: Mapping[str, Tensor], fcfg: DictConfig) -> tuple[Fit, str]:
    """L-BFGS from every start. The run from the first start (π_ref, where training starts) is reported unless another
    start reaches a clearly lower loss (a non-convex loss); the note then describes where the π_ref run stopped."""
    fits = {
        key: fixed_point(pop, init, max_evals=int(fcfg.max_evals), grad_tol=float(fcfg.grad_tol))
        for key, init in starts.items()
    }
    first_key = next(iter(starts))
    best_key = min(fits, key=lambda k: math.inf if math.isnan(fits[k].value) else fits[k].value)
    first, best = fits[first_key], fits[best_key]
    note = ""
    lower = best.value < first.value - 1e-4 * max(1.0, abs(best.value)) or math.isnan(first.value)
    if lower and tv(first.logp, best.logp) > 1e-3:
        reward = float((first.logp.exp() * pop.problem.reward).sum())
        divergence = kl(first.logp, pop.problem.ref_logp)
        note = (
            "non-convex: from π_ref L-BFGS stops at another stationary point "
            f"(loss {first.value:.4f} > {best.value:.4f} from {best_key}; "
            f"there E_π[r] = {reward:.4f}, KL(π‖π_ref) = {divergence:.4f})"
        )
    else:
        best = first
    best.evals = sum(f.evals for f in fits.values())
    if best.status == "converged" and not _attained(pop, best):
        best.status = "boundary"
    return best, note


def _attained(pop: Population, fit: Fit, far: Sequence[float] = (10.0, 100.0), tiny: float = 1e-12) -> bool:
    """Whether a stationary point with numerically vanished responses (π(y) < ``tiny``) is a minimum at finite θ:
    pushing those responses further toward 0 (their logits down by 10 and 100) must raise the loss. A loss whose
    infimum lies on the boundary of the simplex (unattained) stays flat or falls there: its gradient vanished by
    saturation, not at a minimum."""
    vanished = fit.logp < math.log(tiny)
    if not bool(vanished.any()):
        return True
    direction = -vanished.to(fit.logp.dtype)
    tolerance = 1e-12 * max(1.0, abs(fit.value))
    with torch.no_grad():
        return all(float(pop(torch.log_softmax(fit.logp + t * direction, 0))) > fit.value + tolerance for t in far)


def fixed_point_table(cfg: DictConfig, problem: Problem, beta: float, results: Results) -> str:
    fcfg = cfg.fit
    names, skipped = _pairwise_names(cfg)
    dpo_star, ipo_star = dpo_optimum(problem, beta), ipo_optimum(problem, beta)
    ipo_solved, sft_star = ipo_least_squares(problem, beta), sft_optimum(problem)
    starts = {"π_ref": problem.ref_logp, "π*_DPO": dpo_star}
    header = [
        "loss",
        "hyper-parameters",
        "fixed point",
        "KL(π‖π*_DPO)",
        "KL(π‖π_ref)",
        "E_π[r]",
        "TV(π, π*_DPO)",
        "TV(π, π*_IPO)",
        "min π",
        "note",
    ]
    keys = ("kl_to_dpo_opt", "kl_to_ref", "expected_reward", "tv_to_dpo_opt", "tv_to_ipo_opt", "min_prob")
    rows: list[list[Any]] = []

    def add(name: str, hp: str, status: str, logp: Tensor, note: str, extra: dict | None = None) -> None:
        values = [
            kl(logp, dpo_star),
            kl(logp, problem.ref_logp),
            float((logp.exp() * problem.reward).sum()),
            tv(logp, dpo_star),
            tv(logp, ipo_star),
            float(logp.exp().min()),
        ]
        rows.append([name, hp, status, *values, note])
        results.rows.append(
            {
                "section": "fixed_point",
                "preferences": "bt",
                "loss": name,
                "beta": beta,
                "hparams": hp,
                "status": status,
                **dict(zip(keys, values, strict=True)),
                **(extra or {}),
                "note": note,
                "policy": " ".join(f"{p:.6g}" for p in logp.exp().tolist()),
            }
        )

    add("π_ref", "—", "reference", problem.ref_logp, "the reference policy (θ's starting point)")
    add("π*_DPO", f"β={beta:g}", "closed form", dpo_star, "π_ref·exp(r/β)/Z")
    gap = float((ipo_star - ipo_solved).abs().max())
    add("π*_IPO", f"β={beta:g}", "closed form", ipo_star, f"π_ref·exp(P(y≻μ)/β)/Z = least-squares solve ({gap:.0e})")
    for name in names:
        try:
            loss = bind(name, beta, _loss_hparams(cfg, name))
            pop = Population(loss, problem, "bt", batch_rows=int(fcfg.batch_rows))
        except Unsupported as error:
            skipped.append((name, str(error)))
            continue
        notes = [NOTES.get(name, "")]
        if name in PIECEWISE_LINEAR and problem.n <= int(fcfg.max_vertex_n):
            smooth = fixed_point(pop, problem.ref_logp, max_evals=int(fcfg.max_evals), grad_tol=float(fcfg.grad_tol))
            fit = hinge_vertex(pop)
            notes.append(
                f"exact vertex {fit.detail}, loss {fit.value:.4f}; L-BFGS stops at a kink (loss {smooth.value:.4f}, "
                f"TV {tv(smooth.logp, fit.logp):.2f} away)"
            )
        else:
            fit, local = _fit_from_starts(pop, starts, fcfg)
            notes.append(local)
        if name == "sft":
            notes.append(f"TV to it {tv(fit.logp, sft_star):.0e}")
        if name == "robust":
            eps = loss.hparams["label_smoothing"]
            if float(problem.pref_matrix("bt").min()) < eps:
                notes.append(f"some pair has p < ε = {eps:g}: the loss is unbounded below there")
        notes.append(pop.note)
        if float(fit.logp.exp().max()) > 0.999:
            y = int(fit.logp.argmax())
            notes.append(
                f"π ≈ δ at y = {y} (r = {float(problem.reward[y]):g}, π_ref = {float(problem.ref_logp[y].exp()):g})"
            )
        if fit.status == "boundary":
            notes.append(
                "infimum not attained: pushing the vanished responses further toward π(y) = 0 does not raise the loss; "
                f"the row is where L-BFGS stopped ({fit.evals} evaluations)"
            )
        if fit.status == "not converged":
            notes.append(f"‖∇θ‖ = {fit.grad_norm:.0e} after {fit.evals} evaluations")
        if tv(fit.logp, dpo_star) < MATCH_TV:
            status = f"= π*_DPO (TV {tv(fit.logp, dpo_star):.0e})"
        elif tv(fit.logp, ipo_star) < MATCH_TV:
            status = f"= π*_IPO (TV {tv(fit.logp, ipo_star):.0e})"
        elif name == "sft" and tv(fit.logp, sft_star) < MATCH_TV:
            status = "= SFT closed form"
        else:
            status = fit.status
        add(
            name,
            _hparam_text(loss),
            status,
            fit.logp,
            "; ".join(n for n in notes if n),
            {"evals": fit.evals, "grad_norm": fit.grad_norm, "loss_value": fit.value},
        )
    text = [
        f"### Bradley–Terry preferences, β = {beta:g}",
        "",
        "fixed point: full-batch L-BFGS from π_ref (and from π*_DPO, kept only when it reaches a clearly lower loss); "
        "`= π*_DPO` / `= π*_IPO` when TV < 1e-6; `converged` ‖∇θ‖ < tol at a finite minimum; `boundary` the infimum "
        "lies at π(y) → 0 (unattained); `LP vertex` exact minimiser by vertex enumeration. β is passed to every loss "
        "with a `beta`.",
        "",
        markdown_table(header, rows),
    ]
    if skipped:
        text += ["", "Not evaluated: " + "; ".join(f"`{n}` ({why})" for n, why in skipped) + "."]
    return "\n".join(text)


def overfit_table(cfg: DictConfig, problem: Problem, results: Results) -> str:
    ocfg = cfg.overfit
    kind = "deterministic"
    max_steps = int(ocfg.max_steps)
    report = sorted({int(s) for s in ocfg.report_steps if int(s) <= max_steps} | {max_steps})
    steps = log_grid(max_steps, report)
    best = problem.best
    vertex_kl = -float(problem.ref_logp[best])  # KL(δ_best ‖ π_ref): the largest KL(π‖π_ref) a table can reach
    results.references["vertex: all mass on the best response"] = vertex_kl
    header = [
        "run",
        *[f"KL(π‖π_ref) @ {s}" for s in report],
        f"KL(π_ref‖π) @ {report[-1]}",
        f"π(best) @ {report[-1]}",
        f"E_π[r] @ {report[-1]}",
        "end of training",
        "fixed point KL(π‖π_ref)",
    ]
    rows = []
    for run in ocfg.runs:
        run = dict(OmegaConf.to_container(run, resolve=True))
        name = str(run.pop("loss"))
        beta = float(run.pop("beta", ocfg.beta))
        hp = {**_loss_hparams(cfg, name), **run}
        loss = bind(name, beta, hp)
        pop = Population(loss, problem, kind, batch_rows=int(cfg.fit.batch_rows))
        label = f"{name} ({_hparam_text(loss)})"
        curve, state = train_curve(
            pop,
            problem.ref_logp,
            steps=steps,
            lr=float(ocfg.lr),
            optimizer=str(ocfg.optimizer),
            update_tol=float(ocfg.update_tol),
        )
        metrics = {
            s: {
                "kl_to_ref": kl(lp, problem.ref_logp),
                "kl_ref_to_policy": kl(problem.ref_logp, lp),
                "p_best": float(lp[best].exp()),
                "expected_reward": float((lp.exp() * problem.reward).sum()),
                "max_log_ratio_gap": float((lp - problem.ref_logp).max() - (lp - problem.ref_logp).min()),
            }
            for s, lp in curve.items()
        }
        results.curves[label] = metrics
        if name == "ipo":
            target_kl = kl(ipo_optimum(problem, beta, kind), problem.ref_logp)
            target = f"{target_kl:.4f} (closed form; TV {tv(curve[max_steps], ipo_optimum(problem, beta, kind)):.1e})"
            results.references[f"π*_IPO (β={beta:g})"] = target_kl
        elif name in ("dpo", "sigmoid_norm", "simpo", "cpo"):
            target = f"none: sup {vertex_kl:.4f} at the vertex"
        else:
            fit = fixed_point(pop, problem.ref_logp, max_evals=int(cfg.fit.max_evals), grad_tol=float(cfg.fit.grad_tol))
            target = (
                f"{kl(fit.logp, problem.ref_logp):.4f} (L-BFGS, TV {tv(curve[max_steps], fit.logp):.1e})"
                if fit.status == "converged"
                else f"{fit.status}"
            )
        last = metrics[report[-1]]
        rows.append(
            [
                label,
                *[metrics[s]["kl_to_ref"] for s in report],
                last["kl_ref_to_policy"],
                last["p_best"],
                last["expected_reward"],
                state,
                target,
            ]
        )
        for s, m in metrics.items():
            results.rows.append(
                {
                    "section": "deterministic",
                    "preferences": kind,
                    "loss": name,
                    "beta": beta,
                    "hparams": _hparam_text(loss),
                    "step": s,
                    **m,
                    "status": state,
                    "policy": " ".join(f"{p:.6g}" for p in curve[s].exp().tolist()),
                }
            )
    intro = (
        f"### Deterministic preferences (the better response always wins): {ocfg.optimizer} lr {float(ocfg.lr):g}, "
        f"full batch, from π = π_ref\n\nKL(π‖π_ref) of a table is at most {vertex_kl:.4f} = −log π_ref(best) (all mass "
        "on the best response); the forward KL(π_ref‖π) and the log-ratio gaps are unbounded."
    )
    return intro + "\n\n" + markdown_table(header, rows)


def setup_table(cfg: DictConfig, problem: Problem, betas: Sequence[float]) -> str:
    header = [
        "y",
        "r(y)",
        "π_ref(y)",
        "μ(y)",
        "P(y≻μ) BT",
        *[f"π*_DPO β={b:g}" for b in betas],
        *[f"π*_IPO β={b:g}" for b in betas],
        "SFT (chosen marginal)",
    ]
    columns = [
        problem.reward,
        problem.ref_logp.exp(),
        problem.mu,
        problem.win_rate("bt"),
        *[dpo_optimum(problem, b).exp() for b in betas],
        *[ipo_optimum(problem, b).exp() for b in betas],
        sft_optimum(problem).exp(),
    ]
    rows = [[y, *[float(c[y]) for c in columns]] for y in range(problem.n)]
    gaps = ", ".join(
        f"β={b:g}: {float((ipo_optimum(problem, b) - ipo_least_squares(problem, b)).abs().max()):.1e}" for b in betas
    )
    lines = [
        f"## Exact population fixed points: tabular softmax policy, one prompt, N = {problem.n} one-token responses",
        "",
        f"Pairs: two different responses from μ × μ (μ = {cfg.pairs_from}), every ordered pair one row weighted "
        "μ(y)μ(y')p(y≻y'); S = log π(y), lengths 1; float64; θ starts at log π_ref.",
        "",
        markdown_table(header, rows),
        "",
        f"IPO closed form vs. the direct least-squares solve of Σ w (ρ_w − ρ_l − 1/(2β))²: max |Δ log π| {gaps}.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- outputs
def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_plot(results: Results, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = plt.get_cmap("tab10").colors
    markers = "osD^v<>pXh*"
    for i, (label, curve) in enumerate(results.curves.items()):
        steps = sorted(curve)
        style = {"color": colors[i % len(colors)], "marker": markers[i % len(markers)], "markersize": 4, "label": label}
        axes[0].plot(steps, [curve[s]["kl_to_ref"] for s in steps], **style)
        axes[1].plot(steps, [curve[s]["kl_ref_to_policy"] for s in steps], **style)
    for j, (label, value) in enumerate(results.references.items()):
        axes[0].axhline(value, color="0.4", linestyle=("--", ":", "-.")[j % 3], linewidth=1, label=label)
    axes[0].set_ylabel("KL(π ‖ π_ref)  [nats]")
    axes[1].set_ylabel("KL(π_ref ‖ π)  [nats]")
    axes[1].set_yscale("symlog", linthresh=0.1)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("training steps (full batch)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("reverse KL to the reference (bounded by the vertex)")
    axes[1].set_title("forward KL to the reference (unbounded)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, loc="upper left")
    else:
        axes[0].text(
            0.5, 0.5, "no deterministic runs (overfit.runs is empty)", ha="center", transform=axes[0].transAxes
        )
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------- run
def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``python -m recipes.exact OVERRIDES`` would run (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="exact", overrides=list(overrides))


def run(cfg: DictConfig) -> Results:
    """Build the problem, compute every table, write ``exact.md``, ``exact.csv`` and ``exact.png`` to
    ``cfg.out_dir``; returns the results (``rows`` = the CSV, ``curves`` = the deterministic runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.get("threads") or threads))  # tiny tensors: one thread avoids sync overhead
    try:
        problem = make_problem(list(cfg.rewards), list(cfg.reference), str(cfg.pairs_from))
        betas = [float(b) for b in cfg.betas]
        results = Results()
        results.setup = setup_table(cfg, problem, betas)
        results.sections = [fixed_point_table(cfg, problem, b, results) for b in betas]
        if cfg.overfit.runs:
            results.sections.append(overfit_table(cfg, problem, results))
    finally:
        torch.set_num_threads(threads)
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "exact.md", "csv": out_dir / "exact.csv", "png": out_dir / "exact.png"}
    paths["md"].write_text(render(results) + "\n")
    write_csv(results.rows, paths["csv"])
    write_plot(
        results,
        paths["png"],
        f"Deterministic preferences, N = {problem.n}: DPO has no fixed point, IPO and MPO converge",
    )
    results.files = {k: str(v) for k, v in paths.items()}
    return results


def render(results: Results) -> str:
    return "\n\n".join([results.setup, *results.sections])


@hydra.main(config_path=CONF_DIR, config_name="exact", version_base="1.3")
def main(cfg: DictConfig) -> None:
    started = time.perf_counter()
    try:
        results = run(cfg)
    except (losses.LossError, ValueError) as error:
        print(f"recipes.exact: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(render(results))
    print(f"\nwrote {', '.join(results.files.values())} in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
