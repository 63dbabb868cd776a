"""``classifier``: a sequence-classification model's logit for one label (e.g. a reward model). Higher = more of
that label, by the model's judgement."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from prefopt.config import ConfigError
from prefopt.rewards.base import Reward, register_reward


@register_reward("classifier")
class ClassifierReward(Reward):
    """The logit of ``label`` of an ``AutoModelForSequenceClassification`` on ``template.format(prompt=...,
    completion=...)``. Higher = more of that label (for a reward model: better).

    - ``model``: a local checkpoint directory or hub id (loaded with ``trust_remote_code=False``), or an already
      loaded model object (then ``tokenizer`` is required).
    - ``tokenizer``: a directory / hub id or a tokenizer object; default: ``model``. Without a pad token it pads
      with EOS (set on the tokenizer; the model's ``config.pad_token_id`` follows when unset).
    - ``label``: an int index or a label name of ``config.label2id``; default: the single logit when
      ``num_labels == 1``, else the last label (e.g. "positive" of a negative/positive classifier).
    - ``batch_size``: texts per forward. ``max_length``: truncate to this many tokens (the tokenizer's
      ``truncation_side`` decides which end; None: no truncation).
    - ``template``: how a pair becomes the classified text; default ``"{prompt}{completion}"`` (plain
      concatenation, no separator; use ``"{completion}"`` to ignore the prompt). ``str.format`` syntax: literal
      braces must be doubled.
    - ``dtype``: "float32" / "bfloat16" / "float16" (default: as loaded); scores are returned as float32.
    - ``local_files_only``: default True (no download); ``device``: default "cpu" for a path, the model's device
      for a model object; ``.to(device)`` moves the model.

    Batches are padded on the right whatever the tokenizer's ``padding_side`` (pooling models find the last
    non-pad token; right padding keeps every real token's position), and run under ``no_grad`` in eval mode.
    """

    def __init__(
        self,
        model: str | os.PathLike | Any,
        tokenizer: str | os.PathLike | Any | None = None,
        label: int | str | None = None,
        batch_size: int = 16,
        max_length: int | None = 512,
        template: str = "{prompt}{completion}",
        dtype: str | torch.dtype | None = None,
        local_files_only: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"classifier batch_size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"classifier max_length must be >= 1 or None, got {max_length}")
        try:
            template.format(prompt="", completion="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"classifier template {template!r} must use only {{prompt}} and {{completion}}") from e
        is_path = isinstance(model, (str, os.PathLike))
        if tokenizer is None:
            if not is_path:
                raise ValueError("classifier: pass `tokenizer` when `model` is a model object")
            tokenizer = model
        if is_path:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                os.fspath(model), local_files_only=local_files_only, trust_remote_code=False, output_loading_info=True
            )
            if info.get("missing_keys"):  # e.g. a causal LM, or an UltraRM-style `regression_head` instead of `score`
                unused = sorted(info.get("unexpected_keys") or [])
                raise ConfigError(
                    f"classifier: {os.fspath(model.name_or_path)} has no weights for "
                    f"{', '.join(sorted(info['missing_keys'])[:4])}: its classification head would be initialised at "
                    "random and score noise"
                    + (f"; the checkpoint's unused weights include {', '.join(unused[:4])}" if unused else "")
                    + " (save it as an AutoModelForSequenceClassification with its head named as transformers expects)"
                )
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(
                os.fspath(tokenizer), local_files_only=local_files_only, trust_remote_code=False
            )
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("classifier: the tokenizer has neither a pad nor an eos token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if dtype is not None:
            from prefopt.models import resolve_dtype

            model = model.to(dtype=resolve_dtype(dtype))
        if device is None:
            device = "cpu" if is_path else next(model.parameters()).device
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.label = self._label_index(label)
        self.batch_size = int(batch_size)
        self.max_length = max_length
        self.template = template
        params = inspect.signature(model.forward).parameters
        self._input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in params else [])

    def _label_index(self, label: int | str | None) -> int:
        """The logit index of ``label`` (see the class docstring)."""
        config = self.model.config
        num_labels = int(config.num_labels)
        if label is None:
            return 0 if num_labels == 1 else num_labels - 1
        if isinstance(label, str):
            label2id = {str(k): int(v) for k, v in (config.label2id or {}).items()}
            if label not in label2id:
                raise ValueError(f"classifier: unknown label {label!r}; labels: {sorted(label2id)}")
            return label2id[label]
        if isinstance(label, bool) or int(label) != label or not 0 <= label < num_labels:
            raise ValueError(f"classifier: label index {label!r} out of range for {num_labels} labels")
        return int(label)

    def texts(self, prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
        """The classified texts of the pairs."""
        return [self.template.format(prompt=p, completion=c) for p, c in zip(prompts, completions, strict=True)]

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        self.model.eval()
        texts = self.texts(prompts, completions)
        out = [torch.zeros(0)]
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                padding_side="right",
                truncation=self.max_length is not None,
                max_length=self.max_length,
                return_tensors="pt",
            )
            inputs = {k: enc[k].to(self.device) for k in self._input_names if k in enc}
            logits = self.model(**inputs).logits  # [B, num_labels]
            out.append(logits[:, self.label].float().cpu())
        return torch.cat(out)

    def to(self, device: torch.device | str) -> ClassifierReward:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def __repr__(self) -> str:
        return f"ClassifierReward(model={self.model.name_or_path!r}, label={self.label})"
