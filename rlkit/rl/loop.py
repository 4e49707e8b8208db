"""The RL loop, written on the Tinker-style API and nothing else.

Each step: sample `groups_per_step` problems x `group_size` episodes (one model turn each, or
several turns with the environment's observations between them); score them with the reward list; turn each group's rewards into advantages; build datums (prompt tokens carry no
advantage); `forward_backward` + `optim_step`; hand the new weights to a fresh sampler; log.

How it deviates from textbook GRPO:
- No KL penalty to a reference model and no entropy bonus.
- Strictly on-policy: one optimizer step per batch of rollouts, so the importance ratio is 1 up
  to sampler/trainer numerics (its drift is logged as `train/logprob_mismatch`).
- Losses are sums over tokens (the API's semantics), not per-sequence means.
- Groups whose rewards are all equal carry no signal: they are counted and skipped.

Runs are bitwise reproducible and resumable (`resume=auto`): randomness derives from (seed, step,
...) (`rlkit.run.seeds`), and `Session` writes atomic checkpoints every few steps
(`rlkit.run.checkpoint`). The environment, not the loop, decides whether a completion is correct.

Data parallelism: under a launcher (`accelerate launch --num_processes N -m rlkit ...`) each of the
N processes samples, scores and trains on its share of the step's groups; the optimizer step
sums the gradients over the processes, so all take the same step, and the main process logs
the step from everyone's shares. The batch (`groups_per_step` x `group_size`) does not depend
on N.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rlkit.api import types
from rlkit.rl import sft
from rlkit.rl.rewards.base import WeightedReward
from rlkit.rl.rollouts import (
    Share,
    evaluate,
    group_datums,
    logprob_gaps,
    merge,
    mismatch_metrics,
    rollout_metrics,
    sample_groups,
    sample_records,
    score_groups,
)
from rlkit.run import seeds
from rlkit.run.checkpoint import stop_on_signals
from rlkit.run.config import adam_params, as_callable
from rlkit.run.outputs import progress_bar, timed
from rlkit.run.session import Session

# Training metrics of a step; null on a step where every group was skipped (nothing trained).
TRAIN_KEYS = (
    "train/loss",
    "train/grad_norm",
    "train/logprob_mismatch",
    "train/kl_sampler_trainer",
    "train/tis_capped_frac",
    "train/lr",
)
# The timed phases of a step; `time/step` is their sum.
PHASES = ("sample", "score", "train", "sync")


@stop_on_signals  # Ctrl-C / SIGTERM: finish the step, write a checkpoint, exit 0
def train(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    env = as_callable(cfg.env, "env")
    rewards = build_rewards(cfg.reward)
    advantage_fn = as_callable(cfg.advantage, "advantage")
    adam = adam_params(cfg.optim)
    loss_config = OmegaConf.to_container(cfg.loss.config)
    params = types.SamplingParams(
        max_tokens=cfg.max_tokens, temperature=cfg.temperature, stop=list(cfg.stop) or None
    )
    with Session.open(cfg, run_dir) as run:  # clients, outputs, checkpoints; resumes if asked
        trainer, tokenizer = run.trainer, run.trainer.get_tokenizer()
        procs = run.processes  # this process's rank among N (N = 1 without a launcher)
        if cfg.warmup.steps and not run.resumed.path:
            warm_start(run, env)
        sampler = trainer.save_weights_and_get_sampling_client()
        for step in run.steps():  # checkpoints when due; ends early on Ctrl-C / SIGTERM
            metrics = {"step": step}
            if step % cfg.eval_every == 0:
                metrics |= run_eval(cfg, sampler, env, tokenizer, params, procs, step)

            # Problems and sampling seeds are functions of (seed, step): a resumed run draws the
            # same, whatever its number of processes. Each process takes whole groups (rank,
            # rank + N, ...), so advantages stay within a group.
            with timed(metrics, "time/sample"):
                rng = seeds.rng(cfg.seed, "problems", step)
                problems_P = env.sample(rng, cfg.groups_per_step, step)
                seeds_P = [
                    seeds.derive_seed(cfg.seed, "rollout", step, i) for i in range(len(problems_P))
                ]
                mine = procs.shard(len(problems_P))
                groups = sample_groups(
                    sampler,
                    tokenizer,
                    env,
                    [problems_P[i] for i in mine],
                    cfg.group_size,
                    params,
                    [seeds_P[i] for i in mine],
                    cfg.on_env_error,
                )

            with timed(metrics, "time/score"):
                scores = score_groups(groups, rewards, cfg.on_reward_error, step, procs)
                datums_D, skipped = [], 0
                for group, group_scores in zip(groups, scores, strict=True):
                    if group_scores is None:
                        continue  # a reward failed and on_reward_error=skip
                    rewards_G = torch.tensor(group_scores.total)
                    if torch.all(rewards_G == rewards_G[0]):
                        skipped += 1  # all equal: no signal
                        continue
                    datums_D += group_datums(group, advantage_fn(rewards_G))
            share = Share(mine, groups, scores, skipped)

            metrics |= dict.fromkeys(TRAIN_KEYS)
            with timed(metrics, "time/train"):
                # The optimizer steps when any process has datums; its gradients are their sum.
                if procs.sum(len(datums_D), "datum count"):
                    lr = learning_rate(cfg, step)
                    if datums_D:  # a process without any joins the step with zero gradients
                        out = trainer.forward_backward(datums_D, cfg.loss.name, loss_config)
                    optim = trainer.optim_step(replace(adam, learning_rate=lr))
                    if datums_D:
                        share.loss = out.result().metrics["loss:sum"]
                        share.gaps = logprob_gaps(datums_D, out.result().loss_fn_outputs)
                    metrics["train/grad_norm"] = optim.result().metrics["grad_norm"]
                    metrics["train/lr"] = lr

            with timed(metrics, "time/sync"):
                sampler = trainer.save_weights_and_get_sampling_client()
            metrics["sync/probe_mismatch"] = sampler.sync_metrics.get("sync/probe_mismatch")

            # The main process merges every process's share and logs the step (the others' log
            # and write_samples do nothing).
            shares = procs.gather(share, "step results")
            if shares is not None:
                step_all = merge(shares)
                metrics |= rollout_metrics(step_all.groups, step_all.scores, env)
                metrics["train/frac_skipped_groups"] = step_all.skipped / len(problems_P)
                if step_all.gaps is not None:
                    metrics["train/loss"] = step_all.loss
                    metrics |= mismatch_metrics(step_all.gaps, loss_config.get("tis_cap", 0.0))
                metrics["time/step"] = sum(metrics[f"time/{k}"] for k in PHASES)
                if step % cfg.samples_every == 0:
                    run.write_samples(sample_records(step, step_all.groups))
                run.log(metrics)

        if run.stopped:
            raise SystemExit(0)  # the checkpoint is written and the resume command printed
        run.log({"step": cfg.steps, **run_eval(cfg, sampler, env, tokenizer, params, procs)})
        return run.finish()


def run_eval(cfg, sampler, env, tokenizer, params, procs, step: int | None = None):
    """The held-out eval at `eval_temperature`, `eval_samples` episodes per problem; sampling
    seeds are functions of (seed, step, problem), like the rollouts'."""
    step = cfg.steps if step is None else step
    n = len(env.eval_problems())
    return evaluate(
        sampler,
        env,
        tokenizer,
        replace(params, temperature=cfg.eval_temperature),
        procs,
        cfg.eval_samples,
        [seeds.derive_seed(cfg.seed, "eval", step, i) for i in range(n)],
        cfg.on_env_error,
    )


