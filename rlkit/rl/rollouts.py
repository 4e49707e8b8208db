"""The pieces of one RL step, each one call from the loop: sample groups, score them, turn a
group and its advantages into datums, and the metrics a step reports.

Users' code (rewards, env steps, grading) runs through the client's `map_items`: once per
episode or group in all, however the client divides the work.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from rich.markup import escape

from rlkit.api import losses, types
from rlkit.client import map_items
from rlkit.rl.chat import observation_tokens
from rlkit.rl.envs.base import Env, EnvError, Grade, Problem, env_name
from rlkit.rl.limits import TimeLimitExceeded, time_limit
from rlkit.rl.rewards.base import GroupScores, RewardError, WeightedReward, score_group
from rlkit.rl.sft import prompt_tokens
from rlkit.run import seeds
from rlkit.run.outputs import console


@dataclass(frozen=True)
class Limits:
    """What bounds an episode and a call of users' code: the model's context in tokens (None:
    unbounded), and the seconds a reward, grader or env step may take (0: no limit)."""

    context: int | None = None
    timeout_s: float = 0.0


@dataclass
class Episode:
    """One completion of a prompt: the model's turns and the environment's observations, as the
    tokens after the prompt, the sampler's logprob of each (0 on the environment's), which are
    the model's, and the transcript (what rewards and `grade` read)."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    model_mask: list[bool] = field(default_factory=list)
    text: str = ""
    turns: int = 0
    # What the environment raised, when on_env_error=skip.
    error: str | None = None
    # A model turn ended at max_tokens rather than at a stop.
    truncated: bool = False
    # The tokens of the model's latest turn.
    last_turn: list[int] = field(default_factory=list)
    # The base model's logprob of each token (when a KL penalty asks for it).
    ref_logprobs: list[float] | None = None
    # Sum over the model's tokens of the KL(policy || base) estimate (when asked for).
    kl_ref: float | None = None

    def act(self, sequence: types.SampledSequence, tokenizer) -> None:
        self.truncated |= sequence.stop_reason == "length"
        self.last_turn = list(sequence.tokens)
        self.tokens += sequence.tokens
        self.logprobs += sequence.logprobs
        self.model_mask += [True] * len(sequence.tokens)
        self.text += tokenizer.decode(sequence.tokens, skip_special_tokens=True)
        self.turns += 1

    def observe(self, observation: str, tokens: list[int]) -> None:
        self.tokens += tokens
        self.logprobs += [0.0] * len(tokens)
        self.model_mask += [False] * len(tokens)
        self.text += observation

    def apply(self, outcome: Outcome) -> bool:
        """The environment's step (`_observe`'s outcome); True when the episode goes on."""
        if outcome.error is not None:
            self.error = outcome.error
        self.truncated |= outcome.truncated
        if outcome.tokens is None:
            return False
        self.observe(outcome.text, outcome.tokens)
        return True


@dataclass(frozen=True)
class Outcome:
    """What an environment step did to an episode: an observation to append (its text and
    tokens), or none: the episode ends (with an error, or truncated by the context)."""

    text: str = ""
    tokens: list[int] | None = None
    error: str | None = None
    truncated: bool = False


@dataclass
class Group:
    """One problem's rollouts: the prompt and `group_size` episodes from it, and the version of
    the policy that sampled them (the number of RL steps it had taken)."""

    problem: Problem
    prompt: list[int]
    episodes: list[Episode]
    version: int | None = None

    @property
    def completions(self) -> list[str]:
        return [e.text for e in self.episodes]


