"""arithmetic (rlkit.rl.envs.arithmetic, recipe=smollm2's task): problems, answers, tags and
grades, and bad arguments refused."""

import random

import pytest


def test_arithmetic_problems_answers_tags_and_grades():
    from rlkit.rl.envs.arithmetic import ArithmeticEnv

    env = ArithmeticEnv(ops=["+", "-", "*"], digits=[2, 1], template="What is {expression}?")
    problems = env.sample(random.Random(0), 300)
    assert {p.info["tag"] for p in problems} == {"add", "sub", "mul"}
    for p in problems:
        a, op, b = p.info["expression"].split()
        assert 10 <= int(a) <= 99 and 1 <= int(b) <= 9
        assert int(p.answer) == eval(f"{a}{op}{b}") >= 0  # noqa: S307 - the test's own oracle
        assert p.messages == ({"role": "user", "content": f"What is {p.info['expression']}?"},)
        # The default grader reads the last number written, as the model answers in prose.
        assert env.grade(p, f"{p.info['expression']} = {p.answer}").correct
        assert env.grade(p, env.solution(p)).correct
    assert not env.grade(problems[0], "I need to add the numbers").formatted
    assert env.sample(random.Random(5), 4) == env.sample(random.Random(5), 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ops": ["/"]}, r"env.ops must be a non-empty list of \['\*', '\+', '-'\]"),
        ({"digits": [2]}, "env.digits must be two digit counts"),
        ({"template": "What is it?"}, "env.template must contain {expression}"),
    ],
)
def test_arithmetic_refuses_bad_arguments(kwargs, message):
    from rlkit.rl.envs.arithmetic import ArithmeticEnv

    with pytest.raises(ValueError, match=message):
        ArithmeticEnv(**kwargs)
