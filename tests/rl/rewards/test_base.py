"""The reward protocol (rlkit.rl.rewards.base): a group scored with weighted rewards, each
component kept, the answer parsed from its tag, bad return values named, Python, numpy and torch
numbers accepted; and the built-in rewards (format, correct, concise) by hand."""

import math

import numpy as np
import pytest
import torch

from rlkit.rl.envs.pair_sum import PairSumEnv
from rlkit.rl.rewards.base import RewardError, WeightedReward, parse_answer, score_group
from rlkit.rl.rewards.concise import concise_reward
from rlkit.rl.rewards.correct import correct_reward
from rlkit.rl.rewards.format import format_reward

ENV = PairSumEnv(n_choices=[2, 4], low=1, high=4, eval_size=8)


def problem(numbers):
    return ENV.make(numbers)


def test_parse_answer_takes_the_first_tag():
    assert parse_answer("x <answer> 12 </answer> <answer>3</answer>") == "12"
    assert parse_answer("no tag") is None


def test_builtin_rewards_by_hand():
    p = problem([1, 2, 3, 4])  # (1+2) * (3+4) = 21
    completions = ["<answer>21</answer>", "<answer>20</answer>", "21"]
    assert correct_reward(completions, p) == [1.0, 0.0, 0.0]
    assert format_reward(completions, p) == [1.0, 1.0, 0.0]
    # Only the correct one earns the bonus: 1 - 19 chars / 38.
    assert concise_reward(completions, p, max_chars=38) == [0.5, 0.0, 0.0]
    assert concise_reward(completions, p, max_chars=38, only_correct=False)[1] == 0.5


def test_score_group_weights_and_keeps_components():
    p = problem([1, 1])
    rewards = [
        WeightedReward("format", 0.1, format_reward),
        WeightedReward("correct", 1.0, correct_reward),
    ]
    scores = score_group(rewards, ["<answer>2</answer>", "<answer>3</answer>", "2"], p)
    assert scores.components == {"format": [1.0, 1.0, 0.0], "correct": [1.0, 0.0, 0.0]}
    assert scores.total == pytest.approx([1.1, 0.1, 0.0])


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda c, p: 1 / 0, "reward 'bad' raised ZeroDivisionError"),
        (lambda c, p: [1.0], "reward 'bad' returned 1 values for 2 completions"),
        (lambda c, p: [1.0, math.nan], "non-finite or non-numeric"),
        (lambda c, p: [1.0, "1"], "non-finite or non-numeric"),
        (lambda c, p: None, "returned NoneType None; it must return a list of 2 numbers"),
        (lambda c, p: 1.0, "returned float 1.0; it must return a list of 2 numbers"),
        # A dict iterates as its keys (0, 1): read as rewards, it trained on nonsense.
        (lambda c, p: {i: 1.0 for i in range(len(c))}, "returned dict {0: 1.0, 1: 1.0}; it must"),
        (lambda c, p: {0.5, 1.0}, "returned set"),
        (lambda c, p: (x for x in [1.0, 2.0]), "returned generator"),
        (lambda c, p: torch.ones(2, 1), r"returned a Tensor of shape \(2, 1\); it must return 2"),
        (lambda c, p: [[1.0], [2.0]], r"non-numeric values \[\[1.0\], \[2.0\]\] \(list\)"),
    ],
)
def test_a_bad_reward_is_named(fn, message):
    with pytest.raises(RewardError, match=message):
        score_group([WeightedReward("bad", 1.0, fn)], ["a", "b"], problem([1, 1]))


@pytest.mark.parametrize(
    "returned",
    [[1, 0.5], (True, 0.5), torch.tensor([1.0, 0.5]), np.array([1.0, 0.5]), [np.float32(1), 0.5]],
)
def test_a_reward_may_return_python_numpy_or_torch_numbers(returned):
    scores = score_group(
        [WeightedReward("r", 1.0, lambda c, p: returned)], ["a", "b"], problem([1, 1])
    )
    assert scores.total == [1.0, 0.5]


def test_rewards_may_return_numpy_or_torch_scalars():
    import numpy as np

    values = [np.float32(0.5), np.array(1.0), torch.tensor(2.0), 3]
    scores = score_group(
        [WeightedReward("r", 1.0, lambda c, p: values)], ["a"] * 4, problem([1, 1])
    )
    assert scores.total == [0.5, 1.0, 2.0, 3.0]
