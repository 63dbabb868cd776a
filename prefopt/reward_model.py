"""Reward-model training (``trainer=reward``: a loss of kind ``"reward"``, e.g. ``bradley_terry``).

The run is the generic one (:func:`prefopt.build.build`, :func:`prefopt.trainer.loop`: accumulation, several
processes, checkpoints and resume, non-finite guards, metrics); two pieces differ, both chosen by the loss's kind:

* **the model**: :func:`classifier_from` turns the run's starting causal LM (built and, with ``model.sft.steps > 0``,
  warm-started by SFT as for every run, so the reward model starts from the SFT policy's decoder, as InstructGPT's
  does) into an ``AutoModelForSequenceClassification`` with one label, built from the same config (pad token id
  set), its decoder weights copied and a fresh score head (seeded by ``model.init_seed``). ``final/`` is then a plain
  sequence classifier with its tokenizer, which ``reward=classifier reward.model=RUN/final`` loads directly;
* **the layout**: :class:`RewardLayout` forwards chosen then rejected sequences through the classifier (one padded
  forward) and names the scores ``chosen_scores`` / ``rejected_scores`` (and ``margins`` when every pair of the data
  has a ``margin``). A completion is scored without the EOS token the data appends: the score is read at its last
  text token, which is where the ``classifier`` reward reads it (it classifies ``tokenizer(prompt + completion)``,
  without special tokens at the end), so training and scoring see the same ids.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from prefopt.cache import cache_key
from prefopt.config import ConfigError

__all__ = ["RewardLayout", "classifier_from", "check_reward_run"]

log = logging.getLogger("prefopt")


class RewardLayout:
    """Pairs ``{prompt_ids, chosen_ids, rejected_ids[, margin]}``: chosen rows, then rejected rows, each scored by the
    sequence classifier (one logit). ``eos_id``: the token stripped from the end of each completion (set by the
    build from the tokenizer)."""

    kind = "reward"
    names = ("chosen_scores", "rejected_scores", "margins")

    def __init__(self, eos_id: int | None = None):
        self.eos_id = eos_id

    def _completion(self, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        return ids[:-1] if ids and self.eos_id is not None and ids[-1] == self.eos_id else ids

    def rows(self, items: Sequence[dict]) -> list[dict]:
        return [
            {"prompt_ids": p["prompt_ids"], "completion_ids": self._completion(p[f"{side}_ids"])}
            for side in ("chosen", "rejected")
            for p in items
        ]

    def named(self, values: Tensor, names: Sequence[str], n_items: int) -> dict[str, Tensor]:
        return {names[0]: values[:n_items], names[1]: values[n_items : 2 * n_items]}

    @staticmethod
    def scores(policy, batch) -> Tensor:
        """The classifier's logit of each row ``[N]``, fp32 (right padding: the model pools the last non-pad token)."""
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        return logits[:, 0].float()

    def inputs(self, items: Sequence[dict], scores: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        out = self.named(scores, self.names[:2], len(items))
        if items and all(item.get("margin") is not None for item in items):
            out["margins"] = torch.tensor([float(item["margin"]) for item in items], device=scores.device)
        return out


def check_reward_run(loss_name: str, trainer) -> None:
    """One line for a reward-model run asked to sample (``trainer=online``, ``trainer.sample_eval``): a sequence
    classifier generates nothing. ``trainer``: the run's ``TrainerSettings``."""
    if trainer.source == "online" or trainer.sample_eval:
        what = "trainer=online" if trainer.source == "online" else "trainer.sample_eval=true"
        raise ConfigError(
            f"loss '{loss_name}' trains a reward model (a sequence classifier) on preference pairs, which samples "
            f"nothing: drop {what} (trainer=reward)"
        )


def classifier_from(causal_lm, model_cfg: Mapping[str, Any], fingerprint: str, adapters=None):
    """A one-label ``AutoModelForSequenceClassification`` from ``causal_lm``'s config, its decoder weights copied and
    its score head initialised under ``model.init_seed`` (the caller's RNG stream untouched), on the causal LM's
    device and dtype; returns ``(classifier, fingerprint)``. ``adapters``: the run's ``AdapterSettings`` (reward
    models train in full: an adapter or a quantized model is refused in one line)."""
    from transformers import AutoModelForSequenceClassification

    if adapters is not None and (adapters.kind != "none" or adapters.quantization):
        raise ConfigError(
            "a reward model trains in full: model.lora, model.adapter and model.quantization are not supported "
            "with trainer=reward"
        )

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
    config.architectures = None
    parameter = next(causal_lm.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(model_cfg.get("init_seed", 0)))
        try:
            classifier = AutoModelForSequenceClassification.from_config(config)
        except ValueError as error:  # an architecture transformers has no classification head for
            name = model_cfg.get("name")
            raise ConfigError(f"model {name!r} has no sequence-classification head ({error})") from None
    classifier.base_model.load_state_dict(causal_lm.base_model.state_dict())
    classifier = classifier.to(device=parameter.device, dtype=parameter.dtype)
    if classifier.config.pad_token_id is None:
        classifier.config.pad_token_id = causal_lm.config.pad_token_id
    log.info("reward model: %s (1 label) from the starting policy's decoder", type(classifier).__name__)
    return classifier, cache_key("reward-model", fingerprint)
