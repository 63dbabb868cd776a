"""MPO, UPO and combo: values computed by hand from the formulas in their docstrings, and their limits."""

import math

import pytest
import torch

import losses

F64 = torch.float64


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t(*values):
    return torch.tensor(values, dtype=F64)


MPO_BATCH = dict(
    policy_chosen_logps=t(-10.0, -25.0),
    policy_rejected_logps=t(-12.0, -24.0),
    chosen_lengths=torch.tensor([5, 10]),
    rejected_lengths=torch.tensor([6, 8]),
    reg_logps=t(-6.0, -9.0),
    reg_lengths=torch.tensor([3, 6]),
    reg_ref_logps=t(-5.0, -8.0),
)


def test_mpo_hand_computed():
    out = losses.get("mpo", beta=0.1, pair_center="none")(**MPO_BATCH)
    pref = [sigmoid(2.0), sigmoid(-1.0)]  # σ(S_w − S_l)
    reg_nll = 15.0 / 9.0  # token mean −ΣS/Σ|y|
    assert out.per_example.tolist() == pytest.approx([-pref[0] + 0.1 * reg_nll, -pref[1] + 0.1 * reg_nll], abs=1e-12)
    assert out.loss.item() == pytest.approx(-(pref[0] + pref[1]) / 2 + 0.1 * reg_nll, abs=1e-12)
    metrics = out.metrics
    assert metrics["mpo/pref_reward"].item() == pytest.approx(sum(pref) / 2)
    assert metrics["mpo/pair_accuracy"].item() == 0.5
    assert metrics["mpo/logp_gap"].item() == pytest.approx(0.5)
    assert metrics["mpo/reg_nll"].item() == pytest.approx(reg_nll)
    assert metrics["mpo/kl_fwd_est"].item() == pytest.approx(1.0)  # mean(S_ref − S_θ) = mean(1, 1)


def test_mpo_knobs():
    tempered = losses.get("mpo", beta=0.0, temperature=2.0, pair_center="none")(**MPO_BATCH)
    assert tempered.loss.item() == pytest.approx(-(sigmoid(1.0) + sigmoid(-0.5)) / 2, abs=1e-12)
    summed = losses.get("mpo", beta=1.0, nll_token_mean=False, pair_center="none")(**MPO_BATCH)
    assert summed.loss.item() == pytest.approx(-(sigmoid(2.0) + sigmoid(-1.0)) / 2 + 7.5, abs=1e-12)
    normalized = losses.get("mpo", beta=0.0, length_normalize=True, pair_center="none")(**MPO_BATCH)
    assert normalized.loss.item() == pytest.approx(-(sigmoid(-2 + 2) + sigmoid(-2.5 + 3)) / 2, abs=1e-12)
    ptx = losses.get("mpo", beta=0.0, ptx_weight=0.5, pair_center="none")(
        **MPO_BATCH, sft_logps=t(-4.0), sft_lengths=torch.tensor([2])
    )
    assert ptx.loss.item() == pytest.approx(-(sigmoid(2.0) + sigmoid(-1.0)) / 2 + 0.5 * 2.0, abs=1e-12)


def test_mpo_needs_no_reference_and_saturates():
    """The preference term is bounded: even an infinite margin gains at most 1 per pair (unlike DPO)."""
    assert not losses.get("mpo", pair_center="none").needs_reference
    huge = dict(MPO_BATCH, policy_chosen_logps=t(0.0, 0.0), policy_rejected_logps=t(-1e4, -1e4))
    out = losses.get("mpo", beta=0.0, pair_center="none")(**huge)
    assert out.loss.item() == pytest.approx(-1.0)
    grad_batch = {k: (v.clone().requires_grad_(True) if k == "policy_chosen_logps" else v) for k, v in huge.items()}
    losses.get("mpo", beta=0.0, pair_center="none")(**grad_batch).loss.backward()
    assert grad_batch["policy_chosen_logps"].grad.abs().max().item() < 1e-12


def test_mpo_kl_term_pulls_towards_reference_samples():
    """Gradient of the KL term w.r.t. the regularisation log-probs is −β / Σ|y| per token-mean NLL."""
    reg = MPO_BATCH["reg_logps"].clone().requires_grad_(True)
    losses.get("mpo", beta=0.3, pair_center="none")(**dict(MPO_BATCH, reg_logps=reg)).loss.backward()
    assert reg.grad.tolist() == pytest.approx([-0.3 / 9, -0.3 / 9])


def test_mpo_empty_regularisation_batch_is_an_error():
    with pytest.raises(losses.LossError, match="'reg_logps' is empty"):
        empty = dict(MPO_BATCH, reg_logps=t(), reg_lengths=torch.tensor([], dtype=torch.long))
        losses.get("mpo", pair_center="none")(**empty)