def sample_groups(
    sampler,
    tokenizer,
    env: Env,
    problems_P,
    group_size,
    params,
    seeds_P=None,
    on_env_error: str = "raise",
    limits: Limits | None = None,
) -> list[Group]:
    """`group_size` episodes per problem. The first turn is one request per problem; each later
    turn one request per episode still running, all of a turn's requests submitted before any
    result is read (the engine runs them as one batch). `seeds_P`: one sampling seed per
    problem (later turns derive theirs from it), so rollouts do not depend on call order.

    `limits.context`, the model's longest sequence: a turn's `max_tokens` shrinks to what is left of
    it, and an episode whose next observation would fill it ends there, counted as truncated
    (like a turn that hits `max_tokens`). A prompt or an observation that alone does not fit
    is the env's error (`on_env_error`), as is a step that runs past `limits.timeout_s`."""
    limits = limits or Limits()
    context = limits.context
    params = replace(params, stop=[*(params.stop or []), *env.stop] or None)
    groups = [
        Group(p, prompt_tokens(tokenizer, p.messages), [Episode() for _ in range(group_size)])
        for p in problems_P
    ]
    for group in groups:
        if context is not None and len(group.prompt) >= context:
            where = group.problem.info.get("where") or f"problem {_describe(group.problem)}"
            raise EnvError(
                f"env {env_name(env)}: {where}: the prompt is {len(group.prompt)} tokens, and "
                f"the model's context is {context}: nothing is left for the answer"
            )
    seeds_P = seeds_P or [params.seed] * len(groups)
    futures = [
        sampler.sample(
            types.ModelInput.from_ints(g.prompt),
            group_size,
            _fitted(_seeded(params, seed), len(g.prompt), context),
        )
        for g, seed in zip(groups, seeds_P, strict=True)
    ]
    for group, future in zip(groups, futures, strict=True):
        for episode, sequence in zip(group.episodes, future.result().sequences, strict=True):
            episode.act(sequence, tokenizer)
    live = [(i, j) for i in range(len(groups)) for j in range(group_size)]
    for turn in range(2, env.max_turns + 1):
        outcomes = map_items(
            lambda ij: _observe(
                env, groups[ij[0]], groups[ij[0]].episodes[ij[1]], tokenizer, on_env_error, limits
            ),
            live,
            "env steps",
        )
        live = [
            (i, j)
            for (i, j), outcome in zip(live, outcomes, strict=True)
            if groups[i].episodes[j].apply(outcome)
        ]
        if not live:
            break
        futures = []
        for i, j in live:
            tokens = groups[i].prompt + groups[i].episodes[j].tokens
            turn_params = _seeded(params, _turn_seed(seeds_P[i], turn, j))
            futures.append(
                sampler.sample(
                    types.ModelInput.from_ints(tokens),
                    1,
                    _fitted(turn_params, len(tokens), context),
                )
            )
        for (i, j), future in zip(live, futures, strict=True):
            groups[i].episodes[j].act(future.result().sequences[0], tokenizer)
    return groups


def _seeded(params: types.SamplingParams, seed: int | None) -> types.SamplingParams:
    return params if seed is None else replace(params, seed=seed)


def _fitted(params: types.SamplingParams, used: int, context: int | None):
    """`params` with max_tokens cut to what the context has left after `used` tokens."""
    if context is None or params.max_tokens is None or used + params.max_tokens <= context:
        return params
    return replace(params, max_tokens=context - used)


def _turn_seed(seed: int | None, turn: int, episode: int) -> int | None:
    return None if seed is None else seeds.derive_seed(seed, "turn", turn, episode)


def _describe(problem: Problem) -> str:
    return f"{problem.messages[-1]['content']!r:.80}"


def _observe(
    env: Env, group: Group, episode: Episode, tokenizer, on_env_error: str, limits: Limits
) -> Outcome:
    """The environment's answer to the episode's last turn (the episode is not changed here:
    `Episode.apply` does that, in every process)."""
    problem, context = group.problem, limits.context
    where = f"(problem {_describe(problem)}, turn {episode.turns})"
    try:
        try:
            with time_limit(limits.timeout_s, f"env {env_name(env)}.step"):
                observation = env.step(problem, episode.text)
        except TimeLimitExceeded as exc:
            raise EnvError(f"{exc} {where}") from None
        except Exception as exc:
            raise EnvError(
                f"env {env_name(env)}.step raised {type(exc).__name__}: {exc} {where}"
            ) from exc
        if observation is None:
            return Outcome()
        text, tokens = observation_tokens(env, observation, tokenizer, episode.last_turn, where)
        if context is not None and len(group.prompt) + len(tokens) >= context:
            raise EnvError(
                f"env {env_name(env)}.step returned an observation of {len(tokens)} tokens "
                f"{where}: with the prompt's {len(group.prompt)} it alone fills the model's "
                f"context of {context}"
            )
    except EnvError as exc:
        if on_env_error == "raise":
            raise EnvError(f"{exc}; on_env_error=skip skips the episode's group") from exc
        return Outcome(error=str(exc))
    if context is not None and len(group.prompt) + len(episode.tokens) + len(tokens) >= context:
        return Outcome(truncated=True)  # the context is full: the episode ends here
    return Outcome(text, list(tokens))


