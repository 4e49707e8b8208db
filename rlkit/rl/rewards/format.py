"""format: 1 when the completion has a parsable `<answer>...</answer>` tag, else 0."""

from rlkit.rl.envs.base import Problem
from rlkit.rl.rewards.base import parse_answer


def format_reward(completions: list[str], problem: Problem) -> list[float]:
    return [float(parse_answer(c) is not None) for c in completions]
