"""The environment protocol: a source of problems with known answers.

An environment makes training problems on demand from an RNG it is handed (so the trainer owns
all randomness), keeps a fixed held-out set for evaluation, can write a worked solution for the
supervised warm start, and grades a completion: whether it is correct is the task's knowledge,
not the loop's (it decides `train/accuracy` and `eval/accuracy`). How a completion is *rewarded*
is the reward functions' business.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Problem:
    # The chat messages that make up the prompt (system, user, ...).
    messages: tuple[dict[str, str], ...]
    # The reference answer, as text.
    answer: str
    # Anything a reward may want (operands, difficulty, ...).
    info: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Grade:
    """What the environment says of one completion."""

    # The completion's answer is the right one.
    correct: bool
    # The completion states an answer in the expected form (right or wrong).
    formatted: bool


class Env(Protocol):
    def sample(self, rng: random.Random, n: int) -> list[Problem]: ...

    def eval_problems(self) -> list[Problem]: ...

    def solution(self, problem: Problem) -> str: ...

    def grade(self, problem: Problem, completion: str) -> Grade: ...
