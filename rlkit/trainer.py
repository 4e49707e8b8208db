"""The RL loop, written on the Tinker-style API and nothing else.

Each step: sample `groups_per_step` problems x `group_size` completions; score them with the
reward list; turn each group's rewards into advantages; build datums (prompt tokens carry no
advantage); `forward_backward` + `optim_step`; hand the new weights to a fresh sampler; log.

How it deviates from textbook GRPO:
- No KL penalty to a reference model and no entropy bonus.
- Strictly on-policy: one optimizer step per batch of rollouts, so the importance ratio is 1 up
  to sampler/trainer numerics (its drift is logged as `train/logprob_mismatch`).
- Losses are sums over tokens (the API's semantics), not per-sequence means.
- Groups whose rewards are all equal carry no signal: they are counted and skipped.

Runs are bitwise reproducible and resumable (`resume=auto`): randomness derives from (seed, step,
...) (`repro.py`), and the state goes into atomic checkpoints every few steps (`checkpoint.py`).

Data parallelism (later) splits `problems_P` across processes; nothing else here changes.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import rlkit
from rlkit import checkpoint, repro, sft, types
from rlkit.config import import_target
from rlkit.envs.base import Problem
from rlkit.logging import MetricsWriter, console, finite, plot_curves, progress_bar
from rlkit.rewards.base import RewardError, WeightedReward, parse_answer, score_group


@dataclass
class Run:
    """What stays fixed for a whole run: the parts built from the config, and the outputs."""

    cfg: DictConfig
    env: object
    trainer: rlkit.TrainingClient
    tokenizer: object
    rewards: list[WeightedReward]
    advantage_fn: Callable
    adam: types.AdamParams
    params: types.SamplingParams
    samples_out: MetricsWriter


@dataclass
class Group:
    """One problem's rollouts: the prompt and `group_size` sampled completions."""

    problem: Problem
    prompt: list[int]
    sequences: list[types.SampledSequence]
    completions: list[str]


TRAIN_KEYS = (
    "train/loss",
    "train/grad_norm",
    "train/logprob_mismatch",
    "train/kl_sampler_trainer",
    "train/tis_capped_frac",
    "train/lr",
)


# ---- building components from the config ------------------------------------------------------
def as_callable(node: DictConfig, extra: Sequence[str] = (), runtime: dict | None = None):
    """A `_target_` node as a callable: a class is instantiated with the node's arguments (plus
    `runtime` ones), a function gets them bound with functools.partial. Keys in `extra` are
    rlkit's own, not passed on."""
    kwargs = {k: v for k, v in node.items() if not k.startswith("_") and k not in extra}
    kwargs = {**OmegaConf.to_container(OmegaConf.create(kwargs), resolve=True), **(runtime or {})}
    target = import_target(node._target_)
    return target(**kwargs) if inspect.isclass(target) else functools.partial(target, **kwargs)


def build_rewards(reward_cfg: DictConfig) -> list[WeightedReward]:
    return [
        WeightedReward(name, float(entry.get("weight", 1.0)), as_callable(entry, extra=("weight",)))
        for name, entry in reward_cfg.items()
    ]


# ---- the phases of one step -----------------------------------------------------------------
def sample_groups(sampler, tokenizer, problems_P, group_size, params, seeds_P=None) -> list[Group]:
    """`seeds_P`: one sampling seed per problem, so rollouts do not depend on call order."""
    futures = []
    for i, problem in enumerate(problems_P):
        prompt = sft.prompt_tokens(tokenizer, problem.messages)
        model_input = types.ModelInput.from_ints(prompt)
        request = params if seeds_P is None else replace(params, seed=seeds_P[i])
        futures.append((problem, prompt, sampler.sample(model_input, group_size, request)))
    groups = []
    for problem, prompt, future in futures:
        sequences = future.result().sequences
        completions = [tokenizer.decode(s.tokens, skip_special_tokens=True) for s in sequences]
        groups.append(Group(problem, prompt, sequences, completions))
    return groups


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


