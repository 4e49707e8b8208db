"""pair_sum (rlkit.rl.envs.pair_sum): problems, answers and grades by hand, sampling a function
of the RNG, and bad arguments refused."""

import random

import pytest

from rlkit.rl.envs.pair_sum import PairSumEnv

ENV = PairSumEnv(n_choices=[2, 4], low=1, high=4, eval_size=8)


def problem(numbers):
    return ENV.make(numbers)


def test_pair_sum_problems_answers_and_grades():
    p = problem([3, 4, 5, 1])
    assert p.answer == "42" and p.info["tag"] == "n4"
    assert ENV.grade(p, ENV.solution(p)).correct  # its own worked solution is right
    assert ENV.grade(p, "7*6=41 <answer>41</answer>") == ENV.grade(p, "<answer>41</answer>")
    wrong = ENV.grade(p, "<answer>41</answer>")
    assert not wrong.correct and wrong.formatted
    missing = ENV.grade(p, "42")
    assert not missing.correct and not missing.formatted


def test_pair_sum_sampling_is_a_function_of_the_rng():
    a = ENV.sample(random.Random(7), 5)
    assert a == ENV.sample(random.Random(7), 5)
    assert a != ENV.sample(random.Random(8), 5)
    assert all(1 <= n <= 4 for p in a for n in p.info["numbers"])
    assert ENV.eval_problems() == PairSumEnv(n_choices=[2, 4], low=1, high=4, eval_size=8)._eval


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_choices": [3]}, "even numbers"),
        ({"low": 5, "high": 4}, "must be <="),
        ({"eval_size": 0}, ">= 1"),
    ],
)
def test_pair_sum_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PairSumEnv(**kwargs)
