"""REINFORCE++ (``reinforce_pp``), PPO's GAE and DAPO's overlong penalty against OpenRLHF 0.11.2's own code (verbatim
copies in tests/peers/openrlhf, loaded under their package names with stubs for what they import but these functions
do not use): the per-token advantages of its ``reinforce`` and ``reinforce_baseline`` estimators (KL folded into the
reward, return to go, whitening over every token of the batch), its ``get_advantages_and_returns`` (GAE), its KL
estimators and its ``apply_overlong_penalty``."""

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from unittest.mock import MagicMock

import pytest
import torch

from losses.ppo import gae
from losses.reinforce import _kl, reinforce_pp_advantages

PEER = Path(__file__).resolve().parents[1] / "peers" / "openrlhf"


@pytest.fixture(scope="module")
def openrlhf():
    """OpenRLHF's modules, loaded from the copies; the names added to sys.modules are removed afterwards."""
    saved = dict(sys.modules)
    logging_utils = ModuleType("openrlhf.utils.logging_utils")
    logging_utils.init_logger = logging.getLogger
    stubs = {
        "deepspeed": MagicMock(),
        "ray": MagicMock(),
        "openrlhf": ModuleType("openrlhf"),
        "openrlhf.utils": ModuleType("openrlhf.utils"),
        "openrlhf.utils.logging_utils": logging_utils,
        "openrlhf.utils.seqlen_balancing": MagicMock(),
        "openrlhf.trainer": ModuleType("openrlhf.trainer"),
        "openrlhf.trainer.ray": ModuleType("openrlhf.trainer.ray"),
        "openrlhf.trainer.ray.launcher": MagicMock(),
        "openrlhf.trainer.ppo_utils": ModuleType("openrlhf.trainer.ppo_utils"),
        "openrlhf.trainer.ppo_utils.experience": MagicMock(),
        "openrlhf.models": ModuleType("openrlhf.models"),
    }
    sys.modules.update(stubs)
    modules = {}
    for name, file in (
        ("openrlhf.models.utils", "models_utils.py"),
        ("openrlhf.trainer.ppo_utils.length_penalty", "length_penalty.py"),
        ("openrlhf.trainer.ppo_utils.experience_maker", "experience_maker.py"),
    ):
        spec = importlib.util.spec_from_file_location(name, PEER / file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        modules[name.rsplit(".", 1)[1]] = module
    yield SimpleNamespace(**modules)
    for name in [*stubs, *(f"openrlhf.{n}" for n in ("models.utils", "trainer.ppo_utils.length_penalty"))]:
        sys.modules.pop(name, None)  # only what was added here: other modules imported meanwhile stay
    sys.modules.pop("openrlhf.trainer.ppo_utils.experience_maker", None)
    sys.modules.update({k: v for k, v in saved.items() if k in stubs})


def _batch(seed: int, n: int = 6, t: int = 7):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])[:n]
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    old = -(torch.rand(n, t, generator=gen) * 2 + 0.05) * mask
    ref = -(torch.rand(n, t, generator=gen) * 2 + 0.05) * mask
    rewards = torch.randn(n, generator=gen)
    return mask, old, ref, rewards, lengths


def _maker(openrlhf, estimator: str, k: int, beta: float, gamma: float = 1.0, lambd: float = 1.0):
    maker = openrlhf.experience_maker.RemoteExperienceMaker.__new__(openrlhf.experience_maker.RemoteExperienceMaker)
    maker.advantage_estimator = estimator
    maker.kl_ctl = SimpleNamespace(value=beta)
    advantage = SimpleNamespace(estimator=estimator, gamma=gamma, lambd=lambd, no_std_norm=False)
    args = SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=k), reward=SimpleNamespace(clip_range=None),
        algo=SimpleNamespace(advantage=advantage),
    )  # fmt: skip
    maker.strategy = SimpleNamespace(args=args)
    return maker


@pytest.mark.parametrize(("estimator", "baseline"), [("reinforce", "none"), ("reinforce_baseline", "group")])
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_reinforce_pp_advantages_equal_openrlhfs(openrlhf, estimator, baseline, kl_estimator):
    """Two experiences (OpenRLHF's micro-batches) of 3 completions each, 2 prompts × K = 3: OpenRLHF whitens over
    every token of both, as reinforce_pp does over its batch."""
    mask, old, ref, rewards, _ = _batch(0)
    beta = 0.05
    kl = openrlhf.utils.compute_approx_kl(old, ref, kl_estimator=kl_estimator) * mask
    experiences = [
        SimpleNamespace(
            rewards=rewards[rows].clone(),
            index=list(rows),
            info={},
            kl=kl[rows],
            action_mask=mask[rows],
            values=None,
            response_length=mask[rows].sum(1),
        )  # fmt: skip
        for rows in (range(0, 3), range(3, 6))
    ]
    theirs = _maker(openrlhf, estimator, k=3, beta=beta).compute_advantages_and_returns(experiences)
    theirs = torch.cat([e.advantages for e in theirs])
    ours, _, _ = reinforce_pp_advantages(
        rewards.reshape(2, 3), mask, old, ref, beta=beta, kl_estimator=kl_estimator, baseline=baseline
    )
    assert torch.allclose(ours * mask, theirs * mask, atol=1e-5), (ours, theirs)


@pytest.mark.parametrize(("gamma", "lambd"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_equals_openrlhfs(openrlhf, gamma, lambd):
    mask, old, ref, rewards, _ = _batch(1)
    values = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))
    token_rewards = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3))
    maker = _maker(openrlhf, "gae", k=3, beta=0.0, gamma=gamma, lambd=lambd)
    advantages, returns = maker.get_advantages_and_returns(values, token_rewards, mask, gamma, lambd)
    ours, our_returns = gae(token_rewards, values, mask, gamma=gamma, lam=lambd)
    assert torch.allclose(ours, advantages * mask, atol=1e-6)
    assert torch.allclose(our_returns, returns * mask, atol=1e-6)


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_kl_estimators_equal_openrlhfs(openrlhf, kl_estimator):
    _, old, ref, _, _ = _batch(4)
    theirs = openrlhf.utils.compute_approx_kl(old, ref, kl_estimator=kl_estimator)
    assert torch.allclose(_kl(old - ref, kl_estimator), theirs, atol=1e-6)  # within OpenRLHF's ±10 clamp


def test_overlong_penalty_equals_openrlhfs(openrlhf):
    """DAPO's soft overlong punishment: OpenRLHF's apply_overlong_penalty vs the online source's shaping."""
    from prefopt.scoring import Scores
    from prefopt.settings import SamplingSettings
    from prefopt.sources import OnlineSource

    lengths = [3, 12, 13, 17, 20]
    experience = SimpleNamespace(rewards=torch.ones(5), response_length=torch.tensor(lengths), info={})
    openrlhf.length_penalty.apply_overlong_penalty([experience], 20, 8, 1.5)
    settings = SamplingSettings.from_mapping({"max_new_tokens": 20, "overlong_buffer": 8, "overlong_penalty": 1.5})
    sampled = {"scores": Scores(torch.ones(5), {}), "completions": [[7] * n for n in lengths], "ref_logps": None}
    ours = OnlineSource._shaped(SimpleNamespace(sampling=settings), sampled)
    assert torch.allclose(ours.float(), experience.rewards, atol=1e-6)
