"""Per-sequence log-probs: length buckets and the selective log-softmax against a naive full log_softmax."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefopt.logps import bucket_overhead, plan_buckets, selective_log_softmax, sequence_logps

VOCAB = 97


SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _model(**config) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SIZES, **config)).float()


def _batch(lengths: list[tuple[int, int]], pad: int = 0, seed: int = 1):
    """Right-padded rows of (prompt length, completion length)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(p + c for p, c in lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for row, (p, c) in enumerate(lengths):
        ids[row, : p + c] = torch.randint(1, VOCAB, (p + c,), generator=gen)
        attention[row, : p + c] = 1
        completion[row, p : p + c] = 1
    return ids, attention, completion


def _naive(model, ids, attention, completion) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    token = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token * completion[:, 1:]).sum(dim=-1)


LENGTHS = [(3, 4), (5, 30), (2, 1), (4, 17), (6, 2), (3, 25), (1, 9), (7, 3)]


@pytest.mark.parametrize("buckets", [False, True, 0, 1000])
def test_sequence_logps_match_a_naive_log_softmax_values_and_gradients(buckets):
    model = _model()
    batch = _batch(LENGTHS)
    expected = _naive(model, *batch)
    weights = torch.linspace(-1.0, 2.0, len(LENGTHS))
    (expected * weights).sum().backward()
    naive_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    got = sequence_logps(model, *batch, buckets=buckets)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    for param, grad in zip(model.parameters(), naive_grads, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-5)


def test_buckets_cut_padding_and_keep_row_order():
    model = _model()
    batch = _batch(LENGTHS)
    calls = []
    model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    with torch.no_grad():
        one = sequence_logps(model, *batch, buckets=False)
        split = sequence_logps(model, *batch, buckets=0)  # no overhead: one forward per distinct length
    assert calls[0] == batch[0].shape
    assert len(calls) == 1 + len({p + c for p, c in LENGTHS})
    assert sum(rows * width for rows, width in calls[1:]) == sum(p + c for p, c in LENGTHS)  # no pad at all
    torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-4)


