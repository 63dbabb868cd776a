"""The exact testbed: one prompt, N one-token responses, a tabular softmax policy, and the *population* (infinite-data)
loss of any registered pairwise loss, with the closed forms it is compared against and the optimisers that minimise it
exactly (L-BFGS, vertex enumeration for piecewise-linear losses, full-batch Adam for training curves). The report that
turns it into tables is :mod:`recipes.exact.report`.

Inputs a loss declares are supplied by name, never by loss: S = log π(y) (one token, so summed = averaged), lengths 1,
reference log-probs log π_ref(y); ``reg_logps`` (MPO) is the exact expectation E_{y∼π_ref} log π_θ(y) as one sample of
length 1, so β·NLL(reg) is β·H(π_ref, π_θ) = β·KL(π_ref‖π_θ) + const; ``aux_rewards_*`` (UPO) are zeros (this problem
has no designer reward). Batch-dependent losses (``LossSpec.batch_dependent``: rows cannot be weighted) get one batch
of ``batch_rows`` rows, each pair repeated round(rows·w) times.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import losses

__all__ = [
    "Problem",
    "Population",
    "Fit",
    "Unsupported",
    "make_problem",
    "dpo_optimum",
    "ipo_optimum",
    "ipo_least_squares",
    "sft_optimum",
    "bind",
    "fixed_point",
    "vertex_minimum",
    "train_curve",
    "log_grid",
    "kl",
    "tv",
    "KINDS",
    "GROUP_REASON",
    "TOKEN_REASON",
    "UNPAIRED_REASON",
    "SKIP_REASONS",
]

F64 = torch.float64
KINDS = ("bt", "deterministic")
GROUP_REASON = "group loss (k on-policy samples per prompt), not pairwise; see tests/losses/test_tabular.py"
TOKEN_REASON = "token-level policy-gradient loss (per-token log-probs of on-policy samples), not pairwise"
UNPAIRED_REASON = "unpaired loss (single completions labelled desirable or undesirable), not pairwise"
REWARD_REASON = "reward-model loss (a classifier's scores of pairs), trains no policy"
SKIP_REASONS = {"group": GROUP_REASON, "token": TOKEN_REASON, "unpaired": UNPAIRED_REASON, "reward": REWARD_REASON}


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

    def __init__(
        self,
        loss: losses.BoundLoss,
        problem: Problem,
        kind: str,
        batch_rows: int = 20000,
        reg_pool: Sequence[int] | None = None,
    ):
        req = loss.requirements
        if req.kind != "pair":
            raise Unsupported(SKIP_REASONS.get(req.kind, GROUP_REASON))
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
        self._pool = None if reg_pool is None else torch.as_tensor(list(reg_pool), dtype=torch.long)
        if self._reg and self._pool is not None:  # a finite pool of responses drawn from π_ref
            self._fixed.update(
                reg_lengths=torch.ones(len(self._pool), dtype=torch.long), reg_ref_logps=problem.ref_logp[self._pool]
            )
        elif self._reg:  # reg_ref_logps = E_{π_ref} log π_ref, so mpo/kl_fwd_est is KL(π_ref‖π) exactly
            self._fixed.update(
                reg_lengths=torch.ones(1, dtype=torch.long),
                reg_ref_logps=(problem.ref_logp.exp() * problem.ref_logp).sum().reshape(1),
            )

    def inputs(self, logp: Tensor) -> dict[str, Tensor]:
        lead = logp.shape[:-1]
        out = {k: v.expand(*lead, *v.shape) if lead else v for k, v in self._fixed.items()}
        out["policy_chosen_logps"] = logp[..., self.chosen]
        out["policy_rejected_logps"] = logp[..., self.rejected]
        if self._reg and self._pool is not None:  # the pool's samples: NLL = cross-entropy to its empirical law
            out["reg_logps"] = logp[..., self._pool]
        elif self._reg:  # one "sample" holding the exact expectation under π_ref: NLL = H(π_ref, π)
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


def vertex_minimum(pop: Population, *, chunk: int = 50000) -> Fit:
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
