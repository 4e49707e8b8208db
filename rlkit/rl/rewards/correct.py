"""correct: 1 when the grader says the completion's answer is right, else 0."""

from rlkit.rl.envs.base import Problem
from rlkit.rl.graders.base import Grader
from rlkit.rl.graders.exact_match import ExactMatch


def correct_reward(
    completions: list[str], problem: Problem, grader: Grader | None = None
) -> list[float]:
    grader = grader or ExactMatch()
    return [float(grader(c, problem.answer).correct) for c in completions]
