"""correct: 1 when the tagged answer equals the problem's reference answer, else 0."""

from rlkit.rl.envs.base import Problem
from rlkit.rl.rewards.base import parse_answer


def correct_reward(completions: list[str], problem: Problem) -> list[float]:
    return [float(parse_answer(c) == problem.answer) for c in completions]
