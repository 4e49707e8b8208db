"""Advantages (rlkit.rl.advantages) against numbers worked out by hand."""

import pytest
import torch

from rlkit.rl import advantages


def test_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])  # mean 0.5, population std 0.5
    torch.testing.assert_close(advantages.grpo(r, eps=0.0), torch.tensor([1.0, -1.0, -1.0, 1.0]))
    torch.testing.assert_close(advantages.dr_grpo(r), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # RLOO: r_i minus the mean of the other three: 1 - 1/3, 0 - 2/3.
    torch.testing.assert_close(
        advantages.rloo(r), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(advantages.none(r), r)


def test_rloo_needs_two_completions():
    with pytest.raises(ValueError, match="group_size >= 2"):
        advantages.rloo(torch.tensor([1.0]))
