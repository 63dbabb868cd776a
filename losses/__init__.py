"""prefopt's loss zoo: every preference-optimization method as a pure function of log-probs, in one registry.

    import losses
    losses.available()                    # sorted registered names
    fn = losses.get("dpo", beta=0.1)      # validated hyper-parameters; fn.requirements says what the batch needs
    out = fn(policy_chosen_logps=..., policy_rejected_logps=..., ref_chosen_logps=..., ref_rejected_logps=...)
    out.loss, out.per_example, out.metrics

Group losses (kind "group", K sampled completions per prompt: ``rloo``) take ``policy_logps, ref_logps, rewards,
lengths`` (``GROUP_INPUTS``), each ``[G, K]``, instead of the pairwise inputs.

Token losses (kind "token", the GRPO family: ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``,
``gspo``) take per-token ``policy_token_logps, old_token_logps, ref_token_logps, completion_mask`` ``[N, T]`` and
``advantages`` ``[N]`` or ``[N, T]`` (``TOKEN_INPUTS``); ``group_advantages`` computes GRPO's advantages from rewards.

Unpaired losses (kind "unpaired", KTO's family: ``kto``, ``apo_zero_unpaired``) take N single completions labelled
desirable or undesirable: ``policy_logps, ref_logps, labels`` ``[N]`` and, for KTO's KL reference point, the log-probs
of M mismatched (prompt, completion) pairs ``policy_kl_logps, ref_kl_logps`` ``[M]`` (``UNPAIRED_INPUTS``).

Reward losses (kind "reward": ``bradley_terry``) train a reward model on pairs: ``chosen_scores, rejected_scores``
``[B]``, a sequence classifier's scores, and optional per-pair ``margins`` (``REWARD_INPUTS``).

Pairwise losses also take the DPO modifiers of ``losses.modifiers``, each where it fits (TRL 1.16's names): WPO's
``use_weighting``, LD-DPO's ``ld_alpha`` and f-DPO's ``f_divergence_type`` / ``f_alpha_divergence_coef``
(``losses.get("dpo", ld_alpha=0.5)``); active, they add the inputs they need to the loss's requirements.

Depends on torch only. Third-party packages register more losses through the ``prefopt.losses`` entry-point group.
"""

from losses import alarm, modifiers
from losses._common import (
    HyperParameterError,
    LossError,
    LossOutput,
    MissingInputError,
    NonFiniteError,
    UnknownLossError,
)
from losses.alarm import AlarmReward, alarm_reward, disagreement_rates, select_aspects, shaped_aspects
from losses.aot import aot_loss, aot_unpaired_loss
from losses.combo import combo_loss
from losses.dpo import cdpo_loss, discopop_loss, dpo_loss, hinge_loss, robust_loss, sigmoid_norm_loss
from losses.grpo import (
    bnpo_loss,
    cispo_loss,
    dapo_loss,
    dr_grpo_loss,
    group_advantages,
    grpo_loss,
    gspo_loss,
    sapo_loss,
)
from losses.ipo import ipo_loss, sppo_hard_loss
from losses.kto import apo_zero_unpaired_loss, kl_reference_point, kto_loss
from losses.mpo import mpo_loss
from losses.pairwise import apo_down_loss, apo_zero_loss, bco_pair_loss, exo_pair_loss, nca_pair_loss
from losses.policy_gradient import rloo_loss
from losses.ppo import gae, masked_whiten, ppo_loss
from losses.reference_free import cpo_loss, orpo_loss, sft_loss, simpo_loss
from losses.registry import (
    GROUP_INPUTS,
    REWARD_INPUTS,
    TOKEN_INPUTS,
    UNPAIRED_INPUTS,
    BoundLoss,
    LossSpec,
    Requirements,
    available,
    get,
    register,
    set_finite_checks,
    spec,
)
from losses.reinforce import reinforce_pp_advantages, reinforce_pp_loss
from losses.reward_model import bradley_terry_loss
from losses.upo import upo_loss

__all__ = [
    "available",
    "get",
    "spec",
    "register",
    "set_finite_checks",
    "BoundLoss",
    "LossSpec",
    "Requirements",
    "LossOutput",
    "LossError",
    "UnknownLossError",
    "HyperParameterError",
    "MissingInputError",
    "NonFiniteError",
    "dpo_loss",
    "cdpo_loss",
    "robust_loss",
    "hinge_loss",
    "sigmoid_norm_loss",
    "discopop_loss",
    "ipo_loss",
    "sppo_hard_loss",
    "exo_pair_loss",
    "nca_pair_loss",
    "bco_pair_loss",
    "apo_zero_loss",
    "apo_down_loss",
    "aot_loss",
    "aot_unpaired_loss",
    "simpo_loss",
    "cpo_loss",
    "orpo_loss",
    "sft_loss",
    "mpo_loss",
    "upo_loss",
    "combo_loss",
    "rloo_loss",
    "reinforce_pp_loss",
    "ppo_loss",
    "gae",
    "masked_whiten",
    "reinforce_pp_advantages",
    "GROUP_INPUTS",
    "grpo_loss",
    "bnpo_loss",
    "dr_grpo_loss",
    "dapo_loss",
    "cispo_loss",
    "sapo_loss",
    "gspo_loss",
    "group_advantages",
    "TOKEN_INPUTS",
    "kto_loss",
    "apo_zero_unpaired_loss",
    "kl_reference_point",
    "UNPAIRED_INPUTS",
    "bradley_terry_loss",
    "REWARD_INPUTS",
    "alarm",
    "modifiers",
    "AlarmReward",
    "alarm_reward",
    "shaped_aspects",
    "disagreement_rates",
    "select_aspects",
]