def build_rewards(reward_cfg: DictConfig) -> list[WeightedReward]:
    return [
        WeightedReward(
            name,
            float(entry.get("weight", 1.0)),
            as_callable(entry, f"reward.{name}", extra=("weight",)),
        )
        for name, entry in reward_cfg.items()
    ]


def warm_start(run: Session, env) -> None:
    """`warmup.steps` supervised steps on the env's worked solutions, before RL."""
    cfg = run.cfg
    adam = types.AdamParams(learning_rate=cfg.warmup.lr, grad_clip_norm=1.0)
    t0 = time.time()
    with progress_bar(show=run.processes.is_main) as bar:
        task = bar.add_task("warm start (SFT)", total=cfg.warmup.steps, status="")

        def on_step(_step, m):
            bar.update(task, advance=1, status=f"loss {m['sft/loss']:.3f}")

        rng = seeds.rng(cfg.seed, "warmup")
        losses = sft.warm_start(
            run.trainer,
            env,
            rng,
            cfg.warmup.steps,
            cfg.warmup.batch_size,
            adam,
            on_step,
            run.processes,
        )
    run.metrics_out.write(
        {"step": -1, "sft/final_loss": losses[-1], "time/warmup": time.time() - t0}
    )


def learning_rate(cfg: DictConfig, step: int) -> float:
    """The RL learning rate at `step` under `optim.schedule` (a function of the step alone, so a
    resumed run continues the same schedule)."""
    if cfg.optim.schedule == "linear":
        return cfg.optim.lr * (1 - step / cfg.steps)
    return cfg.optim.lr
