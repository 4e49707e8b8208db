"""Time limits on users' code (rlkit.rl.limits): a reward or an environment step that hangs
fails within plugin_timeout_s, naming itself; with on_reward_error=skip its group is skipped."""

import random

import pytest

from rlkit.api import types
from rlkit.rl.envs.base import EnvError
from rlkit.rl.envs.pair_sum import PairSumEnv
from rlkit.rl.rewards.base import RewardError, WeightedReward
from rlkit.rl.rollouts import Limits, sample_groups, score_groups
from tests.helpers import Echo


def test_a_reward_that_hangs_fails_its_group_within_the_limit(capsys):
    import re
    import time

    from rlkit.rl.rollouts import Episode, Group

    def backtracks(completions, problem):  # a user's regex: exponential on "aaa...b"
        text = "a" * 40 + ("b" if problem.answer == "2" else "")
        return [float(bool(re.match(r"(a+)+$", text))) for _ in completions]

    env = PairSumEnv(eval_size=2)
    episodes = [Episode(text="<answer>2</answer>"), Episode(text="x")]
    groups = [Group(env.make([1, 1]), [1], episodes), Group(env.make([2, 2]), [1], episodes)]
    rewards = [WeightedReward("slow", 1.0, backtracks)]
    started = time.monotonic()
    with pytest.raises(RewardError, match=r"^reward 'slow' did not return within plugin_timeout_s"):
        score_groups(groups, rewards, "raise", timeout_s=0.5)
    assert time.monotonic() - started < 30  # it would run for hours
    scores = score_groups(groups, rewards, "skip", step=3, timeout_s=0.5)
    assert scores[0] is None and scores[1].total == [1.0, 1.0]  # the timer was disarmed
    assert "RL step 3: skipped 1 of 2 groups" in capsys.readouterr().err


def test_an_env_step_that_hangs_is_the_envs_error(trainer):
    import time

    class Hangs(Echo):
        def step(self, problem, transcript):
            while True:  # a tool that never answers
                time.sleep(0.05)

    sampler = trainer.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=3, temperature=1.0)
    problems = Hangs().sample(random.Random(0), 1)
    limits = Limits(timeout_s=0.3)
    args = (sampler, trainer.get_tokenizer(), Hangs(), problems, 2, params, [1])
    message = r"env Hangs.step did not return within plugin_timeout_s=0.3 s \(problem"
    with pytest.raises(EnvError, match=message):
        sample_groups(*args, limits=limits)
    (group,) = sample_groups(*args, "skip", limits=limits)
    assert all("did not return within" in e.error for e in group.episodes)