def score_groups(
    groups_P: list[Group],
    rewards: list[WeightedReward],
    on_error: str,
    step: int = 0,
    timeout_s: float = 0.0,
) -> list[GroupScores | None]:
    """Each group's rewards (each group scored once, see `map_items`). A reward that fails
    (raises, returns something else than one real number per completion, or runs past
    `timeout_s`) raises (on_error=raise), or its group is None (skip), with a warning for the
    step; so is a group where the environment failed (on_env_error=skip). A step where every
    group failed raises anyway: a run that trains on nothing must not look like one that
    trains."""

    def score(group: Group) -> GroupScores | str:
        env_error = next((e.error for e in group.episodes if e.error), None)
        if env_error:
            return env_error
        try:
            return score_group(rewards, group.completions, group.problem, timeout_s)
        except RewardError as exc:
            if on_error == "raise":
                raise
            return str(exc)

    results = map_items(score, groups_P, "rewards")
    errors = [r for r in results if isinstance(r, str)]
    if errors and len(errors) == len(groups_P):
        raise RewardError(
            f"RL step {step}: every group failed (first: {errors[0]}); on_reward_error=skip and "
            "on_env_error=skip skip failing groups, but none is left to train on"
        )
    if errors:
        console.print(
            f"[yellow]warning: RL step {step}: skipped {len(errors)} of {len(groups_P)} "
            f"groups whose reward or environment failed (first: {escape(errors[0])})",
            soft_wrap=True,
        )
    return [None if isinstance(r, str) else r for r in results]


def group_datums(
    group: Group, advantages_G: torch.Tensor, mask_truncated: bool = False
) -> list[types.Datum]:
    """One datum per episode: the sampler's logprobs, and the advantage on the model's tokens
    only (the prompt and the environment's observations carry none); `weights` 1 on the model's
    tokens and 0 elsewhere (0 throughout a truncated episode with `mask_truncated`), and the
    base model's logprobs when the episode has them."""
    datums = []
    n_prompt = len(group.prompt) - 1
    for episode, adv in zip(group.episodes, advantages_G.tolist(), strict=True):
        tokens = group.prompt + episode.tokens
        keep = not (mask_truncated and episode.truncated)
        inputs = {
            "target_tokens": tokens[1:],
            "logprobs": [0.0] * n_prompt + episode.logprobs,
            "advantages": [0.0] * n_prompt + [adv * m for m in episode.model_mask],
            "weights": [0.0] * n_prompt + [float(m and keep) for m in episode.model_mask],
        }
        if episode.ref_logprobs is not None:
            inputs["ref_logprobs"] = [0.0] * n_prompt + episode.ref_logprobs
        datums.append(
            types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)
        )
    return datums


def rollout_metrics(
    groups_P: list[Group], scores_P: list, env: Env, timeout_s: float = 0.0
) -> dict[str, float]:
    """Rewards (total and per reward), accuracy as the env grades it, lengths, entropy, and the
    env's own episode metrics (`env/NAME`). Accuracy and the env's metrics are over the groups
    that were scored: a group whose reward or environment failed is not graded again."""
    scored = [s for s in scores_P if s is not None]
    graded = [
        (g.problem, e)
        for g, s in zip(groups_P, scores_P, strict=True)
        if s is not None
        for e in g.episodes
    ]
    components: dict[str, list[float]] = {}
    for scores in scored:
        for name, values in scores.components.items():
            components.setdefault(name, []).extend(values)
    episodes = [(g.problem, e) for g in groups_P for e in g.episodes]
    model_logprobs = [
        lp for _, e in episodes for lp, m in zip(e.logprobs, e.model_mask, strict=True) if m
    ]
    judged = map_items(lambda pe: judge(env, pe[0], pe[1].text, timeout_s), graded, "grading")
    metrics = {
        "reward/mean": mean(v for s in scored for v in s.total),
        **{f"reward/{name}": mean(values) for name, values in components.items()},
        "train/accuracy": mean(g.correct for g, _ in judged),
        "train/completion_tokens": mean(sum(e.model_mask) for _, e in episodes),
        # Monte Carlo estimate of the sampler's per-token entropy: mean of -log p(sampled token).
        "train/entropy": -mean(model_logprobs),
        "train/failed_reward_groups": sum(s is None for s in scores_P),
    }
    if env.max_turns > 1:
        metrics["train/turns"] = mean(e.turns for _, e in episodes)
    metrics["train/truncated_frac"] = mean(e.truncated for _, e in episodes)
    if any(e.kl_ref is not None for _, e in episodes):
        # Per-token KL(policy || base) estimate, with the configured estimator.
        metrics["train/kl_ref"] = sum(e.kl_ref for _, e in episodes) / max(
            sum(sum(e.model_mask) for _, e in episodes), 1
        )
    return metrics | average([m for _, m in judged], "env")