def mismatch_metrics(datums_D, outputs, tis_cap: float = 0.0) -> dict[str, float]:
    """How far the trainer's logprobs are from the sampler's on the sampled tokens, and how
    often a truncated-IS cap (`loss.config.tis_cap`, 0 = off) clipped the token weight."""
    diffs = []
    for datum, out in zip(datums_D, outputs, strict=True):
        mask = datum.loss_fn_inputs["advantages"].to_torch() != 0
        sampler_lp = datum.loss_fn_inputs["logprobs"].to_torch()[mask]
        diffs.append(out["logprobs"].to_torch()[mask] - sampler_lp)
    d = torch.cat(diffs).double()
    # k3 estimator of KL(sampler || trainer): exp(d) - 1 - d, unbiased and >= 0.
    return {
        "train/logprob_mismatch": float(d.abs().mean()),
        "train/kl_sampler_trainer": float((d.exp() - 1 - d).mean()),
        "train/tis_capped_frac": float((d.exp() > tis_cap).double().mean()) if tis_cap else None,
    }


def evaluate(sampler, tokenizer, problems, params: types.SamplingParams) -> dict[str, float]:
    """Greedy accuracy and format rate on the fixed held-out problems, plus the accuracy per
    problem kind when the env tags its problems (`info["tag"]`, e.g. `n4` for pair_sum)."""
    groups = sample_groups(sampler, tokenizer, problems, 1, replace(params, temperature=0.0))
    answers = [parse_answer(g.completions[0]) for g in groups]
    correct = [a == g.problem.answer for a, g in zip(answers, groups, strict=True)]
    metrics = {
        "eval/accuracy": _mean(correct),
        "eval/format": _mean(a is not None for a in answers),
    }
    by_tag: dict[str, list[bool]] = {}
    for ok, g in zip(correct, groups, strict=True):
        if "tag" in g.problem.info:
            by_tag.setdefault(str(g.problem.info["tag"]), []).append(ok)
    metrics.update({f"eval/accuracy/{tag}": _mean(oks) for tag, oks in sorted(by_tag.items())})
    return metrics


