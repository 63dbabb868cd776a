"""The online sampler: the lean decoding step gives the model's own logits (teacher-forced against its full forward,
for every family it accepts, with grouped-query attention, left padding, LoRA, rows leaving the batch), the sampler's
per-token log-probs are the model's log-probs of the sampled tokens, greedy decoding equals ``model.generate``'s,
the draw is distributed as the softmax (a goodness-of-fit check) and a pure function of the seed."""

import math

import pytest
import torch
from transformers import DynamicCache

from prefopt.decoding import LeanDecoder, lean_decoder
from prefopt.generation import _draw, sample_completions, sample_groups


class _Tokenizer:
    eos_token_id, pad_token_id = 2, 0


def _model(family: str, vocab: int = 48, **extra):
    import transformers

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=2,
    )
    config_class, model_class = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    }[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**common, **extra})
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # larger weights than the init's 0.02, so the test sees real differences
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # unequal lengths: left padding


def _teacher_forced(model, k: int, steps: int, drop_after: int | None = None) -> float:
    """Max |lean logits - full-forward logits| over ``steps`` decoded tokens per row (random tokens fed)."""
    width = max(map(len, PROMPTS))
    ids = torch.zeros((len(PROMPTS), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(PROMPTS):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.tensor(prompt), 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, cache=cache)
        lean = LeanDecoder(model, cache, k, width + steps, mask)
        generator = torch.Generator().manual_seed(1)
        fed = torch.randint(3, model.config.vocab_size, (len(PROMPTS) * k, steps), generator=generator)
        full_ids, full_mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        rows = torch.arange(len(PROMPTS) * k)
        position = positions[:, -1:].repeat_interleave(k, 0) + 1
        worst = (out.logits[:, -1].repeat_interleave(k, 0) - 0).abs().max() * 0  # tensor 0
        for t in range(steps):
            if drop_after is not None and t == drop_after:  # some rows leave the batch
                keep = torch.arange(0, len(rows), 2)
                lean.select(keep)
                rows, position = rows[keep], position[keep]
            logits = lean.step(fed[rows, t], position)
            position = position + 1
            sequence = torch.cat([full_ids, fed[:, : t + 1]], dim=1)[rows]
            attention = torch.cat([full_mask, torch.ones_like(fed[:, : t + 1])], dim=1)[rows]
            reference = model(
                input_ids=sequence, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0)
            ).logits[:, -1]
            worst = torch.maximum(worst, (logits - reference).abs().max())
    return float(worst)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_lean_step_gives_the_forwards_logits(family):
    model = _model(family)
    assert lean_decoder(model, 64)
    assert _teacher_forced(model, k=2, steps=6) < 1e-4


def test_lean_step_in_bf16_is_the_forward_up_to_rounding():
    """bf16 weights and cache: the module norms and the eager attention's fp32 softmax, so the logits (of scale ~5)
    differ from the full forward's by bf16 rounding only (an error such as a missing rotation gives O(1))."""
    model = _model("llama").to(torch.bfloat16)
    assert _teacher_forced(model, k=2, steps=6) < 0.2


def test_lean_step_with_lora_rows_leaving_and_attention_bias():
    from peft import LoraConfig, get_peft_model

    model = _model("qwen2")  # q/k/v with biases
    policy = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    assert lean_decoder(policy, 64)
    assert _teacher_forced(policy, k=3, steps=6, drop_after=3) < 1e-4


def test_lean_decoder_declines_what_it_does_not_reproduce():
    assert not lean_decoder(_model("mistral", sliding_window=8), 64)  # a window shorter than the generation
    assert lean_decoder(_model("mistral", sliding_window=64), 64)
    from transformers import GPT2Config, GPT2LMHeadModel

    assert not lean_decoder(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40)), 64)


def test_sampled_log_probs_are_the_models_and_greedy_equals_generate():
    model = _model("llama")
    completions, logps = sample_groups(model, _Tokenizer, PROMPTS, 3, max_new_tokens=8, seed=3)
    assert len(completions) == 9 and all(len(c) == len(v) for c, v in zip(completions, logps, strict=True))
    for index, (completion, values) in enumerate(zip(completions, logps, strict=True)):
        prompt = PROMPTS[index // 3]  # prompt-major
        assert 0 < len(completion) <= 8 and (_Tokenizer.eos_token_id not in completion[:-1])
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            expected = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), -1)
        expected = expected.gather(1, torch.tensor(completion)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(values), expected, atol=1e-4)
    again, _ = sample_groups(model, _Tokenizer, PROMPTS, 3, max_new_tokens=8, seed=3)
    assert again == completions  # a pure function of the seed
    greedy, _ = sample_groups(model, _Tokenizer, PROMPTS, 2, max_new_tokens=8, temperature=0.0)
    expected = sample_completions(
        model, _Tokenizer, [p for p in PROMPTS for _ in range(2)], max_new_tokens=8, temperature=0.0
    )
    assert greedy == expected


def test_draw_is_distributed_as_the_probabilities():
    """A chi-square goodness-of-fit test of the inverse-CDF draw, zero-probability entries never drawn."""
    torch.manual_seed(0)
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.25, 0.05, 0.0])
    draws = _draw(probs.expand(20000, -1).contiguous())
    counts = torch.bincount(draws, minlength=len(probs)).double()
    assert counts[probs == 0].sum() == 0
    expected = probs[probs > 0].double() * len(draws)
    chi2 = float(((counts[probs > 0] - expected) ** 2 / expected).sum())
    assert chi2 < 16.27  # chi-square, 3 degrees of freedom, p = 0.001
    assert math.isclose(float(counts.sum()), 20000)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
def test_lean_and_forward_paths_sample_the_same_with_rows_finishing_early(monkeypatch, temperature, top_p):
    """EOS made likely (a third of the mass), so rows finish and leave the decoding batch: the lean step and
    ``model(...)`` decode the same completions from the same seed, each cut after its EOS, with the model's
    log-probs."""
    import prefopt.generation as generation

    model = _model("llama")
    eos_bias = torch.nn.functional.one_hot(torch.tensor(_Tokenizer.eos_token_id), model.config.vocab_size) * 3.0
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + eos_bias)  # the lean step keeps hooks
    kwargs = dict(max_new_tokens=12, temperature=temperature, top_p=top_p, seed=5)
    lean, lean_logps = sample_groups(model, _Tokenizer, PROMPTS, 4, **kwargs)
    monkeypatch.setattr(generation, "lean_decoder", lambda *a: False)
    plain, plain_logps = sample_groups(model, _Tokenizer, PROMPTS, 4, **kwargs)
    assert lean == plain
    assert sum(len(c) < 12 for c in lean) >= 6  # rows did finish early (and so left the batch)
    for completion, values, expected in zip(lean, lean_logps, plain_logps, strict=True):
        assert completion.count(_Tokenizer.eos_token_id) <= 1
        assert len(completion) == 12 or completion[-1] == _Tokenizer.eos_token_id
        assert torch.allclose(torch.tensor(values), torch.tensor(expected), atol=1e-4)