def test_left_padded_rows_fall_back_to_one_forward():
    model = _model()
    ids, attention, completion = _batch(LENGTHS)
    # shift row 0 right by two columns (left padding)
    ids, attention, completion = (torch.cat([t[:, :2] * 0, t], dim=1) for t in (ids, attention, completion))
    for t in (ids, attention, completion):
        t[1:] = torch.roll(t[1:], -2, dims=1)
    calls = []
    model.model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(1), with_kwargs=True)
    with torch.no_grad():
        got = sequence_logps(model, ids, attention, completion)
        assert len(calls) == 1
        expected = _naive(model, ids, attention, completion)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_scaled_logits_use_the_models_own_logits():
    model = _model()
    model.config.final_logit_softcapping = 30.0  # marks the head as not plain: the model's own logits are used
    batch = _batch(LENGTHS)
    with torch.no_grad():
        got = sequence_logps(model, *batch)
        expected = _naive(model, *batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_rows_without_completion_tokens_get_zero():
    model = _model()
    batch = _batch([(4, 0), (3, 5), (2, 0)])
    got = sequence_logps(model, *batch)
    assert got[0] == 0 and got[2] == 0 and got[1] < 0


def _brute_force(lengths: list[int], overhead: int) -> float:
    ordered = sorted(lengths)
    n, best = len(ordered), float("inf")
    for k in range(n):
        for cuts in itertools.combinations(range(1, n), k):
            bounds = [0, *cuts, n]
            cost = sum((b - a) * ordered[b - 1] + overhead for a, b in itertools.pairwise(bounds))
            best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("overhead", [0, 7, 40, 500])
def test_plan_buckets_is_the_cheapest_partition(seed, overhead):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 60, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
    groups = plan_buckets(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every row exactly once
    cost = sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)
    assert cost == _brute_force(lengths, overhead)


def test_plan_buckets_limits():
    lengths = [10, 200, 11, 190, 12]
    assert plan_buckets(lengths, 10**9) == [[0, 2, 4, 3, 1]]  # overhead dominates: one forward (sorted)
    assert [sorted(g) for g in plan_buckets(lengths, 0)] == [[0], [2], [4], [3], [1]]
    assert plan_buckets([], 5) == []
    assert bucket_overhead("cpu") < bucket_overhead("cuda")


def test_small_logits_are_kept_large_ones_recomputed(monkeypatch):
    """Below the size limit the chunk is not checkpointed (no recompute); above it, it is; same values and grads."""
    import prefopt.logps as logps

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(50, (40,))
    results = []
    real = logps.checkpoint
    for keep in (1 << 22, 0):
        monkeypatch.setattr(logps, "KEEP_ELEMENTS", keep)
        calls = []
        monkeypatch.setattr(logps, "checkpoint", lambda *a, calls=calls, **k: calls.append(1) or real(*a, **k))
        hidden.grad = None
        out = selective_log_softmax(hidden, targets, head)
        out.sum().backward()
        results.append((out.detach(), hidden.grad.clone(), len(calls)))
    (kept, kept_grad, kept_calls), (recomputed, recomputed_grad, recomputed_calls) = results
    assert kept_calls == 0 and recomputed_calls == 1
    torch.testing.assert_close(kept, recomputed)
    torch.testing.assert_close(kept_grad, recomputed_grad)


@pytest.mark.parametrize("buckets", [True, False, 0])
def test_token_logps_sum_to_the_sequence_logps(buckets):
    """Per-token values (left-aligned, masked) summed per row equal sequence_logps, with unequal prompt and completion
    lengths; the mask marks exactly each row's completion tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefopt.batching import collate
    from prefopt.logps import token_logps

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config).eval()
    rows = [
        {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5]},
        {"prompt_ids": [6], "completion_ids": [7, 8, 9, 10, 11]},
        {"prompt_ids": [12, 13, 14, 15, 16], "completion_ids": [17]},
    ]
    batch = collate(rows, 0)
    values, mask = token_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask, buckets=buckets)
    summed = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask, buckets=buckets)
    assert values.shape == mask.shape == (3, 5)
    assert mask.sum(dim=1).tolist() == [2, 5, 1] and mask[0].tolist() == [1, 1, 0, 0, 0]
    assert torch.allclose((values * mask).sum(dim=1), summed, atol=1e-5)
    with torch.no_grad():  # the second row's third completion token, by hand
        logits = model(input_ids=torch.tensor([[6, 7, 8, 9, 10, 11]])).logits[0]
    assert values[1, 2].item() == pytest.approx(torch.log_softmax(logits[2], -1)[9].item(), abs=1e-5)
    assert (values[mask == 0] == 0).all()


def _shared_batch(seed: int = 3):
    """Rows in groups sharing a prompt (as k samples of one prompt, and a DPO pair's two rows), right-padded:
    prompts of 6, 3 and 9 tokens with 4, 3 and 1 completions of unequal lengths."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (6, 3, 9)]
    plan = [(0, 5), (0, 12), (0, 1), (0, 7), (1, 3), (1, 3), (1, 10), (2, 4)]
    rows = [(prompts[p], torch.randint(1, VOCAB, (c,), generator=gen).tolist()) for p, c in plan]
    order = [3, 7, 0, 5, 1, 4, 2, 6]  # rows of one prompt need not be adjacent
    rows = [rows[i] for i in order]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, (p, c) in enumerate(rows):
        ids[row, : len(p) + len(c)] = torch.tensor(p + c)
        attention[row, : len(p) + len(c)] = 1
        completion[row, len(p) : len(p) + len(c)] = 1
    return ids, attention, completion


@pytest.mark.parametrize("buckets", [16, 0])
def test_rows_sharing_a_prompt_run_it_once_same_values_and_gradients(buckets):
    """The prompt of rows that share it runs once (one forward of the 3 distinct prompts), each completion continues
    from its prompt's cache: values and gradients equal the naive full forward's. (Sharing saves 24 prompt tokens
    here, more than the per-forward overhead of 16 or 0 tokens; below it the rows run whole.)"""
    model = _model()
    batch = _shared_batch()
    expected = _naive(model, *batch)
    weights = torch.linspace(-1.0, 2.0, batch[0].shape[0])
    (expected * weights).sum().backward()
    naive_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    calls = []
    model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    got = sequence_logps(model, *batch, buckets=buckets)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    for param, grad in zip(model.parameters(), naive_grads, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-5)
    assert calls[0] == (3, 9)  # the distinct prompts, padded to the longest
    completion_tokens = int(batch[2].sum())
    if buckets == 0:  # one forward per distinct completion length, nothing padded: exactly the completion tokens
        assert sum(rows * width for rows, width in calls[1:]) == completion_tokens
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, *batch, buckets=64), expected, rtol=1e-5, atol=1e-4)
    assert all(width > 9 for _, width in calls)  # saving 24 tokens is not worth a forward of 64: rows run whole


