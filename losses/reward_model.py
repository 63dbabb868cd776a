"""Reward-model training: the Bradley–Terry pairwise loss on a sequence classifier's scores (kind ``"reward"``).

A reward model gives one scalar ``r(x, y)`` per (prompt, completion) — here the single logit of an
``AutoModelForSequenceClassification`` — and is fit to preference pairs by maximum likelihood under the Bradley–Terry
model ``P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l))`` (Bradley & Terry 1952, *Rank analysis of incomplete block
designs I: the method of paired comparisons*, Biometrika 39; as a language-model reward model: Ouyang et al. 2022,
arXiv 2203.02155, InstructGPT, eq. 1). Inputs (``losses.registry.REWARD_INPUTS``), each ``[B]``:

* ``chosen_scores`` ``r_w = r(x, y_w)`` and ``rejected_scores`` ``r_l = r(x, y_l)`` (with grad);
* ``margins`` ``m`` (optional): a per-pair margin from the data (Llama 2's graded preferences; TRL's ``margin``
  column): the pair is fit as ``σ(r_w − r_l − m)``, so it is only satisfied once the gap exceeds ``m``.

Per pair, with ``c`` = ``center_rewards_coefficient`` (``None`` = off, TRL's default):

    ``ℓ = −log σ(r_w − r_l − m) + c·(r_w + r_l)²``

``L`` = the mean over the pairs. The second term is the auxiliary centering loss of Eisenstein et al. 2023
(arXiv 2312.09244, *Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking*), which
TRL cites for ``center_rewards_coefficient``: Bradley–Terry fixes only differences of scores, and the term pulls each
pair's mean score to 0 so scores of different models (or runs) share a zero. TRL adds ``c·mean((r_w + r_l)²)`` to the
mean logistic loss, which is the mean of ``ℓ`` above: equal to TRL 1.16 ``RewardTrainer.compute_loss`` on the same
scores (tests/losses/test_reward_model.py runs TRL's own code).

Metrics: TRL ``RewardTrainer``'s ``accuracy`` (the strict ``r_w > r_l`` rate), ``margin`` (mean ``r_w − r_l``) and
``mean_reward`` (mean over both sides), and prefopt's pair names ``rewards/chosen``, ``rewards/rejected`` (mean scores),
``rewards/margins`` and ``rewards/accuracies`` (the same numbers as ``margin`` and ``accuracy``, under the names the
rest of the zoo logs). TRL's ``min_reward`` / ``max_reward`` are not returned: averaged over micro-batches they would
no longer be a minimum or a maximum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from losses._common import LossError, LossOutput
from losses.registry import non_negative, optional, register

__all__ = ["bradley_terry_loss"]


def _check_shapes(chosen_scores: Tensor, rejected_scores: Tensor, margins: Tensor | None) -> None:
    """Every input ``[B]`` with the same B (a ``[B, 1]`` logit passed as is would broadcast to ``[B, B]``)."""
    expected = chosen_scores.shape
    if chosen_scores.dim() != 1:
        raise LossError(f"loss 'bradley_terry': 'chosen_scores' must be 1-D [B], got shape {tuple(expected)}")
    for key, tensor in (("rejected_scores", rejected_scores), ("margins", margins)):
        if tensor is not None and tensor.shape != expected:
            raise LossError(
                f"loss 'bradley_terry': '{key}' has shape {tuple(tensor.shape)}, expected {tuple(expected)}"
            )


@register(
    "bradley_terry",
    kind="reward",
    paper="Bradley & Terry 1952; reward models: Ouyang et al. 2022, arXiv 2203.02155; centering: arXiv 2312.09244",
    summary="−log σ(r_w − r_l − m) + c·(r_w + r_l)², r = the reward model's score (TRL RewardTrainer)",
    aggregation="one score per sequence: a sequence classifier's logit, not log-probs",
    checks={"center_rewards_coefficient": optional(non_negative)},
    optimum="r_w − r_l = logit P(y_w ≻ y_l): the Bradley–Terry scores of the data, up to a constant (c = 0)",
)
def bradley_terry_loss(
    chosen_scores: Tensor,  # [B] r(x, y_w), with grad
    rejected_scores: Tensor,  # [B] r(x, y_l), with grad
    margins: Tensor | None = None,  # [B] per-pair margin m from the data (absent: 0)
    *,
    center_rewards_coefficient: float | None = None,  # c; None = no centering term (TRL's default)
) -> LossOutput:
    """``−log σ(r_w − r_l − m) + c·(r_w + r_l)²`` per pair, averaged (see the module docstring)."""
    _check_shapes(chosen_scores, rejected_scores, margins)
    gaps = chosen_scores - rejected_scores
    logits = gaps if margins is None else gaps - margins.to(gaps.dtype)
    per_example = -F.logsigmoid(logits)
    if center_rewards_coefficient is not None:
        per_example = per_example + center_rewards_coefficient * (chosen_scores + rejected_scores) ** 2
    return LossOutput(per_example.mean(), per_example, _metrics(chosen_scores, rejected_scores))


@torch.no_grad()
def _metrics(chosen_scores: Tensor, rejected_scores: Tensor) -> dict[str, Tensor]:
    chosen, rejected = chosen_scores.detach(), rejected_scores.detach()
    accuracy = (chosen > rejected).to(chosen.dtype).mean()
    margin = (chosen - rejected).mean()
    return {
        "accuracy": accuracy,
        "margin": margin,
        "mean_reward": torch.cat([chosen, rejected]).mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": margin.clone(),
        "rewards/accuracies": accuracy.clone(),
    }
