"""Unit tests of the algorithm half (rlkit.rl): advantages, rewards, the env, datums, the step's
metrics and the learning-rate schedule, each against numbers worked out by hand."""

import math
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rlkit.api import types
from rlkit.rl import advantages
from rlkit.rl.envs.pair_sum import PairSumEnv
from rlkit.rl.loop import learning_rate
from rlkit.rl.rewards.base import RewardError, WeightedReward, parse_answer, score_group
from rlkit.rl.rewards.concise import concise_reward
from rlkit.rl.rewards.correct import correct_reward
from rlkit.rl.rewards.format import format_reward
from rlkit.rl.rollouts import (
    Episode,
    Group,
    group_datums,
    logprob_gaps,
    mismatch_metrics,
    rollout_metrics,
    sample_records,
    score_groups,
)
from rlkit.rl.rollouts import mean as rollout_mean
from rlkit.rl.sft import completion_datum

ENV = PairSumEnv(n_choices=[2, 4], low=1, high=4, eval_size=8)


def problem(numbers):
    return ENV.make(numbers)


# ---- advantages -----------------------------------------------------------------------------
def test_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])  # mean 0.5, population std 0.5
    torch.testing.assert_close(advantages.grpo(r, eps=0.0), torch.tensor([1.0, -1.0, -1.0, 1.0]))
    torch.testing.assert_close(advantages.dr_grpo(r), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # RLOO: r_i minus the mean of the other three: 1 - 1/3, 0 - 2/3.
    torch.testing.assert_close(
        advantages.rloo(r), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(advantages.none(r), r)


def test_rloo_needs_two_completions():
    with pytest.raises(ValueError, match="group_size >= 2"):
        advantages.rloo(torch.tensor([1.0]))


# ---- rewards ----------------------------------------------------------------------------------
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


# ---- the environment --------------------------------------------------------------------------
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


# ---- datums and the step's metrics -------------------------------------------------------------
def seq(tokens, logprobs, reason="stop"):
    return types.SampledSequence(reason, tokens, logprobs)


def ep(tokens=(), logprobs=(), text=""):
    """A one-turn episode."""
    return Episode(list(tokens), list(logprobs), [True] * len(tokens), text, 1)


def texts(*completions):
    return [ep(text=c) for c in completions]


def test_group_datums_put_the_advantage_on_completion_tokens_only():
    group = Group(problem([1, 1]), [5, 6, 7], [ep([8, 9], [-0.5, -0.25]), ep([10], [-1.0])])
    d0, d1 = group_datums(group, torch.tensor([2.0, -2.0]))
    assert d0.model_input.to_ints() == [5, 6, 7, 8]  # position i predicts token i + 1
    assert d0.loss_fn_inputs["target_tokens"].tolist() == [6, 7, 8, 9]
    assert d0.loss_fn_inputs["advantages"].tolist() == [0.0, 0.0, 2.0, 2.0]
    assert d0.loss_fn_inputs["logprobs"].tolist() == [0.0, 0.0, -0.5, -0.25]
    assert d1.loss_fn_inputs["target_tokens"].tolist() == [6, 7, 10]
    assert d1.loss_fn_inputs["advantages"].tolist() == [0.0, 0.0, -2.0]


def test_mismatch_metrics_by_hand():
    group = Group(problem([1, 1]), [5, 6], [ep([8, 9], [-1.0, -1.0])])
    (datum,) = group_datums(group, torch.tensor([1.0]))
    # Trainer logprobs on the two completion tokens: gaps d = +0.5 and -0.5 (prompt ignored).
    out = {"logprobs": types.TensorData.from_list([-9.0, -0.5, -1.5])}
    gaps = logprob_gaps([datum], [out])
    assert gaps.tolist() == [0.5, -0.5]
    m = mismatch_metrics(gaps, tis_cap=1.5)
    assert m["train/logprob_mismatch"] == pytest.approx(0.5)
    k3 = ((math.exp(0.5) - 1 - 0.5) + (math.exp(-0.5) - 1 + 0.5)) / 2
    assert m["train/kl_sampler_trainer"] == pytest.approx(k3)
    assert m["train/tis_capped_frac"] == 0.5  # exp(0.5) = 1.65 > 1.5; exp(-0.5) is not
    assert mismatch_metrics(gaps)["train/tis_capped_frac"] is None


def test_score_groups_raises_or_skips_a_failing_reward(capsys):
    groups = [Group(problem([1, 1]), [1], texts("<answer>2</answer>", "x"))] * 2
    bad = [WeightedReward("bad", 1.0, lambda c, p: 1 / 0)]
    with pytest.raises(RewardError, match="reward 'bad' raised ZeroDivisionError"):
        score_groups(groups, bad, "raise")
    # skip: failed groups are None, with a warning; a step where all failed still stops.
    with pytest.raises(RewardError, match="RL step 3: every group failed"):
        score_groups(groups, bad, "skip", step=3)
    flaky = [WeightedReward("flaky", 1.0, lambda c, p: [1 / (p.info["numbers"][0] - 1)] * 2)]
    mixed = [
        Group(problem([1, 1]), [1], texts("a", "b")),
        Group(problem([2, 1]), [1], texts("a", "b")),
    ]
    scores = score_groups(mixed, flaky, "skip", step=4)
    assert scores[0] is None and scores[1].total == [1.0, 1.0]
    assert (
        "RL step 4: skipped 1 of 2 groups whose reward or environment failed"
        in capsys.readouterr().err
    )


def test_rewards_may_return_numpy_or_torch_scalars():
    import numpy as np

    values = [np.float32(0.5), np.array(1.0), torch.tensor(2.0), 3]
    scores = score_group(
        [WeightedReward("r", 1.0, lambda c, p: values)], ["a"] * 4, problem([1, 1])
    )
    assert scores.total == [0.5, 1.0, 2.0, 3.0]


def test_rollout_metrics_use_the_env_grade():
    p = problem([1, 2])  # 3
    g = Group(p, [1], [ep([1, 2], [-1.0, -3.0], "<answer>3</answer>"), ep([3], [-2.0], "4")])
    rewards = [WeightedReward("correct", 1.0, correct_reward)]
    scores_P = score_groups([g, g], rewards, "skip")
    m = rollout_metrics([g, g], [scores_P[0], None], ENV)
    assert m["reward/mean"] == 0.5 and m["reward/correct"] == 0.5  # the failed group left out
    assert m["train/accuracy"] == 0.5  # every group graded, failed or not
    assert m["train/completion_tokens"] == 1.5
    assert m["train/entropy"] == pytest.approx(2.0)
    assert m["train/failed_reward_groups"] == 1


def test_sample_records_and_mean():
    g = Group(problem([1, 2]), [1], texts("a", "b", "c"))
    records = sample_records(4, [g, g, g])
    assert len(records) == 4 and records[0] == {
        "step": 4,
        "prompt": "1 2",
        "answer": "3",
        "completion": "a",
    }
    assert math.isnan(rollout_mean([]))


def test_linear_schedule_decays_to_zero_after_the_last_step():
    cfg = OmegaConf.create({"steps": 4, "optim": {"lr": 1.0, "schedule": "linear"}})
    assert [learning_rate(cfg, s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    cfg.optim.schedule = "constant"
    assert {learning_rate(cfg, s) for s in range(4)} == {1.0}


def test_completion_datum_trains_on_the_reply_only():
    from rlkit.backend.models import build_tokenizer

    tok = build_tokenizer()
    prompt = [1, 2, 3]
    datum = completion_datum(tok, prompt, "ok")
    reply = tok.encode("ok", add_special_tokens=False) + [tok.eos_token_id]
    assert datum.model_input.to_ints() == prompt + reply[:-1]
    assert datum.loss_fn_inputs["weights"].tolist() == [0.0, 0.0] + [1.0] * len(reply)
