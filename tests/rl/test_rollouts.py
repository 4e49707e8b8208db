"""The pieces of one RL step (rlkit.rl.rollouts): datums, scores and metrics against numbers
worked out by hand; multi-turn episodes (the environment's tokens in context, out of the loss; an
env that raises, returns no text or fills the context is named or its group skipped); and the
held-out evaluation's pass@k."""

import math
import random

import pytest
import torch

from rlkit.api import types
from rlkit.rl.envs.base import EnvError
from rlkit.rl.envs.pair_sum import PairSumEnv
from rlkit.rl.rewards.base import RewardError, WeightedReward
from rlkit.rl.rewards.correct import correct_reward
from rlkit.rl.rollouts import (
    Episode,
    Group,
    Limits,
    evaluate,
    group_datums,
    logprob_gaps,
    mismatch_metrics,
    rollout_metrics,
    sample_groups,
    sample_records,
    score_groups,
)
from rlkit.rl.rollouts import mean as rollout_mean
from tests.helpers import Echo

ENV = PairSumEnv(n_choices=[2, 4], low=1, high=4, eval_size=8)


def problem(numbers):
    return ENV.make(numbers)


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


def test_a_multi_turn_datum_masks_every_environment_token(trainer):
    tokenizer = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=6, temperature=1.0)
    env = Echo()
    problems = env.sample(random.Random(0), 2)
    groups = sample_groups(sampler, tokenizer, env, problems, 2, params, [11, 12])
    datums = [d for g in groups for d in group_datums(g, torch.tensor([1.0, -2.0]))]
    observations = [tokenizer.encode(f"<obs {t}>", add_special_tokens=False) for t in (1, 2)]
    for group in groups:
        for episode, datum in zip(
            group.episodes, group_datums(group, torch.tensor([1.0, -2.0])), strict=True
        ):
            assert episode.turns == 3 and episode.text.count("<obs") == 2
            targets = datum.loss_fn_inputs["target_tokens"].tolist()
            advantages = datum.loss_fn_inputs["advantages"].tolist()
            logprobs = datum.loss_fn_inputs["logprobs"].tolist()
            start = len(group.prompt) - 1  # target index of the first token after the prompt
            assert targets[start:] == episode.tokens
            # Token by token: the model's tokens carry the advantage and the sampler's logprob,
            # the prompt's and the environment's carry neither.
            assert all(a == 0 for a in advantages[:start])
            for k, is_model in enumerate(episode.model_mask):
                assert (advantages[start + k] != 0) == is_model
                assert (logprobs[start + k] != 0) == is_model  # a sampled logprob is never 0
            env_tokens = [
                t for t, m in zip(episode.tokens, episode.model_mask, strict=True) if not m
            ]
            assert env_tokens == observations[0] + observations[1]
    # Later turns were sampled from the whole context: the trainer's logprobs of every model
    # token (all three turns) agree with the sampler's.
    out = trainer.forward_backward(datums, "importance_sampling").result()
    gaps = logprob_gaps(datums, out.loss_fn_outputs)
    assert gaps.numel() == sum(sum(e.model_mask) for g in groups for e in g.episodes)
    assert gaps.abs().max() < 1e-4


def test_single_turn_is_the_one_turn_case(trainer):
    tokenizer = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client()
    env = PairSumEnv(eval_size=2)
    params = types.SamplingParams(max_tokens=4, temperature=1.0)
    (group,) = sample_groups(
        sampler, tokenizer, env, env.sample(random.Random(0), 1), 3, params, [5]
    )
    assert [e.turns for e in group.episodes] == [1, 1, 1]
    assert all(all(e.model_mask) for e in group.episodes)


