"""format: 1 when the completion states an answer in the grader's expected form, else 0."""

from rlkit.rl.envs.base import Problem
from rlkit.rl.graders.base import Grader
from rlkit.rl.graders.exact_match import ExactMatch


def format_reward(
    completions: list[str], problem: Problem, grader: Grader | None = None
) -> list[float]:
    grader = grader or ExactMatch()
    return [float(grader(c, problem.answer).formatted) for c in completions]