def test_shared_prompts_statistics_and_lora():
    from peft import LoraConfig, get_peft_model

    from prefopt.logps import sequence_statistics, token_logps

    policy = get_peft_model(_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    batch = _shared_batch()
    prefix = torch.tensor([2, 0, 5, 1, 3, 2, 1, 9])
    with torch.no_grad():
        shared = sequence_statistics(policy, *batch, prefix_lengths=prefix, log_sum_sq=True, buckets=True)
        plain = sequence_statistics(policy, *batch, prefix_lengths=prefix, log_sum_sq=True, buckets=False)
        tokens_shared, mask_shared = token_logps(policy, *batch, buckets=True)
        tokens_plain, mask_plain = token_logps(policy, *batch, buckets=False)
    for key in plain:
        torch.testing.assert_close(shared[key], plain[key], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tokens_shared, tokens_plain, rtol=1e-5, atol=1e-4)
    assert torch.equal(mask_shared, mask_plain)


def test_shared_prompts_fall_back_where_the_cache_cannot_carry_them():
    """Gradient checkpointing in a backward drops the cache, a sliding-window cache is not a plain prefix: both run
    the rows whole (no prompt-only forward), with the same values."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    batch = _shared_batch()
    checkpointed = _model()
    checkpointed.gradient_checkpointing_enable()
    checkpointed.train()
    torch.manual_seed(0)
    windowed = Qwen2ForCausalLM(Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=4, max_window_layers=0))
    assert windowed.config.layer_types == ["sliding_attention"] * 2
    for model in (checkpointed, windowed):
        calls = []
        model.model.register_forward_pre_hook(
            lambda mod, args, kwargs, calls=calls: calls.append(kwargs["input_ids"].shape), with_kwargs=True
        )
        got = sequence_logps(model, *batch, buckets=0)
        assert sum(rows * width for rows, width in calls) == int(batch[1].sum())  # whole rows, none run twice
        with torch.no_grad():
            torch.testing.assert_close(got.detach(), _naive(model, *batch), rtol=1e-5, atol=1e-4)


def test_shared_prompts_through_a_ddp_wrapper_match_one_process(tmp_path):
    """Two processes (torchrun, gloo DDP) with shared prompts forced on (a per-forward overhead of 1 token): the prompt
    and completion forwards both go through the DDP wrapper before one backward, and the losses and gradient norms
    (the all-reduced gradients) equal one process's."""
    from prefopt.logps import _shared_prompts

    from .test_cli import one_and_two_processes
    from .test_trainer import TINY

    class Wrapper(torch.nn.Module):  # what the check sees of DDP: the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    ids, attention, completion = _shared_batch()
    lengths = attention.sum(dim=1).tolist()  # at overhead 0 the rows' own buckets cost their lengths
    assert _shared_prompts(Wrapper(_model()), ids, completion, lengths, 0, sum(lengths)) is not None
    common = [*TINY, "trainer.max_steps=4", "trainer.lr=0.01", f"cache_dir={tmp_path}/c", "trainer.micro_batch_size=4"]
    common += ["trainer.bucket_overhead_tokens=1", "model.sft.steps=0"]
    one, two, _ = one_and_two_processes(tmp_path, *common)
    pick = lambda lines: [(x["loss"], x["grad_norm"]) for x in lines if "grad_norm" in x]  # noqa: E731
    assert len(pick(one)) == 4
    for (loss_1, norm_1), (loss_2, norm_2) in zip(pick(one), pick(two), strict=True):
        assert loss_2 == pytest.approx(loss_1, abs=1e-5) and norm_2 == pytest.approx(norm_1, rel=1e-4)
