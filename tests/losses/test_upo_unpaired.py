"""UPO over an unpaired base (kto, apo_zero_unpaired): declaration, the base loss at α = 0, hand-computed auxiliary
weights per row, the baselines, gradients."""

import math

import pytest
import torch

import losses

F64 = torch.float64


def _batch() -> dict[str, torch.Tensor]:
    return {
        "policy_logps": torch.tensor([-4.0, -6.0, -5.0, -3.0], dtype=F64, requires_grad=True),
        "ref_logps": torch.tensor([-4.5, -5.0, -5.0, -3.5], dtype=F64),
        "labels": torch.tensor([True, False, True, False]),
        "policy_kl_logps": torch.tensor([-7.0, -6.0, -8.0, -7.5], dtype=F64),
        "ref_kl_logps": torch.tensor([-7.5, -6.0, -8.0, -8.0], dtype=F64),
        "aux_rewards": torch.tensor([1.0, -1.0, 0.0, 2.0], dtype=F64),
        "aux_values": torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=F64),
        "lengths": torch.tensor([2.0, 3.0, 1.0, 4.0], dtype=F64),
    }


def test_declaration_follows_the_base():
    req = losses.get("upo", base="kto").requirements
    assert req.kind == "unpaired"
    kto = ("policy_logps", "ref_logps", "labels", "policy_kl_logps", "ref_kl_logps")
    assert req.inputs == (*kto, "aux_rewards", "aux_values", "lengths")
    batch_mean = losses.get("upo", base="apo_zero_unpaired", baseline="batch_mean", aux_length_normalize=False)
    assert batch_mean.requirements.inputs == ("policy_logps", "ref_logps", "labels", "aux_rewards")
    assert losses.get("upo").requirements.kind == "pair"  # a pairwise base keeps the pairwise form


@pytest.mark.parametrize("base", ["kto", "apo_zero_unpaired"])
def test_alpha_zero_is_the_base(base):
    batch = _batch()
    upo = losses.get("upo", base=base, alpha=0.0)(**batch)
    plain = losses.get(base)(**{k: v for k, v in batch.items() if k not in ("aux_rewards", "aux_values", "lengths")})
    assert torch.equal(upo.per_example, plain.per_example)
    assert upo.metrics["loss/preference"].item() == plain.loss.item()


def test_auxiliary_term_by_hand():
    """A = r − V(x) = [1, −1, −1, 1]; τ = 0.5 → w = exp(2A) = [e², e⁻², e⁻², e²] (w_max = 20 clips none: e² ≈ 7.39);
    S̄ = S / |y| = [−2, −2, −5, −0.75]; aux per row = −w S̄; L = L_kto + α·mean(aux)."""
    batch = _batch()
    out = losses.get("upo", base="kto", alpha=0.5, temperature=0.5, baseline="prompt_expectile")(**batch)
    kto = losses.get("kto")(**{k: v for k, v in batch.items() if k not in ("aux_rewards", "aux_values", "lengths")})
    e2 = math.exp(2)
    aux = torch.tensor([2 * e2, 2 / e2, 5 / e2, 0.75 * e2], dtype=F64)
    assert out.per_example.tolist() == pytest.approx((kto.per_example + 0.5 * aux).tolist(), abs=1e-12)
    assert out.metrics["aux/weight_max"].item() == pytest.approx(e2, abs=1e-12)
    assert out.metrics["aux/reward_chosen_mean"].item() == 0.5 and out.metrics["aux/reward_rejected_mean"].item() == 0.5
    out.loss.backward()  # gradient of the aux term on row i: −α w_i / |y_i| / N, plus the base's
    grad = batch["policy_logps"].grad
    batch2 = _batch()
    kto2 = losses.get("kto")(**{k: v for k, v in batch2.items() if k not in ("aux_rewards", "aux_values", "lengths")})
    kto2.loss.backward()
    weights = torch.tensor([e2, 1 / e2, 1 / e2, e2], dtype=F64)
    expected = batch2["policy_logps"].grad - 0.5 * weights / batch["lengths"] / 4
    assert grad.tolist() == pytest.approx(expected.tolist(), abs=1e-12)


def test_batch_mean_baseline_and_pair_baselines_need_values():
    without = {k: v for k, v in _batch().items() if k != "aux_values"}
    out = losses.get("upo", base="apo_zero_unpaired", baseline="batch_mean", temperature=1.0, alpha=1.0)(**without)
    assert out.metrics["aux/advantage_mean"].item() == pytest.approx(0.0, abs=1e-12)  # r − mean(r)
    with pytest.raises(losses.MissingInputError, match="aux_values"):
        losses.get("upo", base="kto")(**without)  # pair_mean over an unpaired base: the prompt's mean, supplied


def test_gradcheck():
    batch = _batch()
    loss = losses.get("upo", base="kto", alpha=0.3)

    def f(policy_logps):
        return loss(**{**batch, "policy_logps": policy_logps}).loss

    assert torch.autograd.gradcheck(f, (batch["policy_logps"].detach().clone().requires_grad_(True),))
