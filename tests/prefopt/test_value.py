"""UPO's value head: expectile regression on prompt features (prefopt.value)."""

import pytest
import torch

from losses._common import expectile
from prefopt.value import ExpectileValue, expectile_loss, prompt_features


def test_expectile_loss_is_minimised_by_the_expectile():
    targets = torch.tensor([-1.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    for tau in (0.2, 0.5, 0.9):
        best = expectile(targets, tau)
        for shift in (-1e-3, 1e-3):
            assert expectile_loss(best + shift, targets, tau) > expectile_loss(best, targets, tau)
    # hand-computed: tau = 0.9, prediction 1 -> diffs (-2, -1, -0.5, 2): (0.1*(4 + 1 + 0.25) + 0.9*4) / 4
    assert expectile_loss(torch.tensor(1.0), targets, 0.9).item() == pytest.approx((0.1 * 5.25 + 0.9 * 4) / 4)


@pytest.mark.parametrize("hidden", [0, 16])
def test_head_on_prompt_identities_recovers_each_prompts_expectile(hidden):
    """With one-hot prompt features the head can represent any value per prompt, so the fit lands on each prompt's
    τ-expectile (the exact table)."""
    generator = torch.Generator().manual_seed(0)
    prompts = torch.arange(4).repeat_interleave(25)
    targets = torch.randn(100, generator=generator, dtype=torch.float64) + prompts.double()
    features = torch.nn.functional.one_hot(prompts, 4).float()
    head = ExpectileValue(0.8, hidden=hidden, steps=2000, lr=0.05).fit(features, targets, seed=1)
    values = head(torch.eye(4))
    exact = torch.stack([expectile(targets[prompts == p], 0.8) for p in range(4)])
    assert torch.allclose(values, exact, atol=2e-3)
    again = ExpectileValue(0.8, hidden=hidden, steps=2000, lr=0.05).fit(features, targets, seed=1)
    assert torch.equal(again(torch.eye(4)), values)  # seeded: the same data gives the same head


def test_uninformative_features_give_the_constant_expectile():
    targets = torch.tensor([0.0, 1.0, 5.0, -2.0, 3.0], dtype=torch.float64)
    head = ExpectileValue(0.3, hidden=0, steps=0).fit(torch.ones(5, 3), targets)
    assert torch.allclose(head(torch.ones(2, 3)), expectile(targets, 0.3).expand(2))


def test_prompt_features_do_not_depend_on_padding():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config).eval()
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10, 11]]
    together = prompt_features(model, prompts, 0, 8, torch.device("cpu"))
    alone = prompt_features(model, prompts[:1], 0, 8, torch.device("cpu"))
    assert together.shape == (2, 16) and torch.allclose(together[0], alone[0], atol=1e-5)
    with torch.no_grad():
        full = model.model(input_ids=torch.tensor([prompts[1]])).last_hidden_state[0, -1]
    assert torch.allclose(together[1], full, atol=1e-5)