MPO_REF = dict(ref_chosen_logps=t(-11.0, -24.0), ref_rejected_logps=t(-11.5, -26.0))


def test_mpo_centred_pair_term_hand_computed():
    """pair_center="reference" (the default): σ(ρ_w − ρ_l), ρ = S_θ − S_ref: the importance weight of the winner
    when the pairs were drawn from π_ref, self-normalised over the pair."""
    out = losses.get("mpo", beta=0.1)(**MPO_BATCH, **MPO_REF)
    z = [(-10.0 + 11.0) - (-12.0 + 11.5), (-25.0 + 24.0) - (-24.0 + 26.0)]  # [1.5, -3.0]
    pref = [sigmoid(v) for v in z]
    reg_nll = 15.0 / 9.0
    assert out.per_example.tolist() == pytest.approx([-p + 0.1 * reg_nll for p in pref], abs=1e-12)
    metrics = out.metrics
    assert metrics["mpo/logp_gap"].item() == pytest.approx(sum(z) / 2)
    assert metrics["mpo/sigma_prime_mean"].item() == pytest.approx(sum(p * (1 - p) for p in pref) / 2)
    assert metrics["mpo/ess"].item() == pytest.approx(sum(1 / (p**2 + (1 - p) ** 2) for p in pref) / 2)
    assert metrics["mpo/pair_accuracy"].item() == 0.5


def test_mpo_centred_term_is_half_at_the_reference_whatever_the_lengths():
    """At θ = θ_ref every pair sits at σ(0) = ½ with σ′ = ¼, even when its summed log-probs differ by 40 nats (the
    uncentred term starts such a pair saturated: σ′ ≈ 4e-18)."""
    chosen, rejected = t(-10.0, -60.0, -35.0), t(-50.0, -20.0, -35.5)
    batch = dict(policy_chosen_logps=chosen, policy_rejected_logps=rejected)
    centred = losses.get("mpo", beta=0.0)(**batch, ref_chosen_logps=chosen, ref_rejected_logps=rejected)
    assert centred.loss.item() == pytest.approx(-0.5, abs=1e-15)
    assert centred.metrics["mpo/sigma_prime_mean"].item() == pytest.approx(0.25, abs=1e-15)
    assert centred.metrics["mpo/ess"].item() == pytest.approx(2.0)
    plain = losses.get("mpo", beta=0.0, pair_center="none")(**batch)
    assert plain.metrics["mpo/sigma_prime_mean"].item() < 0.1


def test_mpo_centred_term_needs_reference_log_probs_not_a_model():
    loss = losses.get("mpo")
    assert loss.needs_reference and {"ref_chosen_logps", "ref_rejected_logps"} <= set(loss.requirements.inputs)
    with pytest.raises(losses.MissingInputError, match="ref_chosen_logps"):
        loss(**MPO_BATCH)
    with pytest.raises(losses.HyperParameterError, match="pair_center"):
        losses.get("mpo", pair_center="policy")


def _upo_hand(golden_batch, weight_clip=20.0):
    """UPO by hand on the spec batch: aux rewards chosen [1, 0, 2], rejected [0, 0, −2], pair-mean baseline, τ = 1."""
    advantages_w, advantages_l = [0.5, 0.0, 2.0], [-0.5, 0.0, -2.0]
    w_w = [min(math.exp(a), weight_clip) for a in advantages_w]
    w_l = [min(math.exp(a), weight_clip) for a in advantages_l]
    mean_w = [-10 / 5, -25 / 10, -7.5 / 3]  # token-mean log-probs
    mean_l = [-12 / 6, -24 / 8, -9 / 4]
    aux = [-(w_w[i] * mean_w[i] + w_l[i] * mean_l[i]) / 2 for i in range(3)]
    dpo = losses.get("dpo")(**golden_batch).per_example.tolist()
    return [dpo[i] + aux[i] for i in range(3)], w_w + w_l


def test_upo_hand_computed(golden_batch):
    inputs = dict(golden_batch, aux_rewards_chosen=t(1.0, 0.0, 2.0), aux_rewards_rejected=t(0.0, 0.0, -2.0))
    out = losses.get("upo", alpha=1.0)(**inputs)
    expected, weights = _upo_hand(golden_batch)
    assert out.per_example.tolist() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["aux/weight_ess"].item() == pytest.approx(sum(weights) ** 2 / sum(w * w for w in weights))
    assert out.metrics["aux/frac_clipped"].item() == 0.0
    assert out.metrics["loss/preference"].item() == pytest.approx(0.666292, abs=1e-6)
    assert out.metrics["rewards/margins"].item() == pytest.approx(0.056667, abs=1e-6)  # the base's metrics

    clipped = losses.get("upo", alpha=1.0, weight_clip=5.0)(**inputs)
    expected, _ = _upo_hand(golden_batch, weight_clip=5.0)
    assert clipped.per_example.tolist() == pytest.approx(expected, abs=1e-12)
    assert clipped.metrics["aux/frac_clipped"].item() == pytest.approx(1 / 6)


