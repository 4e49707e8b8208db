"""concise: a bonus for short completions, 1 at zero characters falling to 0 at `max_chars`.

Only correct completions earn it when `only_correct` is set, so brevity never beats accuracy.
"""

from rlkit.rl.envs.base import Problem
from rlkit.rl.rewards.base import parse_answer


def concise_reward(
    completions: list[str], problem: Problem, max_chars: int = 64, only_correct: bool = True
) -> list[float]:
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    return [
        0.0
        if only_correct and parse_answer(c) != problem.answer
        else max(0.0, 1.0 - len(c) / max_chars)
        for c in completions
    ]
