"""pair_sum: add adjacent pairs of numbers, then multiply the sums.

`3 4 5 1` -> (3+4) * (5+1) = 42, answered as `<answer>42</answer>`. With two numbers it is plain
addition. Difficulty knobs: how many numbers (`n_choices`, even counts) and their range.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from rlkit.rl.envs.base import Env, Grade, Problem
from rlkit.rl.graders.base import Grader
from rlkit.rl.graders.exact_match import ExactMatch

SYSTEM_PROMPT = (
    "Add adjacent pairs of numbers, then multiply the sums. "
    "Example: 3 4 5 1 -> 3+4=7 5+1=6 7*6=42 <answer>42</answer>"
)


class PairSumEnv(Env):
    def __init__(
        self,
        n_choices: Sequence[int] = (2, 4),
        low: int = 1,
        high: int = 9,
        eval_size: int = 64,
        eval_seed: int = 1234,
        system_prompt: str = SYSTEM_PROMPT,
        grader: Grader | None = None,
    ) -> None:
        n_choices = list(n_choices)
        if not n_choices or any(n < 2 or n % 2 for n in n_choices):
            raise ValueError(f"env.n_choices must be even numbers >= 2, got {n_choices}")
        if low > high:
            raise ValueError(f"env.low ({low}) must be <= env.high ({high})")
        if eval_size < 1:
            raise ValueError(f"env.eval_size must be >= 1, got {eval_size}")
        self.n_choices, self.low, self.high = n_choices, low, high
        self.system_prompt = system_prompt
        self.grader = grader or ExactMatch()
        self._eval = self.sample(random.Random(eval_seed), eval_size)

    def make(self, numbers: Sequence[int]) -> Problem:
        sums = [a + b for a, b in zip(numbers[::2], numbers[1::2], strict=True)]
        messages = (
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": " ".join(map(str, numbers))},
        )
        # `tag` splits the eval accuracy by problem size (eval/accuracy/n2, eval/accuracy/n4, ...).
        info = {"numbers": list(numbers), "sums": sums, "tag": f"n{len(numbers)}"}
        return Problem(messages=messages, answer=str(math.prod(sums)), info=info)

    def sample(self, rng: random.Random, n: int, step: int = 0) -> list[Problem]:
        return [
            self.make([rng.randint(self.low, self.high) for _ in range(rng.choice(self.n_choices))])
            for _ in range(n)
        ]

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def solution(self, problem: Problem) -> str:
        numbers, sums = problem.info["numbers"], problem.info["sums"]
        steps = [f"{a}+{b}={s}" for a, b, s in zip(numbers[::2], numbers[1::2], sums, strict=True)]
        product, total = sums[0], sums[0]
        for s in sums[1:]:
            total = product * s
            steps.append(f"{product}*{s}={total}")
            product = total
        return " ".join(steps) + f" <answer>{problem.answer}</answer>"

    def grade(self, problem: Problem, completion: str) -> Grade:
        """As the grader says (by default: the first `<answer>...</answer>` tag holds the
        answer, and it must equal the reference)."""
        return self.grader(completion, problem.answer)