def test_upo_limits_and_options(golden_batch):
    inputs = dict(golden_batch, aux_rewards_chosen=t(1.0, 0.0, 2.0), aux_rewards_rejected=t(0.0, 0.0, -2.0))
    assert losses.get("upo", alpha=0.0)(**inputs).loss.item() == losses.get("dpo")(**golden_batch).loss.item()
    # equal auxiliary rewards: every weight is 1, the auxiliary term is the plain mean NLL over both completions
    flat = dict(inputs, aux_rewards_chosen=t(3.0, 3.0, 3.0), aux_rewards_rejected=t(3.0, 3.0, 3.0))
    out = losses.get("upo", base="ipo", beta=0.2, alpha=1.0, aux_length_normalize=False)(**flat)
    ipo = losses.get("ipo", beta=0.2)(**golden_batch).loss.item()
    assert out.loss.item() == pytest.approx(ipo + (42.5 + 45.0) / 6, abs=1e-12)
    # [B, K] rewards with weights c_k equal the pre-combined [B] rewards
    multi = dict(
        golden_batch,
        aux_rewards_chosen=t(1.0, 0.0, 2.0)[:, None].repeat(1, 2),
        aux_rewards_rejected=t(0.0, 0.0, -2.0)[:, None].repeat(1, 2),
    )
    combined = losses.get("upo", aux_weights=[0.25, 0.75])(**multi)
    assert combined.loss.item() == pytest.approx(losses.get("upo")(**inputs).loss.item(), abs=1e-12)
    # the weights are normalised: [1, 1] is [0.5, 0.5] is the default, and the scale of r_aux does not grow with K
    halves = losses.get("upo", aux_weights=[0.5, 0.5])(**multi).loss.item()
    assert losses.get("upo", aux_weights=[1, 1])(**multi).loss.item() == pytest.approx(halves, abs=1e-15)
    assert losses.get("upo")(**multi).loss.item() == pytest.approx(halves, abs=1e-15)
    assert halves == pytest.approx(losses.get("upo")(**inputs).loss.item(), abs=1e-12)
    assert "aux/1/mean" in combined.metrics
    # batch-mean baseline: centre = mean of all six rewards = 1/6
    batch_mean = losses.get("upo", baseline="batch_mean")(**inputs)
    assert batch_mean.metrics["aux/advantage_mean"].item() == pytest.approx(0.0, abs=1e-12)
    # weights are detached: the auxiliary gradient is −α·w/(2B·|y|) per summed log-prob
    chosen = golden_batch["policy_chosen_logps"].clone().requires_grad_(True)
    losses.get("upo", base="simpo", alpha=1.0)(**dict(inputs, policy_chosen_logps=chosen)).loss.backward()
    simpo_chosen = golden_batch["policy_chosen_logps"].clone().requires_grad_(True)
    losses.get("simpo", beta=0.1)(**dict(golden_batch, policy_chosen_logps=simpo_chosen)).loss.backward()
    aux_grad = chosen.grad - simpo_chosen.grad
    expected = [-math.exp(a) / (2 * 3 * n) for a, n in zip([0.5, 0.0, 2.0], [5, 10, 3], strict=True)]
    assert aux_grad.tolist() == pytest.approx(expected, abs=1e-12)


def test_upo_expectile_baseline(golden_batch):
    """The pair's τ_e-expectile τ_e·max + (1 − τ_e)·min: 0.5 is the pair mean; τ_e → 1 centres on the better one."""
    inputs = dict(golden_batch, aux_rewards_chosen=t(1.0, 0.0, 2.0), aux_rewards_rejected=t(0.0, 0.0, -2.0))
    mean = losses.get("upo", alpha=1.0)(**inputs)
    half = losses.get("upo", alpha=1.0, baseline="pair_expectile", expectile=0.5)(**inputs)
    assert half.per_example.tolist() == pytest.approx(mean.per_example.tolist(), abs=1e-15)
    high = losses.get("upo", alpha=1.0, baseline="pair_expectile", expectile=0.75)(**inputs)
    # pair 0: rewards (1, 0): b = 0.75, advantages (0.25, −0.75)
    assert high.metrics["aux/advantage_mean"].item() == pytest.approx((0.25 - 0.75 + 0 + 0 + 1.0 - 3.0) / 6)
    with pytest.raises(losses.HyperParameterError, match="expectile"):
        losses.get("upo", baseline="pair_expectile", expectile=1.0)
    with pytest.raises(losses.HyperParameterError, match="aux_weights"):
        losses.get("upo", aux_weights=[0, 0])


