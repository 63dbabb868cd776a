"""Shared fixtures: the golden batch of tests/losses/test_golden.py (three pairs, β = 0.1) in float64."""

import pytest
import torch


@pytest.fixture
def golden_batch() -> dict[str, torch.Tensor]:
    f64 = torch.float64
    return {
        "policy_chosen_logps": torch.tensor([-10.0, -25.0, -7.5], dtype=f64),
        "policy_rejected_logps": torch.tensor([-12.0, -24.0, -9.0], dtype=f64),
        "ref_chosen_logps": torch.tensor([-11.0, -24.5, -8.0], dtype=f64),
        "ref_rejected_logps": torch.tensor([-11.5, -24.2, -8.6], dtype=f64),
        "chosen_lengths": torch.tensor([5, 10, 3]),
        "rejected_lengths": torch.tensor([6, 8, 4]),
    }