def test_an_env_that_raises_is_named_or_its_group_skipped(trainer, capsys):
    tokenizer = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=3, temperature=1.0)
    env = Echo(fail_on_turn=2)
    problems = env.sample(random.Random(0), 2)
    with pytest.raises(EnvError, match=r"env Echo.step raised KeyError: 'no such tool'.*turn 2"):
        sample_groups(sampler, tokenizer, env, problems, 2, params, [1, 2])
    groups = sample_groups(sampler, tokenizer, env, problems, 2, params, [1, 2], "skip")
    assert all(e.error and e.turns == 2 for g in groups for e in g.episodes)
    rewards = [WeightedReward("correct", 1.0, correct_reward)]
    ok = sample_groups(sampler, tokenizer, Echo(), problems, 2, params, [1, 2])
    scores = score_groups([groups[0], ok[0]], rewards, "raise", step=7)
    assert scores[0] is None and scores[1] is not None
    assert "RL step 7: skipped 1 of 2 groups" in capsys.readouterr().err
    with pytest.raises(RewardError, match="every group failed"):
        score_groups(groups, rewards, "raise", step=8)


class Endless(Echo):
    """Never ends the episode: each observation is `size` characters."""

    max_turns = 10**6

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def step(self, problem, transcript):
        return "o" * self.size


def test_an_episode_that_fills_the_context_ends_there_as_truncated(trainer):
    tokenizer = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client()
    context = trainer.get_info().max_context_length
    params = types.SamplingParams(max_tokens=8, temperature=1.0)
    env = Endless(size=300)
    problems = env.sample(random.Random(0), 2)
    groups = sample_groups(
        sampler, tokenizer, env, problems, 2, params, [3, 4], limits=Limits(context)
    )
    for group in groups:
        for episode in group.episodes:
            used = len(group.prompt) + len(episode.tokens)
            # Ended because the next observation did not fit, not by max_turns or an error.
            assert episode.truncated and episode.error is None and used <= context
            assert used + len(tokenizer.encode("o" * 300)) >= context and episode.turns > 3
    datums = [d for g in groups for d in group_datums(g, torch.tensor([1.0, -1.0]))]
    trainer.forward_backward(datums, "importance_sampling").result()  # every datum fits


def test_an_observation_that_alone_fills_the_context_names_the_env(trainer):
    tokenizer = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client()
    context = trainer.get_info().max_context_length
    params = types.SamplingParams(max_tokens=4, temperature=1.0)
    env = Endless(size=1_000_000)
    problems = env.sample(random.Random(0), 1)
    message = rf"env Endless.step returned an observation of 1000000 tokens .*context of {context}"
    with pytest.raises(EnvError, match=message):
        sample_groups(sampler, tokenizer, env, problems, 2, params, [1], limits=Limits(context))
    (group,) = sample_groups(
        sampler, tokenizer, env, problems, 2, params, [1], "skip", limits=Limits(context)
    )
    assert all("1000000 tokens" in e.error for e in group.episodes)


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (42, "env Bad.step returned int 42 .*it must return the observation as a str"),
        (b"obs", "env Bad.step returned bytes b'obs'"),
    ],
)
def test_an_observation_that_is_not_text_names_the_env(trainer, returned, message):
    class Bad(Echo):
        def step(self, problem, transcript):
            return returned

    sampler = trainer.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=3, temperature=1.0)
    problems = Bad().sample(random.Random(0), 1)
    with pytest.raises(EnvError, match=message):
        sample_groups(sampler, trainer.get_tokenizer(), Bad(), problems, 2, params, [1])


def test_eval_pass_at_k_and_env_metrics(trainer):
    tokenizer = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client()
    env = Echo()
    params = types.SamplingParams(max_tokens=3, temperature=1.0)
    m = evaluate(sampler, env, tokenizer, params, samples=3, seeds_P=[1, 2])
    assert m["eval/pass@3"] >= m["eval/accuracy"]
    assert m["eval/observations"] == 2.0  # every episode ran three turns
    assert {k for k in m if k.startswith("eval/pass@3/")} == {
        f"eval/pass@3/{p.info['tag']}" for p in env.eval_problems()
    }
    again = evaluate(sampler, env, tokenizer, params, samples=3, seeds_P=[1, 2])
    assert again == m  # seeded: the same episodes
    m_skip = evaluate(
        sampler,
        Echo(fail_on_turn=2),
        tokenizer,
        params,
        samples=3,
        seeds_P=[1, 2],
        on_env_error="skip",
    )
    assert m_skip["eval/env_errors"] == 6 and m_skip["eval/accuracy"] == 0.0
