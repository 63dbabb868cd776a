"""What PPO needs from the trainer: a value estimate per token (a value head on the policy's last hidden state,
trained with the policy) and an adaptive KL coefficient.

Provider ``values`` (for losses that declare ``values``, e.g. ``ppo``): at build it attaches a linear head
``prefopt_value_head`` (hidden size -> 1, zero-initialised: V = 0 at step 0) to the policy, before the optimizer and
accelerate see the model, so the head is optimised, wrapped (DDP), checkpointed and resumed with the policy. Each
micro-batch it runs the policy's decoder on the layout's rows and reads ``V(s_t) = head(h_{t−1})`` at every
completion token — the hidden state whose LM head gives that token's log-prob — left-aligned ``[N, T]`` like the
token log-probs. The decoder is shared (the value loss reaches the policy's weights, scaled by ``vf_coef``), as in the
value-head models of TRL's first PPO and of the ALaRM authors' trainer.

When a draw of samples serves several optimizer steps (``num_iterations`` or ``steps_per_generation`` > 1), the
values of every sample at sampling time are computed once per draw and reach the loss as ``old_values`` (the centre of
its value clipping and the baseline of its GAE), held with the draw (and its checkpoint); with one step per draw they
equal the current values, which the loss then uses.

Cost and limits: the values come from a second decoder forward per micro-batch (the policy's log-probs forward keeps
its length buckets and chunked head). ``final/`` keeps the head's weights beside the model's
(``prefopt_value_head.*``; transformers skips them on load).

Provider ``kl_coef`` (for losses that take ``kl_coef`` and set ``kl_target``): the adaptive KL controller of Ziegler
et al. 2019 (their §2.2, TRL's ``AdaptiveKLController``): the coefficient starts at the loss's ``beta``; after every
optimizer step, with KL the step's sampled sequence KL to the reference (``online/kl``, the mean over every process's
samples) and n the step's sampled completions, ``β ← β · (1 + clip(KL/kl_target − 1, −0.2, 0.2) · n/kl_horizon)``.
Its value is checkpointed (a resumed run continues with it) and logged as ``ppo/kl_coef``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefopt.batching import collate
from prefopt.providers import MicroBatch, Own, Provider, ProviderContext, register_provider

__all__ = ["ValueHead", "values_of", "AdaptiveKL"]

HEAD = "prefopt_value_head"


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer under a causal LM (and under a peft wrapper): its output has ``last_hidden_state``."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, model.base_model_prefix)


def _owner(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the head: the causal LM itself (under a peft wrapper, its base model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def values_of(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
    """``[N, L]`` values of every completion token, left-aligned (L = the longest completion), fp32, with grad."""
    head = getattr(_owner(model), HEAD)
    hidden = _decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    target = completion_mask[:, 1:].bool()  # position t − 1 predicts completion token t
    values = head(hidden[:, :-1][target].to(head.weight.dtype)).squeeze(-1).float()
    places = (target.long().cumsum(dim=1) - 1)[target]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(target)[target]
    width = int(target.sum(dim=1).max()) if target.any() else 0
    out = torch.zeros((input_ids.shape[0], width), dtype=values.dtype, device=values.device)
    return out.index_put((rows, places), values)


class ValueHead(Provider):
    """Supplies ``values`` (see the module docstring)."""

    names = ("values",)

    def __init__(self, policy: torch.nn.Module, pad_id: int, eos_id: int, old_values: bool = False, batch: int = 64):
        self.policy, self.pad_id, self.eos_id, self.batch = policy, pad_id, eos_id, batch
        if old_values:
            self.on_sample = self.remember
        owner = _owner(policy)
        if not hasattr(owner, HEAD):
            hidden = owner.config.hidden_size
            head = torch.nn.Linear(hidden, 1)
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
            dtype = next(p.dtype for p in owner.parameters() if p.dtype.is_floating_point)
            owner.add_module(HEAD, head.to(device=next(owner.parameters()).device, dtype=dtype))

    def inputs(self, micro: MicroBatch, own: Own) -> dict[str, Tensor]:
        batch = collate(micro.rows, self.pad_id).to(micro.device)
        values = values_of(self.policy, batch.input_ids, batch.attention_mask, batch.completion_mask)
        return micro.layout.named(values, self.names, len(micro.items))

    @torch.no_grad()
    def remember(self, sampled: dict) -> None:
        """On each draw: every sample's values under the sampling policy, as ``sampled["old_values"]`` (one list per
        sample; the batch source hands them to the groups as ``old_values``)."""
        rows = [
            {"prompt_ids": p, "completion_ids": c or [self.eos_id]}
            for p, c in zip(sampled["prompt_ids"], sampled["completions"], strict=True)
        ]
        device = next(self.policy.parameters()).device
        was_training = self.policy.training
        self.policy.eval()
        out: list[list[float]] = []
        for start in range(0, len(rows), self.batch):
            batch = collate(rows[start : start + self.batch], self.pad_id).to(device)
            values = values_of(self.policy, batch.input_ids, batch.attention_mask, batch.completion_mask)
            lengths = batch.completion_mask[:, 1:].sum(dim=1).tolist()
            out += [values[i, : int(n)].tolist() for i, n in enumerate(lengths)]
        self.policy.train(was_training)
        sampled["old_values"] = out


@register_provider("values", ("values",))
def _values(ctx: ProviderContext) -> Provider:
    online = ctx.settings.trainer.online
    held = ctx.settings.trainer.source == "online" and online.num_iterations * online.steps_per_generation > 1
    tokenizer = ctx.tokenizer
    return ValueHead(ctx.policy, tokenizer.pad_token_id, tokenizer.eos_token_id, held, online.generation_batch_size)


class AdaptiveKL(Provider):
    """Supplies ``kl_coef`` (see the module docstring)."""

    names = ("kl_coef",)

    def __init__(self, start: float, target: float, horizon: int, samples_per_step: int):
        self.value, self.target, self.horizon, self.samples = (
            float(start),
            float(target),
            int(horizon),
            samples_per_step,
        )

    def inputs(self, micro: MicroBatch, own: Own) -> dict[str, Tensor]:
        return {"kl_coef": torch.tensor(self.value, dtype=torch.float32, device=micro.device)}

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        kl = metrics.get("online/kl")
        if kl is None:  # no sampled KL this step (e.g. nothing sampled): the coefficient stays
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * self.samples / self.horizon

    def state(self) -> dict[str, float]:
        return {"kl_coef": self.value}

    def load_state(self, state: dict[str, float]) -> None:
        self.value = float(state["kl_coef"])


def _adaptive(ctx: ProviderContext) -> bool:
    return ctx.loss.hparams.get("kl_target") is not None


@register_provider("kl_coef", ("kl_coef",), when_optional=_adaptive)
def _kl_coef(ctx: ProviderContext) -> Provider:
    hparams, tcfg = ctx.loss.hparams, ctx.settings.trainer
    samples = tcfg.batch_size * tcfg.online.samples_per_prompt
    return AdaptiveKL(hparams["beta"], hparams["kl_target"], hparams["kl_horizon"], samples)
