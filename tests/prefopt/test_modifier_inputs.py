"""The DPO modifiers' inputs in the trainer: the chunked head's per-row statistics against a naive full log-softmax,
the step handing a loss with ``ld_alpha`` / ``use_weighting`` exactly those values (policy and precomputed or live
reference), and short training runs with each modifier."""

from __future__ import annotations

import pytest
import torch

import prefopt
from prefopt.build import build
from prefopt.logps import sequence_statistics

from .test_logps import LENGTHS, _batch, _model
from .test_trainer import TINY, metrics, run


def _naive_tokens(model, ids, attention, completion):
    """Per-position log-prob of the next token and log Σ_v p_v² of its distribution, [N, T-1], and the target mask."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    token = log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return token, torch.logsumexp(2 * log_probs, dim=-1), completion[:, 1:].bool()


@pytest.mark.parametrize("buckets", [False, True])
def test_sequence_statistics_match_a_naive_log_softmax(buckets):
    model = _model()
    batch = _batch(LENGTHS)
    prefix = torch.tensor([2, 0, 1, 17, 1, 5, 9, 3])  # per row, up to its completion's length
    got = sequence_statistics(model, *batch, prefix_lengths=prefix, log_sum_sq=True, buckets=buckets)
    with torch.no_grad():
        token, sum_sq, mask = _naive_tokens(model, *batch)
    place = mask.long().cumsum(dim=1)  # 1-based position within the completion
    expected_prefix = (token * (mask & (place <= prefix[:, None]))).sum(dim=1)
    torch.testing.assert_close(got["logps"].double(), (token * mask).sum(dim=1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["prefix_logps"].double(), expected_prefix, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["log_sum_sq_probs"].double(), (sum_sq * mask).sum(dim=1), rtol=1e-5, atol=1e-4)
    assert got["logps"].requires_grad and got["prefix_logps"].requires_grad
    assert not got["log_sum_sq_probs"].requires_grad  # WPO's weights carry no gradient


def test_sequence_statistics_gradients_equal_the_naive_ones():
    model = _model()
    batch = _batch(LENGTHS[:4])
    prefix = torch.tensor([1, 3, 1, 2])
    token, _, mask = _naive_tokens(model, *batch)
    place = mask.long().cumsum(dim=1)
    (token * (mask & (place <= prefix[:, None]))).sum().backward()
    naive = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sequence_statistics(model, *batch, prefix_lengths=prefix, log_sum_sq=True)["prefix_logps"].sum().backward()
    for param, grad in zip(model.parameters(), naive, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("mode", ["precomputed", "live"])
def test_step_hands_the_modifiers_their_inputs(tmp_path, cache_dir, mode):
    """One micro-batch before training (policy = reference): the shared-length sums of policy and reference and
    Σ log Σ p² reach the loss, equal to a naive full forward of each row."""
    overrides = ["loss=dpo", "loss.ld_alpha=0.5", "loss.use_weighting=true", f"reference.mode={mode}"]
    cfg = prefopt.compose([*TINY, f"cache_dir={cache_dir}", *overrides])
    built = build(cfg, tmp_path / "run")
    seen: dict = {}
    loss_fn = built.step.loss_fn
    built.step.loss_fn = lambda **inputs: (seen.update(inputs), loss_fn(**inputs))[1]
    items = built.data.train[:4]
    built.step(built.policy, items, 0, 0)
    model = built.accelerator.unwrap_model(built.policy)
    for i, item in enumerate(items):
        shared = min(len(item["chosen_ids"]), len(item["rejected_ids"]))
        for side in ("chosen", "rejected"):
            ids = torch.tensor([item["prompt_ids"] + item[f"{side}_ids"]])
            completion = torch.zeros_like(ids)
            completion[0, len(item["prompt_ids"]) :] = 1
            with torch.no_grad():
                token, sum_sq, mask = _naive_tokens(model, ids, torch.ones_like(ids), completion)
            values = token[mask]
            for name, expected in (
                (f"policy_{side}_logps", values.sum()),
                (f"policy_{side}_shared_logps", values[:shared].sum()),
                (f"ref_{side}_shared_logps", values[:shared].sum()),
                (f"policy_{side}_log_sum_sq_probs", sum_sq[mask].sum()),
            ):
                assert seen[name][i].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-4), (name, i)


MODIFIERS = [
    ["loss.use_weighting=true"],
    ["loss.ld_alpha=0.5"],
    ["loss.f_divergence_type=js_divergence"],
    ["loss=ipo", "loss.f_divergence_type=alpha_divergence", "loss.f_alpha_divergence_coef=0.3", "loss.ld_alpha=0.2"],
]


@pytest.mark.parametrize("overrides", MODIFIERS, ids=lambda o: " ".join(o))
def test_each_modifier_trains(tmp_path, cache_dir, overrides):
    summary = run(tmp_path, cache_dir, *overrides, "trainer.max_steps=3")
    lines = [line for line in metrics(summary) if "loss" in line]
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        assert all(isinstance(v, (int, float)) and v == v and abs(v) != float("inf") for v in line.values()), line
    if "loss.use_weighting=true" in overrides:
        assert 0 < lines[0]["wpo/weight"] < 1


def test_ld_dpo_precomputed_and_live_reference_agree(tmp_path, cache_dir):
    """The cached shared-length table gives the live reference's values (same losses and margins)."""
    common = ("loss.ld_alpha=0.3", "trainer.max_steps=3")
    live = run(tmp_path, cache_dir, *common, "reference.mode=live", name="live")
    cached = run(tmp_path, cache_dir, *common, "reference.mode=precomputed", name="cached")
    for a, b in zip(metrics(live), metrics(cached), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
