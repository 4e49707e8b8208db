"""The pieces of one RL step, each one call from the loop: sample groups, score them, turn a
group and its advantages into datums, and the metrics a step reports.

With several processes, each one holds a `Share` of the step (its groups, their scores, its
datums' logprob gaps); the main process merges them back into the order one process would have,
so the metrics are computed exactly as in a single-process run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from rich.markup import escape

from rlkit.api import losses, types
from rlkit.client import Processes
from rlkit.rl.envs.base import Env, Problem
from rlkit.rl.rewards.base import GroupScores, RewardError, WeightedReward, score_group
from rlkit.rl.sft import prompt_tokens
from rlkit.run.outputs import console


@dataclass
class Group:
    """One problem's rollouts: the prompt and `group_size` sampled completions."""

    problem: Problem
    prompt: list[int]
    sequences: list[types.SampledSequence]
    completions: list[str]


def sample_groups(sampler, tokenizer, problems_P, group_size, params, seeds_P=None) -> list[Group]:
    """`seeds_P`: one sampling seed per problem, so rollouts do not depend on call order. Every
    request is submitted before any result is read, so the engine runs them as one batch."""
    futures = []
    for i, problem in enumerate(problems_P):
        prompt = prompt_tokens(tokenizer, problem.messages)
        model_input = types.ModelInput.from_ints(prompt)
        request = params if seeds_P is None else replace(params, seed=seeds_P[i])
        futures.append((problem, prompt, sampler.sample(model_input, group_size, request)))
    groups = []
    for problem, prompt, future in futures:
        sequences = future.result().sequences
        completions = [tokenizer.decode(s.tokens, skip_special_tokens=True) for s in sequences]
        groups.append(Group(problem, prompt, sequences, completions))
    return groups


def score_groups(
    groups_P: list[Group],
    rewards: list[WeightedReward],
    on_error: str,
    step: int = 0,
    processes: Processes | None = None,
) -> list[GroupScores | None]:
    """Each group's rewards. A reward that fails raises (on_error=raise), or its group is
    None (skip), with a warning for the step; a step where every group failed (in every process)
    raises anyway: a run that trains on nothing must not look like one that trains."""
    processes = processes or Processes()
    scores_P, errors = [], []
    for group in groups_P:
        try:
            scores_P.append(score_group(rewards, group.completions, group.problem))
        except RewardError as exc:
            if on_error == "raise":
                raise
            scores_P.append(None)
            errors.append(str(exc))
    if on_error != "raise":  # every process gets here: count the failures everywhere
        failed = processes.sum(len(errors), "failed reward count")
        if failed and failed == processes.sum(len(groups_P), "group count"):
            first = errors[0] if errors else "in another process"
            raise RewardError(
                f"RL step {step}: the reward failed in every group (first: {first}); "
                "on_reward_error=skip skips failing groups, but none is left to train on"
            )
    if errors:
        where = f" (rank {processes.rank})" if processes.world_size > 1 else ""
        console.print(
            f"[yellow]warning: RL step {step}{where}: skipped {len(errors)} of {len(groups_P)} "
            f"groups whose reward failed (first: {escape(errors[0])})",
            soft_wrap=True,
        )
    return scores_P


def group_datums(group: Group, advantages_G: torch.Tensor) -> list[types.Datum]:
    """One datum per completion: sampler logprobs and the advantage on completion tokens only."""
    datums = []
    n_prompt = len(group.prompt) - 1
    for seq, adv in zip(group.sequences, advantages_G.tolist(), strict=True):
        tokens = group.prompt + seq.tokens
        datums.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                    "advantages": [0.0] * n_prompt + [adv] * len(seq.tokens),
                },
            )
        )
    return datums


