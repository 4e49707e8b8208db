"""Advantage normalizers: a group's rewards (G,) -> one advantage per completion (G,).

Each is a plain function; configs point at it with `_target_` and may set its keyword arguments.
"""

from __future__ import annotations

import torch


def grpo(rewards_G: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - mean) / (std + eps) within the group."""
    return (rewards_G - rewards_G.mean()) / (rewards_G.std(unbiased=False) + eps)


def dr_grpo(rewards_G: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: r - mean, without the std division that favours low-variance groups."""
    return rewards_G - rewards_G.mean()


def rloo(rewards_G: torch.Tensor) -> torch.Tensor:
    """RLOO: r minus the mean of the *other* completions' rewards (needs G >= 2)."""
    g = rewards_G.shape[0]
    if g < 2:
        raise ValueError("rloo advantages need group_size >= 2")
    return rewards_G - (rewards_G.sum() - rewards_G) / (g - 1)


def none(rewards_G: torch.Tensor) -> torch.Tensor:
    """Raw rewards as advantages (plain REINFORCE, no baseline)."""
    return rewards_G.clone()
