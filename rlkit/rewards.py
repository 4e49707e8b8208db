"""What a reward plugin imports: `from rlkit.rewards import Problem, RewardError, parse_answer`.

A reward is any callable `reward(completions: list[str], problem: Problem) -> list[float]`, one
value per completion of one problem (see `rlkit.rl.rewards.base`). Importing this module does
not import torch. The built-in rewards are in `rlkit/rl/rewards/`, one file each.
"""

from rlkit.rl.envs.base import Problem
from rlkit.rl.rewards.base import RewardError, parse_answer

__all__ = ["Problem", "RewardError", "parse_answer"]
