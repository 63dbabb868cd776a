"""The squared-error family: IPO regresses the margin onto a fixed target, SPPO each log-ratio onto ±1/(2β)."""

from __future__ import annotations

from torch import Tensor

from losses._common import LossOutput, reference_output, require_lengths, token_mean
from losses.registry import lengths_if, positive, register

__all__ = ["ipo_loss", "sppo_hard_loss"]


@register(
    "ipo",
    margin_only=True,
    optimum="closed form π_ref·exp(P(y≻μ)/β) (Azar et al. §5)",
    paper="Azar et al. 2023, arXiv 2310.12036 (IPO / ΨPO), Eq. 17",
    summary="(h − 1/(2β))², h = Δ on token-averaged (default) or summed log-probs",
    aggregation="mean (length_normalize=true, TRL) / sum (false, literal paper)",
    checks={"beta": positive},
    requires=lengths_if("length_normalize"),
)
def ipo_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    chosen_lengths: Tensor | None = None,  # [B] needed when length_normalize
    rejected_lengths: Tensor | None = None,  # [B]
    *,
    beta: float = 0.1,
    length_normalize: bool = True,
) -> LossOutput:
    """IPO: ``L = (h − 1/(2β))²`` with β in the role of the paper's τ (target margin 1/(2β) = 5 nats at β = 0.1).

    A General Theoretical Paradigm to Understand Learning from Human Preferences, Azar et al. 2023
    (arXiv 2310.12036), Eq. 17.

    * ``length_normalize=True`` (default, TRL ≥ 0.7.11 parity): ``h = ρ_w/|y_w| − ρ_l/|y_l|``, log-ratios
      **averaged** per token (lengths clamped ≥ 1). TRL's source says the IPO authors confirmed this form.
    * ``length_normalize=False`` (literal paper, TRL ≤ 0.7.10): ``h = Δ`` on **summed** log-probs.

    At h = 0 the loss is ``1/(4β²)`` (25 at β = 0.1) either way. Rewards are logged as β × summed log-ratios
    (TRL 1.16), whichever form the loss uses.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    if length_normalize:
        require_lengths(
            "ipo", "length_normalize=true", chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths
        )
        chosen, rejected = token_mean(chosen, chosen_lengths), token_mean(rejected, rejected_lengths)
    out = reference_output((chosen - rejected - 1 / (2 * beta)) ** 2, beta, logps)
    out.metrics["ipo/length_normalized"] = out.loss.new_tensor(float(length_normalize))
    return out


@register(
    "sppo_hard",
    optimum="regresses each ρ to ±1/(2β): IPO's shape, but each ratio absolutely, so π must renormalise",
    paper="Wu et al. 2024, arXiv 2405.00675 (SPPO), Eq. 4.7 with P ∈ {1, 0}",
    summary="(ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²",
    checks={"beta": positive},
)
def sppo_hard_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
) -> LossOutput:
    """SPPO (hard labels): ``L = (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²`` on summed log-probs (β = 1/η).

    Self-Play Preference Optimization, Wu et al. 2024 (arXiv 2405.00675), Eq. 4.7 with the win probability set
    to 1 for the chosen and 0 for the rejected response. TRL ``sppo_hard``.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    per_example = (chosen - 1 / (2 * beta)) ** 2 + (rejected + 1 / (2 * beta)) ** 2
    return reference_output(per_example, beta, logps)