def grade(env: Env, problem: Problem, transcript: str, timeout_s: float = 0.0) -> Grade:
    """`env.grade`, bounded by `timeout_s` and checked: an EnvError naming the env otherwise."""
    try:
        with time_limit(timeout_s, f"env {env_name(env)}.grade"):
            result = env.grade(problem, transcript)
    except TimeLimitExceeded as exc:
        raise EnvError(f"{exc} (problem {_describe(problem)})") from None
    if not isinstance(result, Grade):
        raise EnvError(
            f"env {env_name(env)}.grade returned {type(result).__name__} {result!r:.60}; it "
            "must return a Grade(correct, formatted)"
        )
    return result


def judge(
    env: Env, problem: Problem, transcript: str, timeout_s: float = 0.0
) -> tuple[Grade, dict[str, float]]:
    """The transcript's grade and the env's own metrics of it."""
    return grade(env, problem, transcript, timeout_s), episode_metrics(
        env, problem, transcript, timeout_s
    )


def episode_metrics(
    env: Env, problem: Problem, transcript: str, timeout_s: float = 0.0
) -> dict[str, float]:
    """`env.metrics`, bounded by `timeout_s` and checked: an EnvError naming the env otherwise."""
    try:
        with time_limit(timeout_s, f"env {env_name(env)}.metrics"):
            found = env.metrics(problem, transcript)
    except TimeLimitExceeded as exc:
        raise EnvError(f"{exc} (problem {_describe(problem)})") from None
    if not isinstance(found, Mapping) or not all(
        isinstance(v, numbers.Real) for v in found.values()
    ):
        raise EnvError(
            f"env {env_name(env)}.metrics returned {type(found).__name__} {found!r:.60}; it "
            "must return a dict of names to numbers"
        )
    return {name: float(value) for name, value in found.items()}


def average(episodes: list[dict[str, float]], prefix: str) -> dict[str, float]:
    """The episodes' env metrics, each averaged over the episodes that have it, as
    `PREFIX/NAME`."""
    values: dict[str, list[float]] = {}
    for found in episodes:
        for name, value in found.items():
            values.setdefault(f"{prefix}/{name}", []).append(value)
    return {name: mean(v) for name, v in sorted(values.items())}


def logprob_gaps(datums_D, outputs) -> torch.Tensor:
    """Trainer minus sampler logprob of every trained token (those with an advantage)."""
    return gaps_and_sums(datums_D, outputs)[0]


