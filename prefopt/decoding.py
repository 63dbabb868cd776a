"""A lean decoding step for the Llama family (Llama, Mistral, Qwen2, Qwen3): one new token per row through the
model's own modules, without the transformers forward's per-call machinery.

``model(...)`` per decoded token spends much of a small model's time outside its matrix products: the attention
mask rebuilt from the 2-D mask at every step, the cache object's bookkeeping, SDPA's CPU kernel on a one-token query
(and a copy of the non-contiguous cache view it is given), output dataclasses. :class:`LeanDecoder` keeps what the
step needs between tokens instead: the KV cache in contiguous buffers of the final length (the prompt's cache
repeated k times into them), an additive attention mask kept up to date one column per token, and — where the
projections are plain ``nn.Linear`` without hooks — q/k/v and gate/up fused into one matrix product each (weights
concatenated once per generation, so they are the current policy's), packed for MKL's GEMM on CPU (the same products,
faster at a decoding batch's few rows). LoRA layers, the embedding, the rotary embedding and any module with hooks
are called as the model's forward calls them; the fp32 RMSNorms of these families are torch's ``rms_norm`` (the same
function). The logits match the forward's up to float rounding (tested against it, teacher-forced, within 1e-4 in
fp32, for every family here, with LoRA, with rows leaving the batch).

:func:`lean_decoder` says whether a model is one this reproduces; anything else (other architectures, sliding
windows shorter than the generation, sharded or partitioned parameters) decodes through ``model(...)``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeanDecoder", "lean_decoder"]

_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}
_LAYER = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj", "act_fn")


def lean_decoder(model, length: int) -> bool:
    """Whether :class:`LeanDecoder` reproduces ``model``'s forward for sequences of up to ``length`` positions:
    a Llama-family causal LM (possibly wrapped by peft) with the modules it calls, full attention over ``length``
    (no sliding window shorter than it), no sharded (FSDP/DTensor) or partitioned (DeepSpeed ZeRO-3) parameters."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in _FAMILIES or not hasattr(base, "lm_head"):
        return False
    body = getattr(base, "model", None)
    if body is None or not all(hasattr(body, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    for layer in body.layers:
        if not all(hasattr(layer, name) for name in _LAYER):
            return False
        if not all(hasattr(layer.self_attn, n) for n in _ATTENTION) or not all(hasattr(layer.mlp, n) for n in _MLP):
            return False
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ["full_attention"]
    windowed = config.model_type == "mistral" or "sliding_attention" in types
    if windowed and window is not None and window < length:
        return False
    if any(getattr(config, key, None) not in (None, 1.0) for key in ("final_logit_softcapping", "logit_scale")):
        return False
    for p in base.parameters():
        if hasattr(p, "ds_id") or type(p.data).__name__ == "DTensor" or p.device.type == "meta":
            return False
    return True


class _Projection:
    """One or more linear maps of the same input, applied as one: the modules themselves where any is not a plain
    ``nn.Linear`` (LoRA layers, quantized layers), else one matrix product with their weights concatenated (the
    current weights: built per generation). On CPU, with MKL, the weight is also packed for ``rows``-row inputs
    (MKL's packed GEMM, the same products faster at a decoding batch's few rows)."""

    def __init__(self, modules, rows: int):
        self.modules = modules
        self.sizes = [m.out_features for m in modules] if all(hasattr(m, "out_features") for m in modules) else None
        plain = all(type(m) is nn.Linear and not _hooked(m) for m in modules)
        plain = plain and len({m.bias is None for m in modules}) == 1
        self.weight = self.bias = self.packed = None
        if not plain:
            return
        self.weight = torch.cat([m.weight for m in modules]) if len(modules) > 1 else modules[0].weight
        self.bias = None if modules[0].bias is None else torch.cat([m.bias for m in modules])
        self.rows = rows
        self.packed = _pack(self.weight, rows)

    def __call__(self, x: torch.Tensor):
        """The maps' outputs: one tensor for one module, else a tuple (one per module)."""
        if self.weight is None:
            outs = tuple(m(x) for m in self.modules)
        else:
            if self.packed is not None and x.shape[0] == self.rows:
                out = torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows)
            else:
                out = torch.nn.functional.linear(x, self.weight, self.bias)
            outs = out.split(self.sizes, dim=-1) if len(self.modules) > 1 else (out,)
        return outs if len(outs) > 1 else outs[0]

    def repack(self, rows: int) -> None:
        """Pack for ``rows``-row inputs (after rows leave the batch)."""
        if self.packed is not None:
            self.rows, self.packed = rows, _pack(self.weight, rows)


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks (its own or global ones) that a direct matrix product would skip."""
    from torch.nn.modules import module as module_globals

    own = module._forward_hooks or module._forward_pre_hooks
    return bool(own or module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkl.is_available():
        return None
    try:
        return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
    except (RuntimeError, AttributeError):  # a build without MKL's packed GEMM
        return None


class LeanDecoder:
    """Decodes one token per row for a model :func:`lean_decoder` accepts, with the KV cache in buffers of
    ``length`` positions. Built from the prompt forward's cache (a transformers ``DynamicCache``, one row per
    distinct prompt, left-padded by ``prompt_mask``), repeated ``k`` times prompt-major; :meth:`step` appends each
    row's token at the next buffer position and returns the next-token logits; :meth:`select` keeps some rows.

    Layout: keys and values as [rows·kv_heads, length, head_dim], the additive mask as [rows·kv_heads, 1, length]
    (0 where a position is attended, the dtype's minimum elsewhere), so one ``baddbmm`` gives the scaled, masked
    scores of every head."""

    def __init__(self, model, cache, k: int, length: int, prompt_mask: torch.Tensor):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        self.base, self.body = base, base.model
        self.qwen3 = config.model_type == "qwen3"
        self.layers = list(self.body.layers)
        attention = self.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.groups = self.heads // self.kv_heads
        self.scaling = attention.scaling
        rows = prompt_mask.shape[0] * k
        self.projections = [  # per layer: q/k/v, o, gate/up, down
            (
                _Projection([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], rows),
                _Projection([layer.self_attn.o_proj], rows),
                _Projection([layer.mlp.gate_proj, layer.mlp.up_proj], rows),
                _Projection([layer.mlp.down_proj], rows),
            )
            for layer in self.layers
        ]
        self.head = _Projection([base.lm_head], rows)
        self.keys, self.values = [], []
        for index in range(len(self.layers)):
            keys, values = cache.layers[index].keys, cache.layers[index].values  # [P, kv_heads, filled, D]
            _, _, filled, dim = keys.shape
            key_buffer = keys.new_zeros((rows, self.kv_heads, length, dim))
            value_buffer = values.new_zeros((rows, self.kv_heads, length, dim))
            key_buffer[:, :, :filled] = keys.repeat_interleave(k, dim=0)
            value_buffer[:, :, :filled] = values.repeat_interleave(k, dim=0)
            self.keys.append(key_buffer.view(rows * self.kv_heads, length, dim))
            self.values.append(value_buffer.view(rows * self.kv_heads, length, dim))
        self.filled, self.rows = filled, rows
        dtype = self.keys[0].dtype
        bias = torch.full((rows, self.kv_heads, 1, length), torch.finfo(dtype).min, dtype=dtype, device=keys.device)
        bias[..., :filled].masked_fill_(prompt_mask.repeat_interleave(k, dim=0)[:, None, None, :].bool(), 0.0)
        self.bias = bias.view(rows * self.kv_heads, 1, length)
        self.norm_eps = [
            (_rms_eps(layer.input_layernorm, dtype), _rms_eps(layer.post_attention_layernorm, dtype))
            for layer in self.layers
        ]
        self.final_eps = _rms_eps(self.body.norm, dtype)

    def select(self, keep: torch.Tensor) -> None:
        """Keep the rows ``keep`` (indices into the current rows)."""
        heads = (keep[:, None] * self.kv_heads + torch.arange(self.kv_heads, device=keep.device)).reshape(-1)
        self.keys = [b[heads] for b in self.keys]
        self.values = [b[heads] for b in self.values]
        self.bias = self.bias[heads]
        self.rows = len(keep)
        for projection in [self.head, *(p for layer in self.projections for p in layer)]:
            projection.repack(self.rows)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] (model dtype) of the next token after ``tokens`` [B] at rotary ``positions`` [B, 1]."""
        slot, n = self.filled, self.filled + 1
        self.filled = n
        self.bias[:, :, slot] = 0.0
        bias = self.bias[:, :, :n]
        rows, dim, heads, kv = tokens.shape[0], self.head_dim, self.heads, self.kv_heads
        x = self.body.embed_tokens(tokens)  # [B, E]
        cos, sin = self.body.rotary_emb(x, positions)  # [B, 1, D]
        for index, layer in enumerate(self.layers):
            a, m = layer.self_attn, layer.mlp
            qkv, o_proj, gate_up, down = self.projections[index]
            eps_in, eps_post = self.norm_eps[index]
            q, k, v = qkv(_norm(layer.input_layernorm, x, eps_in))
            q, k, v = q.view(rows, heads, dim), k.view(rows, kv, dim), v.view(rows, kv, dim)
            if self.qwen3:
                q, k = a.q_norm(q), a.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = self.keys[index], self.values[index]
            keys[:, slot] = k.reshape(rows * kv, dim)
            values[:, slot] = v.reshape(rows * kv, dim)
            scores = torch.baddbmm(
                bias, q.reshape(rows * kv, self.groups, dim), keys[:, :n].transpose(1, 2), alpha=self.scaling
            )
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            x = x + o_proj(torch.bmm(weights, values[:, :n]).view(rows, heads * dim))
            gate, up = gate_up(_norm(layer.post_attention_layernorm, x, eps_post))
            x = x + down(m.act_fn(gate) * up)
        return self.head(_norm(self.body.norm, x, self.final_eps))


# transformers' RMSNorm of these families: weight * (x·rsqrt(mean(x²) + eps)) computed in fp32; in fp32 it equals
# torch's fused rms_norm (one kernel instead of six)
_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}


def _rms_eps(norm, dtype) -> float | None:
    """The epsilon to call torch's rms_norm with for ``norm``, or None to call the module itself."""
    if type(norm).__name__ not in _RMS_NORMS or _hooked(norm):
        return None
    if dtype != torch.float32 or norm.weight.dtype != torch.float32:
        return None
    return norm.variance_epsilon


def _norm(norm, x: torch.Tensor, eps: float | None) -> torch.Tensor:
    if eps is None:
        return norm(x)
    return torch.nn.functional.rms_norm(x, norm.weight.shape, norm.weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
