"""The calculator tool env (rlkit.rl.envs.calculator): arithmetic and nothing else, tool calls
answered and counted, worked solutions as the episode's turns."""

import random

from rlkit.rl.envs.calculator import CalculatorEnv, calculate


def test_calculator_evaluates_arithmetic_and_nothing_else():
    assert calculate("12*37") == "444" and calculate(" 1/4 ") == "0.25"
    assert calculate("-(2+3)*4") == "-20" and calculate("6/3") == "2"
    for bad in ("__import__('os')", "2**99", "1/0", "x", "9" * 20 + "*" + "9" * 20, "1e400*1"):
        assert calculate(bad) == "error", bad


def test_calculator_env_answers_calls_and_counts_them():
    env = CalculatorEnv(eval_size=4)
    p = env.make([3, 7, 4])
    assert (p.messages[-1]["content"], p.answer) == ("3*7*4", "84")
    assert env.step(p, "<calc>3*7*4</calc>") == "<result>84</result>"
    transcript = "<calc>3*7*4</calc><result>84</result><answer>84</answer>"
    assert env.step(p, transcript) is None  # an answer ends the episode
    assert (
        env.step(p, "<calc>2*3</calc><result>6</result><calc>6*4</calc>") == "<result>24</result>"
    )
    assert env.grade(p, transcript).correct
    assert env.metrics(p, transcript) == {"tool_calls": 1, "tool_use": 1.0}
    solutions = [env.solution(q) for q in env.sample(random.Random(0), 200)]
    assert 70 < sum(isinstance(s, list) for s in solutions) < 130  # tool_fraction=0.5
    # A tool solution is the episode's turns: [call, the env's result, answer].
    assert env.solution(p) in (
        ["<calc>3*7*4</calc>", "<result>84</result>", "<answer>84</answer>"],
        "<answer>84</answer>",
    )
    for q in env.sample(random.Random(1), 20):
        solution = env.solution(q)
        assert env.grade(q, solution if isinstance(solution, str) else "".join(solution)).correct
