"""arithmetic: questions such as "What is 47 + 38?", written the way a chat model reads them.

Each problem picks one of `ops` (`+`, `-`, `*`) and operands with `digits` digits each (a
subtraction's first operand is the larger, so answers are never negative). The prompt is a user
message from `template` (and an optional system message); the run's grader reads the answer (the
smollm2 recipe: the last number the completion writes). `tag` is the operation, so eval accuracy
splits by it (`eval/accuracy/add`, `/sub`, `/mul`). A worked solution is `47 + 38 = 85`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from rlkit.rl.envs.base import Env, Grade, Problem
from rlkit.rl.graders.base import Grader
from rlkit.rl.graders.numeric import Numeric

OPS = {"+": ("add", lambda a, b: a + b), "-": ("sub", lambda a, b: a - b), "*": ("mul", None)}


class ArithmeticEnv(Env):
    def __init__(
        self,
        ops: Sequence[str] = ("+",),
        digits: Sequence[int] = (2, 2),
        template: str = "What is {expression}?",
        system_prompt: str | None = None,
        eval_size: int = 100,
        eval_seed: int = 1234,
        grader: Grader | None = None,
    ) -> None:
        ops, digits = list(ops), list(digits)
        if not ops or any(op not in OPS for op in ops):
            raise ValueError(f"env.ops must be a non-empty list of {sorted(OPS)}, got {ops}")
        if len(digits) != 2 or any(not 1 <= d <= 9 for d in digits):
            raise ValueError(f"env.digits must be two digit counts in [1, 9], got {digits}")
        if "{expression}" not in template:
            raise ValueError(f"env.template must contain {{expression}}, got {template!r}")
        if eval_size < 1:
            raise ValueError(f"env.eval_size must be >= 1, got {eval_size}")
        self.ops, self.digits, self.template = ops, digits, template
        self.system_prompt = system_prompt
        self.grader = grader or Numeric(last_number=True)
        self._eval = self.sample(random.Random(eval_seed), eval_size)

    def make(self, a: int, op: str, b: int) -> Problem:
        if op == "-" and b > a:
            a, b = b, a
        answer = a * b if op == "*" else OPS[op][1](a, b)
        expression = f"{a} {op} {b}"
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        user = {"role": "user", "content": self.template.format(expression=expression)}
        info = {"expression": expression, "tag": OPS[op][0]}
        return Problem(messages=(*system, user), answer=str(answer), info=info)

    def sample(self, rng: random.Random, n: int, step: int = 0) -> list[Problem]:
        low = [10 ** (d - 1) if d > 1 else 1 for d in self.digits]
        high = [10**d - 1 for d in self.digits]
        problems = []
        for _ in range(n):
            op = rng.choice(self.ops)
            a, b = rng.randint(low[0], high[0]), rng.randint(low[1], high[1])
            problems.append(self.make(a, op, b))
        return problems

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def solution(self, problem: Problem) -> str:
        return f"{problem.info['expression']} = {problem.answer}"

    def grade(self, problem: Problem, completion: str) -> Grade:
        return self.grader(completion, problem.answer)
