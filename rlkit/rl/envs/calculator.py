"""calculator: multiplication problems with a calculator tool, a multi-turn environment.

The model may write `<calc>3*7*4</calc>`; its turn stops there, the environment appends
`<result>84</result>`, and the model continues (at most `max_turns` turns). The answer goes in
`<answer>...</answer>`. A model too small to multiply several numbers in its weights can still
copy the operands into a call and the result into its answer: the tool is what makes the task
solvable, and RL can discover that it pays.

The warm start's worked solutions use the tool in a fraction `tool_fraction` of the problems and
state the answer directly in the rest, so RL starts from a policy that calls the tool sometimes.

With `observation_role=tool` (for a chat model), the result comes back as a tool message in the
model's chat template, and the model answers in a new turn; by default it continues the model's
own turn as raw text (what the built-in byte models were trained with).
"""

from __future__ import annotations

import ast
import math
import operator
import random
import re
import zlib

from rlkit.rl.envs.base import Env, Grade, Problem
from rlkit.rl.graders.base import Grader
from rlkit.rl.graders.exact_match import ExactMatch

SYSTEM_PROMPT = "Multiply. Tool: <calc>2*3</calc>"
CALL_RE = re.compile(r"<calc>([^<]*)</calc>\s*$")
OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


class CalculatorEnv(Env):
    stop = ("</calc>",)

    def __init__(
        self,
        operands: int = 3,
        low: int = 2,
        high: int = 9,
        max_turns: int = 3,
        tool_fraction: float = 0.5,
        eval_size: int = 64,
        eval_seed: int = 1234,
        system_prompt: str = SYSTEM_PROMPT,
        observation_role: str | None = None,
        grader: Grader | None = None,
    ) -> None:
        if operands < 2:
            raise ValueError(f"env.operands must be >= 2, got {operands}")
        if not 0 <= low <= high:
            raise ValueError(f"env.low ({low}) must be >= 0 and <= env.high ({high})")
        if max_turns < 1:
            raise ValueError(f"env.max_turns must be >= 1, got {max_turns}")
        if not 0 <= tool_fraction <= 1:
            raise ValueError(f"env.tool_fraction must be in [0, 1], got {tool_fraction}")
        self.operands, self.low, self.high, self.max_turns = operands, low, high, max_turns
        self.tool_fraction, self.system_prompt = tool_fraction, system_prompt
        self.observation_role = observation_role
        self.grader = grader or ExactMatch()
        self._eval = self.sample(random.Random(eval_seed), eval_size, 0)

    def make(self, numbers: list[int]) -> Problem:
        messages = (
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": "*".join(map(str, numbers))},
        )
        return Problem(messages, str(math.prod(numbers)), {"operands": list(numbers)})

    def sample(self, rng: random.Random, n: int, step: int = 0) -> list[Problem]:
        return [
            self.make([rng.randint(self.low, self.high) for _ in range(self.operands)])
            for _ in range(n)
        ]

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def solution(self, problem: Problem) -> str | list[str]:
        """With the tool: [call, the env's result, answer] (the result is not trained on)."""
        question = problem.messages[-1]["content"]
        answer = f"<answer>{problem.answer}</answer>"
        # A fixed choice per problem (not Python's salted hash): the same problems use the tool
        # in every run.
        if zlib.crc32(question.encode()) % 1000 < self.tool_fraction * 1000:
            return [f"<calc>{question}</calc>", f"<result>{problem.answer}</result>", answer]
        return answer

    def step(self, problem: Problem, transcript: str) -> str | None:
        """A turn that ends in a call gets the result; any other turn ends the episode."""
        call = CALL_RE.search(transcript)
        if call is None:
            return None
        return f"<result>{calculate(call.group(1))}</result>"

    def grade(self, problem: Problem, completion: str) -> Grade:
        return self.grader(completion, problem.answer)

    def metrics(self, problem: Problem, transcript: str) -> dict[str, float]:
        calls = transcript.count("<result>")
        return {"tool_calls": calls, "tool_use": float(calls > 0)}


def calculate(expression: str) -> str:
    """+ - * / on numbers, evaluated from the syntax tree (never eval); "error" otherwise."""
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return "error"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.6g}"
    return str(int(value))


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        value = OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
        if abs(value) > 1e15:
            raise ValueError("too large")
        return value
    raise ValueError(f"unsupported: {ast.dump(node)[:40]}")