def test_upo_default_alpha_keeps_the_preference_term_dominant(golden_batch):
    """α = 0.1 (default): the auxiliary term's gradient on the pair's log-probs is a tenth of α = 1's."""
    inputs = dict(golden_batch, aux_rewards_chosen=t(1.0, 0.0, 2.0), aux_rewards_rejected=t(0.0, 0.0, -2.0))
    assert losses.get("upo").hparams["alpha"] == 0.1
    dpo = losses.get("dpo")(**golden_batch).loss.item()
    one, tenth = losses.get("upo", alpha=1.0)(**inputs).loss.item(), losses.get("upo")(**inputs).loss.item()
    assert tenth - dpo == pytest.approx((one - dpo) / 10, abs=1e-12)


def test_upo_over_reference_free_base_needs_no_reference(golden_batch):
    inputs = {k: v for k, v in golden_batch.items() if not k.startswith("ref")}
    out = losses.get("upo", base="simpo")(**inputs, aux_rewards_chosen=t(1.0, 0, 0), aux_rewards_rejected=t(0.0, 0, 0))
    assert torch.isfinite(out.loss)


def test_upo_bad_reward_shapes(golden_batch):
    with pytest.raises(losses.LossError, match="aux_weights has 3 entries but 'aux_rewards_chosen' has K=2"):
        losses.get("upo", aux_weights=[1, 1, 1])(
            **golden_batch, aux_rewards_chosen=torch.zeros(3, 2, dtype=F64), aux_rewards_rejected=torch.zeros(3, 2)
        )


def test_combo_is_the_weighted_sum_of_its_parts(golden_batch):
    out = losses.get("combo", parts={"dpo": 0.8, "bco_pair": 0.2, "sft": 1.0}, beta=0.1)(**golden_batch)
    parts = {name: losses.get(name)(**golden_batch) for name in ("dpo", "bco_pair", "sft")}
    expected = 0.8 * parts["dpo"].loss + 0.2 * parts["bco_pair"].loss + parts["sft"].loss
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert out.metrics["loss/bco_pair"].item() == pytest.approx(parts["bco_pair"].loss.item())
    assert out.metrics["rewards/margins"].item() == pytest.approx(parts["dpo"].metrics["rewards/margins"].item())
    assert "sft/nll_loss" in out.metrics


def test_combo_part_hyperparameters_and_shared_beta(golden_batch):
    out = losses.get("combo", parts={"ipo": {"weight": 2.0, "beta": 0.5}, "dpo": 1.0}, beta=0.2)(**golden_batch)
    expected = 2 * losses.get("ipo", beta=0.5)(**golden_batch).loss + losses.get("dpo", beta=0.2)(**golden_batch).loss
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-12)


def test_upo_prompt_expectile_baseline_reads_the_value_input(golden_batch):
    """baseline='prompt_expectile': b = aux_values (a value V(x) fit by expectile regression, one per pair); with the
    pair means as values it is the pair_mean baseline."""
    inputs = dict(golden_batch, aux_rewards_chosen=t(1.0, 0.0, 2.0), aux_rewards_rejected=t(0.0, 0.0, -2.0))
    loss = losses.get("upo", alpha=1.0, baseline="prompt_expectile")
    assert "aux_values" in loss.requirements.inputs
    same = loss(**inputs, aux_values=t(0.5, 0.0, 0.0))
    assert same.per_example.tolist() == pytest.approx(losses.get("upo", alpha=1.0)(**inputs).per_example.tolist())
    high = loss(**inputs, aux_values=t(1.0, 1.0, 1.0))  # every advantage r − 1
    assert high.metrics["aux/advantage_mean"].item() == pytest.approx((1 + 0 + 2 + 0 + 0 - 2) / 6 - 1)
    with pytest.raises(losses.MissingInputError, match="aux_values"):
        loss(**inputs)


def test_expectile():
    from losses._common import expectile

    x = t(0.0, 1.0, 2.0, 10.0)
    assert expectile(x, 0.5).item() == pytest.approx(3.25)
    for tau in (0.1, 0.7, 0.9):
        m = expectile(x, tau)
        assert (tau * (x[x > m] - m).sum() - (1 - tau) * (m - x[x < m]).sum()).item() == pytest.approx(0, abs=1e-12)