# ---- the loop ---------------------------------------------------------------------------------
@checkpoint.stop_on_signals  # Ctrl-C / SIGTERM: finish the step, write a checkpoint, exit 0
def run(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint.Checkpointer(run_dir, cfg)  # refuses a used run dir unless resume=auto
    repro.apply_determinism(cfg)  # seeds and switches, before any model or engine starts
    env = instantiate(cfg.env)
    rewards = build_rewards(cfg.reward)
    advantage_fn = as_callable(cfg.advantage)
    sinks = []
    if cfg.logger:
        runtime = {"run_dir": str(run_dir), "run_config": OmegaConf.to_container(cfg, resolve=True)}
        sinks.append(as_callable(cfg.logger, runtime=runtime))

    service = rlkit.ServiceClient(
        device=None if cfg.model.device == "auto" else cfg.model.device,
        dtype=None if cfg.model.dtype == "auto" else cfg.model.dtype,
        checkpoint_dir=run_dir / "checkpoints",
        engine=cfg.engine.name,
        engine_options={k: v for k, v in cfg.engine.items() if k != "name"},
    )
    trainer = service.create_lora_training_client(
        cfg.model.base_model,
        rank=cfg.adapter.rank,
        seed=cfg.seed,
        train_mlp=cfg.adapter.train_mlp,
        train_attn=cfg.adapter.train_attn,
        train_unembed=cfg.adapter.train_unembed,
        lora_alpha=cfg.adapter.alpha,
        use_dora=cfg.adapter.use_dora,
    )
    tokenizer = trainer.get_tokenizer()
    adam = types.AdamParams(
        learning_rate=cfg.optim.lr,
        beta1=cfg.optim.beta1,
        beta2=cfg.optim.beta2,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        grad_clip_norm=cfg.optim.grad_clip_norm,
    )
    params = types.SamplingParams(
        max_tokens=cfg.max_tokens, temperature=cfg.temperature, stop=list(cfg.stop) or None
    )
    resumed = ckpt.resume(trainer)  # resume=auto: weights, optimizer, RNGs, outputs so far
    repro.write_manifest(run_dir, cfg, service.device, service.dtype, ckpt.resumed_from)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    metrics_out = MetricsWriter(run_dir / "metrics.jsonl", timings=run_dir / "timings.jsonl")
    samples_out = MetricsWriter(run_dir / "samples.jsonl")
    eval_problems = env.eval_problems()

    if cfg.warmup.steps and not resumed.path:
        warm_adam = types.AdamParams(learning_rate=cfg.warmup.lr, grad_clip_norm=1.0)
        t0 = time.time()
        with progress_bar() as bar:
            task = bar.add_task("warm start (SFT)", total=cfg.warmup.steps, status="")

            def on_sft_step(step, m):
                bar.update(task, advance=1, status=f"loss {m['sft/loss']:.3f}")

            rng = repro.rng(cfg.seed, "warmup")
            losses = sft.warm_start(
                trainer, env, rng, cfg.warmup.steps, cfg.warmup.batch_size, warm_adam, on_sft_step
            )
        metrics_out.write(
            {"step": -1, "sft/final_loss": losses[-1], "time/warmup": time.time() - t0}
        )

    ctx = Run(cfg, env, trainer, tokenizer, rewards, advantage_fn, adam, params, samples_out)
    sampler = trainer.save_weights_and_get_sampling_client()
    history: list[dict] = resumed.history
    with progress_bar() as bar:
        task = bar.add_task("RL", total=cfg.steps, completed=resumed.step, status="")
        for step in range(resumed.step, cfg.steps + 1):
            if ckpt.reached(step):  # checkpoints when due; True after Ctrl-C / SIGTERM
                break
            metrics: dict[str, float] = {"step": step}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                metrics.update(evaluate(sampler, tokenizer, eval_problems, params))
            if step == cfg.steps:  # the final eval, after the last update
                history.append(metrics)
                metrics_out.write(metrics)
                break
            metrics.update(rl_step(ctx, sampler, step))
            t = time.time()
            sampler = trainer.save_weights_and_get_sampling_client()
            metrics["time/sync"] = time.time() - t
            metrics["sync/probe_mismatch"] = sampler.sync_metrics.get("sync/probe_mismatch")
            metrics["time/step"] = sum(
                metrics.get(f"time/{k}", 0.0) for k in ("sample", "score", "train", "sync")
            )
            history.append(metrics)
            metrics_out.write(metrics)
            for sink in sinks:
                sink.log(step, metrics)
            bar.update(task, advance=1, status=_status(metrics, history))

    metrics_out.close()
    samples_out.close()
    for sink in sinks:
        sink.close()
    if ckpt.stopped:
        raise SystemExit(0)  # the checkpoint is written and the resume command printed
    adapter = trainer.save_weights_for_sampler("final").result().path
    shutil.copytree(adapter, run_dir / "adapter", dirs_exist_ok=True)
    plot_curves(history, run_dir / "curves.png", title=str(run_dir.name))
    return summarize(history, run_dir)


def rl_step(ctx: Run, sampler, step: int) -> dict[str, float]:
    """One step: sample, score, compute advantages, train. Returns the step's metrics."""
    cfg, tokenizer, rewards = ctx.cfg, ctx.tokenizer, ctx.rewards
    metrics: dict[str, float] = {}
    t = time.time()
    # Problems and sampling seeds are functions of (seed, step): a resumed run draws the same.
    problems_P = ctx.env.sample(repro.rng(cfg.seed, "problems", step), cfg.groups_per_step)
    seeds_P = [repro.derive_seed(cfg.seed, "rollout", step, i) for i in range(len(problems_P))]
    groups_P = sample_groups(sampler, tokenizer, problems_P, cfg.group_size, ctx.params, seeds_P)
    metrics["time/sample"] = time.time() - t

    t = time.time()
    datums_D, totals, components, skipped, failed = [], [], {}, 0, 0
    for group in groups_P:
        try:
            scores = score_group(rewards, group.completions, group.problem)
        except RewardError:
            if cfg.on_reward_error == "raise":
                raise
            failed += 1
            continue
        totals += scores.total
        for name, values in scores.components.items():
            components.setdefault(name, []).extend(values)
        rewards_G = torch.tensor(scores.total)
        if torch.all(rewards_G == rewards_G[0]):
            skipped += 1
            continue
        advantages_G = ctx.advantage_fn(rewards_G)
        datums_D += group_datums(group, advantages_G)
    metrics["time/score"] = time.time() - t

    sequences = [s for g in groups_P for s in g.sequences]
    answers = [parse_answer(c) == g.problem.answer for g in groups_P for c in g.completions]
    metrics.update(
        {
            "reward/mean": _mean(totals),
            **{f"reward/{name}": _mean(v) for name, v in components.items()},
            "train/accuracy": _mean(answers),
            "train/completion_tokens": _mean([len(s.tokens) for s in sequences]),
            # Monte Carlo estimate of the sampler's per-token entropy: mean of -log p(sampled token).
            "train/entropy": -_mean([lp for s in sequences for lp in s.logprobs]),
            "train/frac_skipped_groups": skipped / len(groups_P),
            "train/failed_reward_groups": failed,
        }
    )
    if step % cfg.samples_every == 0:
        for g in groups_P[:2]:
            for completion in g.completions[:2]:
                ctx.samples_out.write(
                    {
                        "step": step,
                        "prompt": g.problem.messages[-1]["content"],
                        "answer": g.problem.answer,
                        "completion": completion,
                    }
                )

    # Steps where every group was skipped train nothing: their training metrics are null.
    metrics.update(dict.fromkeys(TRAIN_KEYS))
    t = time.time()
    if datums_D:
        loss_config = OmegaConf.to_container(cfg.loss.config)
        fwd_bwd = ctx.trainer.forward_backward(datums_D, cfg.loss.name, loss_config)
        lr = learning_rate(cfg, step)
        optim = ctx.trainer.optim_step(replace(ctx.adam, learning_rate=lr))
        out = fwd_bwd.result()
        metrics["train/loss"] = out.metrics["loss:sum"]
        metrics["train/grad_norm"] = optim.result().metrics["grad_norm"]
        metrics["train/lr"] = lr
        tis_cap = loss_config.get("tis_cap", 0.0)
        metrics.update(mismatch_metrics(datums_D, out.loss_fn_outputs, tis_cap))
    metrics["time/train"] = time.time() - t
    return metrics


def learning_rate(cfg: DictConfig, step: int) -> float:
    """The RL learning rate at `step` under `optim.schedule` (a function of the step alone, so a
    resumed run continues the same schedule)."""
    if cfg.optim.schedule == "linear":
        return cfg.optim.lr * (1 - step / cfg.steps)
    return cfg.optim.lr


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else math.nan


def _status(metrics: dict, history: list[dict]) -> str:
    evals = [h["eval/accuracy"] for h in history if "eval/accuracy" in h]
    last_eval = f"  eval acc {evals[-1]:.2f}" if evals else ""
    return f"reward {metrics['reward/mean']:.3f}  acc {metrics['train/accuracy']:.2f}{last_eval}"


def summarize(history: list[dict], run_dir: Path) -> dict[str, float]:
    evals = [h for h in history if "eval/accuracy" in h]
    rewards = [h["reward/mean"] for h in history if finite(h.get("reward/mean"))]
    summary = {
        "eval/accuracy_start": evals[0]["eval/accuracy"] if evals else math.nan,
        "eval/accuracy_final": evals[-1]["eval/accuracy"] if evals else math.nan,
        "reward/mean_first": rewards[0] if rewards else math.nan,
        "reward/mean_last5": _mean(rewards[-5:]),
        "steps": len(history) - 1,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    console.print(
        f"[bold]done[/bold]: eval accuracy {summary['eval/accuracy_start']:.3f} -> "
        f"{summary['eval/accuracy_final']:.3f}; mean reward {summary['reward/mean_first']:.3f} -> "
        f"{summary['reward/mean_last5']:.3f} (last 5 steps). Outputs in {run_dir}"
    )
    return summary