def gaps_and_sums(datums_D, outputs) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprob_gaps`, and each datum's sum of its gaps: the log of its sequence's importance
    ratio."""
    diffs = []
    for datum, out in zip(datums_D, outputs, strict=True):
        mask = datum.loss_fn_inputs["advantages"].to_torch() != 0
        sampler_lp = datum.loss_fn_inputs["logprobs"].to_torch()[mask]
        diffs.append((out["logprobs"].to_torch()[mask] - sampler_lp).double())
    sums = torch.tensor([float(d.sum()) for d in diffs], dtype=torch.float64)
    return torch.cat([torch.zeros(0, dtype=torch.float64), *diffs]), sums


def ratio_metrics(gaps: torch.Tensor, seq_gaps: torch.Tensor, config: dict) -> dict[str, float]:
    """The importance ratio exp(trainer - sampler) of the trained tokens (its spread: std,
    min, max) and the fractions the off-policy masks drop (`loss.config.seq_mask_cap`,
    `token_mask_low` / `token_mask_high`; see rlkit.api.losses)."""
    ratio = gaps.double().exp()
    metrics = {
        "train/is_ratio_std": float(ratio.std()) if len(ratio) > 1 else 0.0,
        "train/is_ratio_min": float(ratio.min()) if len(ratio) else None,
        "train/is_ratio_max": float(ratio.max()) if len(ratio) else None,
    }
    cap = config.get("seq_mask_cap", 0.0)
    if cap:
        masked = losses.sequence_masked(seq_gaps, cap)
        metrics["train/seq_masked_frac"] = float(masked.double().mean())
    low, high = config.get("token_mask_low", 0.0), config.get("token_mask_high", 0.0)
    if high:
        kept = losses.token_kept(gaps.double(), low, high)
        metrics["train/token_masked_frac"] = float((~kept).double().mean())
    return metrics


def mismatch_metrics(gaps: torch.Tensor, tis_cap: float = 0.0) -> dict[str, float]:
    """How far the trainer's logprobs are from the sampler's on the sampled tokens (`gaps`, from
    `logprob_gaps`), and how often a truncated-IS cap (`loss.config.tis_cap`, 0 = off) clipped
    the token weight."""
    d = gaps.double()
    # k3 estimator of KL(sampler || trainer): exp(d) - 1 - d, unbiased and >= 0.
    capped = losses.tis_capped(d, tis_cap).double().mean() if tis_cap else None
    return {
        "train/logprob_mismatch": float(d.abs().mean()),
        "train/kl_sampler_trainer": float((d.exp() - 1 - d).mean()),
        "train/tis_capped_frac": None if capped is None else float(capped),
    }


def evaluate(
    sampler,
    env: Env,
    tokenizer,
    params: types.SamplingParams,
    samples: int = 1,
    seeds_P: list[int] | None = None,
    on_env_error: str = "raise",
    limits: Limits | None = None,
) -> dict[str, float]:
    """Accuracy and format rate on the env's fixed held-out problems, as the env grades them, at
    `params.temperature` (the run's `eval_temperature`): `samples` episodes per problem, and
    `eval/pass@K` (a problem counts when any of its K is correct) when K > 1. Split by kind when
    the env tags its problems (`info["tag"]`), plus the env's own episode metrics. An episode
    whose environment failed (on_env_error=skip) counts as wrong (`eval/env_errors`)."""
    problems = env.eval_problems()
    groups = sample_groups(
        sampler, tokenizer, env, problems, samples, params, seeds_P, on_env_error, limits
    )
    timeout_s = (limits or Limits()).timeout_s
    judged = map_items(
        lambda pe: _judge_eval(env, pe[0], pe[1], timeout_s, on_env_error),
        [(g.problem, e) for g in groups for e in g.episodes],
        "eval grading",
    )
    results = [
        (
            i,
            [grade for grade, _ in judged[i * samples : (i + 1) * samples]],
            g.problem.info.get("tag"),
        )
        for i, g in enumerate(groups)
    ]
    metrics = _accuracy(results, samples, "")
    by_tag: dict[str, list] = {}
    for result in results:
        if result[2] is not None:
            by_tag.setdefault(str(result[2]), []).append(result)
    for tag, tagged in sorted(by_tag.items()):
        metrics |= {f"{k}/{tag}": v for k, v in _accuracy(tagged, samples, tag).items()}
    if any(g is None for _, grades, _ in results for g in grades):
        metrics["eval/env_errors"] = sum(g is None for _, grades, _ in results for g in grades)
    return metrics | average([m for _, m in judged if m is not None], "eval")


def _judge_eval(
    env: Env, problem: Problem, episode: Episode, timeout_s: float, on_env_error: str
) -> tuple[Grade | None, dict[str, float] | None]:
    """The episode's grade and env metrics; (None, None), counted in eval/env_errors, when its
    env failed, or when grading it failed and on_env_error=skip."""
    if episode.error:
        return None, None
    try:
        found = grade(env, problem, episode.text, timeout_s)
    except EnvError:
        if on_env_error == "raise":
            raise
        return None, None
    return found, episode_metrics(env, problem, episode.text, timeout_s)


def _accuracy(results, samples: int, tag: str) -> dict[str, float]:
    """Mean accuracy and format over every episode, and pass@K over problems."""
    grades = [g for _, grades, _ in results for g in grades]
    metrics = {
        "eval/accuracy": mean(g is not None and g.correct for g in grades),
        "eval/format": mean(g is not None and g.formatted for g in grades),
    }
    if samples > 1:
        passed = [any(g is not None and g.correct for g in grades) for _, grades, _ in results]
        metrics[f"eval/pass@{samples}"] = mean(passed)
    if tag:  # per kind: accuracy and pass@K only
        metrics.pop("eval/format")
    return metrics


def sample_records(step: int, groups_P: list[Group], n_groups: int = 2, n_each: int = 2):
    """A few completions of the step, for samples.jsonl."""
    return [
        {
            "step": step,
            "prompt": g.problem.messages[-1]["content"],
            "answer": g.problem.answer,
            "completion": completion,
        }
        for g in groups_P[:n_groups]
        for completion in g.completions[:n_each]
    ]


def mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else math.nan