def rollout_metrics(groups_P: list[Group], scores_P: list, env: Env) -> dict[str, float]:
    """Rewards (total and per reward), accuracy as the env grades it, lengths, entropy."""
    scored = [s for s in scores_P if s is not None]
    components: dict[str, list[float]] = {}
    for scores in scored:
        for name, values in scores.components.items():
            components.setdefault(name, []).extend(values)
    sequences = [s for g in groups_P for s in g.sequences]
    correct = [env.grade(g.problem, c).correct for g in groups_P for c in g.completions]
    return {
        "reward/mean": mean(v for s in scored for v in s.total),
        **{f"reward/{name}": mean(values) for name, values in components.items()},
        "train/accuracy": mean(correct),
        "train/completion_tokens": mean(len(s.tokens) for s in sequences),
        # Monte Carlo estimate of the sampler's per-token entropy: mean of -log p(sampled token).
        "train/entropy": -mean(lp for s in sequences for lp in s.logprobs),
        "train/failed_reward_groups": sum(s is None for s in scores_P),
    }


def logprob_gaps(datums_D, outputs) -> torch.Tensor:
    """Trainer minus sampler logprob of every trained token (those with an advantage)."""
    diffs = [torch.zeros(0, dtype=torch.float64)]
    for datum, out in zip(datums_D, outputs, strict=True):
        mask = datum.loss_fn_inputs["advantages"].to_torch() != 0
        sampler_lp = datum.loss_fn_inputs["logprobs"].to_torch()[mask]
        diffs.append((out["logprobs"].to_torch()[mask] - sampler_lp).double())
    return torch.cat(diffs)


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


@dataclass
class Share:
    """One process's part of an RL step: which of the step's groups it had (their indices),
    the groups, their scores, how many it skipped, and its trained tokens' logprob gaps."""

    indices: list[int]
    groups: list[Group]
    scores: list[GroupScores | None]
    skipped: int = 0
    gaps: torch.Tensor | None = None
    loss: float = 0.0


def merge(shares: list[Share]) -> Share:
    """The processes' shares as one, groups in the step's order (as one process has them)."""
    order = sorted(
        (i, group, scores)
        for share in shares
        for i, group, scores in zip(share.indices, share.groups, share.scores, strict=True)
    )
    gaps = [s.gaps for s in shares if s.gaps is not None]
    return Share(
        indices=[i for i, _, _ in order],
        groups=[g for _, g, _ in order],
        scores=[sc for _, _, sc in order],
        skipped=sum(s.skipped for s in shares),
        gaps=torch.cat(gaps) if gaps else None,
        loss=sum(s.loss for s in shares),
    )


def evaluate(
    sampler, env: Env, tokenizer, params: types.SamplingParams, processes: Processes | None = None
) -> dict[str, float]:
    """Greedy accuracy and format rate on the env's fixed held-out problems, as the env grades
    them, plus the accuracy per problem kind when the env tags its problems (`info["tag"]`).
    With several processes each grades its share; the main process gets the metrics, the
    others an empty dict."""
    processes = processes or Processes()
    problems = env.eval_problems()
    mine = processes.shard(len(problems))
    greedy = replace(params, temperature=0.0)
    groups = sample_groups(sampler, tokenizer, [problems[i] for i in mine], 1, greedy)
    graded = [
        (i, env.grade(g.problem, g.completions[0]), g.problem.info.get("tag"))
        for i, g in zip(mine, groups, strict=True)
    ]
    shares = processes.gather(graded, "eval results")
    if shares is None:
        return {}
    results = sorted((r for share in shares for r in share), key=lambda r: r[0])
    metrics = {
        "eval/accuracy": mean(grade.correct for _, grade, _ in results),
        "eval/format": mean(grade.formatted for _, grade, _ in results),
    }
    by_tag: dict[str, list[bool]] = {}
    for _, grade, tag in results:
        if tag is not None:
            by_tag.setdefault(str(tag), []).append(grade.correct)
    metrics.update({f"eval/accuracy/{tag}": mean(oks) for tag, oks in sorted(by_tag.items())})
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
