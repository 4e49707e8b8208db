"""The RL loop, written on the Tinker-style API and nothing else.

Each step: sample `groups_per_step` problems x `group_size` episodes (one model turn each, or
several turns with the environment's observations between them); score them with the reward list; turn each group's rewards into advantages; build datums (prompt tokens carry no
advantage); `forward_backward` + `optim_step`; hand the new weights to a fresh sampler; log.

How it deviates from textbook GRPO, by default (each is one config line away):
- No KL penalty (`kl.coef`; its reference is the policy RL starts from, i.e. the warm start's
  adapter, or the base model with the adapter switched off) and no entropy bonus
  (`loss.entropy_coef`).
- Strictly on-policy: one optimizer step per batch of rollouts, so the importance ratio is 1 up
  to sampler/trainer numerics (its drift is logged as `train/logprob_mismatch`);
  `updates_per_batch` / `minibatches` take several (rlkit.rl.update), and
  `max_steps_off_policy` samples each step with a policy up to K steps old, in the background
  (rlkit.rl.schedule).
- Losses are sums over tokens (the API's semantics), not per-sequence means
  (`loss.aggregation`).
- Groups whose rewards are all equal carry no signal: they are counted and skipped.

Runs are bitwise reproducible and resumable (`resume=auto`): randomness derives from (seed, step,
...) (`rlkit.run.seeds`), and `Session` writes atomic checkpoints every few steps
(`rlkit.run.checkpoint`). The environment, not the loop, decides whether a completion is correct.

The same code runs under a launcher (`accelerate launch ... -m rlkit`; docs/distributed.md):
the client divides each call's work (sampling, forward/backward, and through `map_items`
rewards and env steps) and gives the whole result back, and the session writes the outputs
once. The batch (`groups_per_step` x `group_size`) is the same whatever the launcher.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from rlkit.api import types
from rlkit.rl import sft
from rlkit.rl.envs.base import check_env, draw
from rlkit.rl.rewards.base import WeightedReward
from rlkit.rl.rollouts import (
    Limits,
    evaluate,
    group_datums,
    mismatch_metrics,
    ratio_metrics,
    rollout_metrics,
    sample_groups,
    sample_records,
    score_groups,
)
from rlkit.rl.schedule import Sampled, Schedule, slow
from rlkit.rl.shaping import attach_reference, shape_rewards
from rlkit.rl.update import policy_update
from rlkit.run import seeds
from rlkit.run.build import adam_params, as_callable, loss_fn_config
from rlkit.run.checkpoint import stop_on_signals
from rlkit.run.outputs import timed
from rlkit.run.session import Arm, Session

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
def train(cfg: DictConfig, run_dir: Path, arm: Arm | None = None) -> dict[str, float]:
    env = check_env(as_callable(cfg.env, "env"))
    rewards = build_rewards(cfg.reward)
    advantage_fn = as_callable(cfg.advantage, "advantage")
    adam = adam_params(cfg.optim)
    loss_config = loss_fn_config(cfg)  # loss.config, plus the KL and entropy terms if on
    params = types.SamplingParams(
        max_tokens=cfg.max_tokens, temperature=cfg.temperature, stop=list(cfg.stop) or None
    )
    with Session.open(cfg, run_dir, arm) as run:  # clients, outputs, checkpoints; resumes if asked
        trainer, tokenizer = run.trainer, run.trainer.get_tokenizer()
        # Episodes end where the model's context is full; users' code runs under a time limit.
        limits = Limits(trainer.get_info().max_context_length, cfg.plugin_timeout_s)
        if cfg.warmup.steps and (not run.resumed.path or run.resumed.warmup):
            warm_start(run, env)  # leaves its adapter in checkpoints/warm_start
            if run.stopped:
                raise SystemExit(0)  # stopped during it: a checkpoint holds its progress
        if cfg.kl.coef:
            trainer.set_reference(kl_reference(cfg, run)).result()

        def rollouts(sampler, step: int):
            # Problems and sampling seeds are functions of (seed, step): a resumed run, or one
            # whose sampling ran at another time (max_steps_off_policy), draws the same.
            rng = seeds.rng(cfg.seed, "problems", step)
            problems_P = draw(env, rng, cfg.groups_per_step, step)
            seeds_P = [
                seeds.derive_seed(cfg.seed, "rollout", step, i) for i in range(len(problems_P))
            ]
            return problems_P, sample_groups(
                sampler,
                tokenizer,
                env,
                problems_P,
                cfg.group_size,
                params,
                seeds_P,
                cfg.on_env_error,
                limits,
            )

        # Which policy samples each step (max_steps_off_policy; see rlkit.rl.schedule).
        schedule = run.closing(  # stopped when the run ends, crash or not
            Schedule(cfg.max_steps_off_policy, run.resumed.step, cfg.steps, rollouts)
        )
        for version in schedule.needed(run.resumed.step):  # a resumed run's older policies
            schedule.add(version, trainer.create_sampling_client(str(run.policy_path(version))))
        sampler = new_policy(run, schedule, run.resumed.step)
        for step in run.steps():  # checkpoints when due; ends early on Ctrl-C / SIGTERM
            metrics = {"step": step}
            if step % cfg.eval_every == 0:
                metrics |= run_eval(cfg, sampler, env, tokenizer, params, limits, step)

            with timed(metrics, "time/sample"):
                sampled = schedule.take(step)
                problems_P, groups = sampled.rollouts
                for group in groups:
                    group.version = sampled.version  # the datums' policy version

            with timed(metrics, "time/score"):
                if cfg.kl.coef:  # the reference's logprobs: one forward pass
                    attach_reference(trainer, groups, str(cfg.kl.estimator))
                scores = score_groups(
                    groups, rewards, cfg.on_reward_error, step, cfg.plugin_timeout_s
                )
                shape_rewards(cfg, env, groups, scores)  # KL in the reward, overlong penalty
                datums_D, skipped = [], 0
                for group, group_scores in zip(groups, scores, strict=True):
                    if group_scores is None:
                        continue  # a reward failed and on_reward_error=skip
                    rewards_G = torch.tensor(group_scores.total)
                    if torch.all(rewards_G == rewards_G[0]):
                        skipped += 1  # all equal: no signal
                        continue
                    datums_D += group_datums(
                        group, advantage_fn(rewards_G), cfg.overlong.mode == "mask"
                    )

            metrics |= dict.fromkeys(TRAIN_KEYS)
            update = None
            with timed(metrics, "time/train"):
                slow("training")
                if datums_D:
                    lr = learning_rate(cfg, step)
                    update = policy_update(
                        trainer,
                        datums_D,
                        cfg.loss.name,
                        loss_config,
                        replace(adam, learning_rate=lr),
                        updates_per_batch=cfg.updates_per_batch,
                        minibatches=cfg.minibatches,
                        aggregation=str(cfg.loss.aggregation),
                        max_tokens=cfg.max_tokens * env.max_turns,
                        seed=cfg.seed,
                        step=step,
                    )
                    metrics["train/grad_norm"] = update.grad_norm
                    metrics["train/lr"] = lr

            with timed(metrics, "time/sync"):
                sampler = new_policy(run, schedule, step + 1)
            metrics["sync/probe_mismatch"] = sampler.sync_metrics.get("sync/probe_mismatch")

            metrics |= rollout_metrics(groups, scores, env, cfg.plugin_timeout_s)
            metrics["train/frac_skipped_groups"] = skipped / len(problems_P)
            if update is not None:
                metrics["train/loss"] = update.loss
                metrics |= mismatch_metrics(update.gaps, loss_config.get("tis_cap", 0.0))
            if schedule.k:  # asynchronous: how stale, how far off, how much was hidden
                metrics |= offpolicy_metrics(step, sampled, groups, update, loss_config)
            metrics["time/step"] = sum(metrics[f"time/{k}"] for k in PHASES)
            if step % cfg.samples_every == 0:
                run.write_samples(sample_records(step, groups))
            run.log(metrics)

        if run.stopped:
            raise SystemExit(0)  # the checkpoint is written and the resume command printed
        final = run_eval(cfg, sampler, env, tokenizer, params, limits)
        run.log({"step": cfg.steps, **final})
        return run.finish()


def new_policy(run: Session, schedule: Schedule, version: int):
    """The weights as they are now are policy `version`: a sampler for them, handed to the
    schedule, and (asynchronous runs) kept for checkpoints while a later step needs them."""
    sampler = run.trainer.save_weights_and_get_sampling_client()
    if schedule.k:
        run.keep_policy(version, range(schedule.version(version), version + 1))
    schedule.add(version, sampler)
    return sampler


def offpolicy_metrics(step: int, sampled: Sampled, groups, update, loss_config: dict) -> dict:
    """Staleness (steps between the policy that sampled an episode and the one trained, over
    the step's episodes), the importance ratio exp(trainer - sampler) on the trained tokens
    before the update, the fraction the off-policy masks drop, and the seconds of the step's
    sampling hidden behind training."""
    staleness = [step - g.version for g in groups for _ in g.episodes]
    metrics = {
        "train/staleness_mean": sum(staleness) / len(staleness),
        "train/staleness_max": max(staleness),
        "time/overlap": max(sampled.seconds - sampled.waited, 0.0),
    }
    if update is not None:
        metrics |= ratio_metrics(update.gaps, update.sequence_gaps, loss_config)
    return metrics


def run_eval(cfg, sampler, env, tokenizer, params, limits, step: int | None = None):
    """The held-out eval at `eval_temperature`, `eval_samples` episodes per problem; sampling
    seeds are functions of (seed, step, problem), like the rollouts'."""
    step = cfg.steps if step is None else step
    n = len(env.eval_problems())
    return evaluate(
        sampler,
        env,
        tokenizer,
        replace(params, temperature=cfg.eval_temperature),
        cfg.eval_samples,
        [seeds.derive_seed(cfg.seed, "eval", step, i) for i in range(n)],
        cfg.on_env_error,
        limits,
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
    rng, start = seeds.rng(cfg.seed, "warmup"), 0
    if run.resumed.warmup:  # stopped during the warm start: go on from there
        start = run.resumed.warmup["done"]
        rng.setstate(seeds.rng_state(run.resumed.warmup["rng"]))
    with run.progress() as bar:
        task = bar.add_task("warm start (SFT)", total=cfg.warmup.steps, status="")
        bar.update(task, completed=start)

        def on_step(_step, m):
            bar.update(task, advance=1, status=f"loss {m['sft/loss']:.3f}")

        losses = sft.warm_start(
            run.trainer,
            env,
            rng,
            cfg.warmup.steps,
            cfg.warmup.batch_size,
            adam,
            on_step,
            start,
            run.checkpoints.stop_in_warmup,  # Ctrl-C / SIGTERM: a checkpoint, then stop
        )
    if run.stopped:
        return
    run.metrics_out.write(
        {"step": -1, "sft/final_loss": losses[-1], "time/warmup": time.time() - t0}
    )
    run.keep_adapter(WARM_START, warm_start_path(run))  # the KL reference may read it


WARM_START = "warm_start"


def warm_start_path(run: Session) -> Path:
    return run.checkpoints.dir / WARM_START


def kl_reference(cfg: DictConfig, run: Session) -> str | None:
    """The KL reference's adapter: the warm start's (kl.reference=start, when there was one),
    or None, the base model."""
    path = warm_start_path(run)
    if cfg.kl.reference == "base" or not cfg.warmup.steps:
        return None
    if not path.exists():
        raise FileNotFoundError(
            f"kl.reference=start: the warm start's adapter is missing from {path} (a run dir "
            "from before rlkit saved it?); set kl.reference=base or start a new run"
        )
    return str(path)


def learning_rate(cfg: DictConfig, step: int) -> float:
    """The RL learning rate at `step` under `optim.schedule` (a function of the step alone, so a
    resumed run continues the same schedule)."""
    if cfg.optim.schedule == "linear":
        return cfg.optim.lr * (1 - step / cfg.steps)
    return cfg.optim.lr
