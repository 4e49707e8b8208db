"""The run's config schema: Hydra composes YAML into these dataclasses.

Typed fields make a typo'd key or a wrong type fail at composition, naming the full key path.
A field's range rule (`ranged(default, RULE)`) sits on the field; `rlkit.run.validate` checks
the rules, and what types and ranges cannot, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from omegaconf import MISSING

from rlkit.api.adapter import MAX_SEED, AdapterSpec
from rlkit.api.errors import RlkitError
from rlkit.api.losses import AGGREGATIONS, KL_ESTIMATORS
from rlkit.api.quant import METHODS, QuantSpec
from rlkit.api.types import DTYPES, AdamParams


@dataclass(frozen=True)
class Rule:
    """A range a numeric key must lie in: `test(value)`, else `{key} must be {text}, got V`.
    (nan fails every comparison, so `0 <= v < inf` also rejects it.)"""

    text: str
    test: Any


AT_LEAST_1 = Rule(">= 1", lambda v: v >= 1)
AT_LEAST_0 = Rule(">= 0", lambda v: v >= 0)
FINITE_AT_LEAST_0 = Rule("a finite number >= 0", lambda v: 0 <= v < math.inf)
FINITE_ABOVE_0 = Rule("a finite number > 0", lambda v: 0 < v < math.inf)
UNIT = Rule("in [0, 1)", lambda v: 0 <= v < 1)
SEED = Rule("in [0, 2**63 - 1]", lambda v: 0 <= v <= MAX_SEED)


def ranged(default: Any, rule: Rule) -> Any:
    """A field with a default and the range its value must lie in."""
    return field(default=default, metadata={"rule": rule})


def sections(cls: type) -> dict[str, type]:
    """A schema dataclass's sections: its fields that are dataclasses themselves, by name."""
    out = {}
    for f in dataclasses.fields(cls):
        kind = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(kind):
            out[f.name] = kind
    return out


def rules(cls: type, prefix: str = "") -> list[tuple[str, Rule]]:
    """Every (key path, rule) of a schema dataclass, its sections' included, in field order."""
    out = []
    inner = sections(cls)
    for f in dataclasses.fields(cls):
        if "rule" in f.metadata:
            out.append((prefix + f.name, f.metadata["rule"]))
        if f.name in inner:
            out += rules(inner[f.name], f"{prefix}{f.name}.")
    return out


class ConfigError(RlkitError, ValueError):
    """A config value that composes but cannot work; the message names its key path."""


# Enumerations: the schema rejects any other value when Hydra composes, naming the key.
def choices(name: str, names) -> type[StrEnum]:
    """An enumeration of `names` (a registry's keys): the choices are declared once, there."""
    return StrEnum(name, {n: n for n in names})


# auto: bfloat16 on GPU, float32 on CPU; or a name in rlkit.api.types.DTYPES.
DType = choices("DType", ["auto", *DTYPES])
# rlkit.api.quant.METHODS.
Quantize = choices("Quantize", METHODS)


class Schedule(StrEnum):
    constant = "constant"
    linear = "linear"  # from lr at step 0 down to 0 after the last step


class Resume(StrEnum):
    never = "never"  # a fresh run dir
    auto = "auto"  # continue from its newest complete checkpoint, if any


# rlkit.api.losses.KL_ESTIMATORS.
KLEstimator = choices("KLEstimator", KL_ESTIMATORS)


class KLPlacement(StrEnum):
    loss = "loss"  # kl.coef * estimate per token, differentiated (GRPO's)
    reward = "reward"  # -kl.coef * (sequence's summed estimate) added to its reward (PPO-RLHF's)


class KLReference(StrEnum):
    start = "start"  # the policy RL starts from: the warm start's adapter, else the base model
    base = "base"  # the base model (the adapter switched off), even after a warm start


# rlkit.api.losses.AGGREGATIONS.
Aggregation = choices("Aggregation", AGGREGATIONS)


class OverlongMode(StrEnum):
    keep = "keep"  # truncated completions train like any other
    mask = "mask"  # truncated completions are left out of the loss (DAPO's overlong filtering)
    penalty = "penalty"  # DAPO's soft overlong punishment, added to the reward


# raise: stop the run, naming the reward; skip: count the group in train/failed_reward_groups
# and skip it. (`raise` is a keyword, hence the functional form: the schema matches by name.)
OnRewardError = StrEnum("OnRewardError", {"raise": "raise", "skip": "skip"})
# raise: stop the run, naming the env and the problem; skip: skip the episode's group (counted in
# train/failed_reward_groups; an eval episode counts as wrong, in eval/env_errors).
OnEnvError = StrEnum("OnEnvError", {"raise": "raise", "skip": "skip"})


def derived(
    cls: type,
    name: str,
    rename: dict | None = None,
    drop=(),
    extra=(),
    ranges=None,
    types=None,
    first=(),
) -> type:
    """A config dataclass with the fields (and defaults) of `cls`, so a setting is declared once:
    `rename` maps field names to config keys, `drop` leaves fields out, `types` gives a field (by
    config key) a narrower type (an enumeration of its choices), `ranges` its range rule; `first`
    and `extra` add (name, type, default) fields of the config's own, before and after them."""
    rename, ranges, types = rename or {}, ranges or {}, types or {}
    fields = [(key, kind, field(default=default)) for key, kind, default in first]
    for f in dataclasses.fields(cls):
        if f.name in drop:
            continue
        key = rename.get(f.name, f.name)
        meta = {"rule": ranges[key]} if key in ranges else {}
        kind = types.get(key, f.type)
        default = kind(f.default) if key in types else f.default
        fields.append((key, kind, field(default=default, metadata=meta)))
    fields += [(key, kind, field(default=default)) for key, kind, default in extra]
    return dataclasses.make_dataclass(name, fields)


# model.*: the base model, and QuantSpec's fields under the names the client's keyword arguments
# have (quantize, quant_compute_dtype, double_quant).
QUANT_RENAME = {"method": "quantize", "compute_dtype": "quant_compute_dtype"}
ModelConfig = derived(
    QuantSpec,
    "ModelConfig",
    rename=QUANT_RENAME,
    types={"quantize": Quantize, "quant_compute_dtype": DType},
    first=[
        # Built-in name (rlkit-tiny, rlkit-small), local directory, or hub id.
        ("base_model", str, MISSING),
        # float32, bfloat16, float16, or auto (bfloat16 on GPU, float32 on CPU).
        ("dtype", DType, DType.auto),
        # cpu, cuda, cuda:N, mps, or auto.
        ("device", str, "auto"),
    ],
    # Training rows that begin alike (a prompt's completions) share one forward pass over their
    # common beginning: same logprobs and gradients up to float rounding, less work.
    extra=[("share_prefix", bool, True)],
)


# adapter.*: AdapterSpec's fields; the adapter's seed is the run's `seed`.
AdapterConfig = derived(
    AdapterSpec,
    "AdapterConfig",
    drop=("seed",),
    ranges={"rank": AT_LEAST_1, "alpha": FINITE_AT_LEAST_0},
)
# optim.*: AdamParams' fields (learning_rate is `lr`), and the learning-rate schedule.
OPTIM_RENAME = {"learning_rate": "lr"}
OptimConfig = derived(
    AdamParams,
    "OptimConfig",
    rename=OPTIM_RENAME,
    extra=[("schedule", Schedule, Schedule.constant)],
    ranges={
        "lr": FINITE_AT_LEAST_0,
        "eps": FINITE_AT_LEAST_0,
        "weight_decay": FINITE_AT_LEAST_0,
        "grad_clip_norm": FINITE_AT_LEAST_0,
        "beta1": UNIT,
        "beta2": UNIT,
    },
)


@dataclass
class LossConfig:
    # A name from the loss registry (rlkit.api.losses).
    name: str = "importance_sampling"
    # loss_fn_config passed to forward_backward (e.g. clip thresholds).
    config: dict[str, float] = field(default_factory=dict)
    # Each token's weight in the loss: token_sum, token_mean, sequence_mean, constant.
    aggregation: Aggregation = Aggregation.token_sum
    # Entropy bonus: -entropy_coef * H(next-token distribution) per model token; 0 = off.
    entropy_coef: float = ranged(0.0, FINITE_AT_LEAST_0)


@dataclass
class KLConfig:
    # Weight of the KL(policy || reference) penalty; 0 = off. The reference is the trainer's
    # own model with its adapter switched off or swapped: one extra forward pass, no second copy.
    coef: float = ranged(0.0, FINITE_AT_LEAST_0)
    # start (the policy RL starts from: after the warm start, if any) or base.
    reference: KLReference = KLReference.start
    # k1, k2, k3 or low_var_kl (see rlkit.api.losses.kl_penalty).
    estimator: KLEstimator = KLEstimator.k3
    # loss (per token, differentiated) or reward (per sequence, before advantages).
    placement: KLPlacement = KLPlacement.loss


@dataclass
class OverlongConfig:
    # keep, mask (truncated completions out of the loss), or penalty (DAPO's soft punishment).
    mode: OverlongMode = OverlongMode.keep
    # penalty: the last N tokens before the limit over which the penalty falls from 0 to -1.
    buffer: int = ranged(16, AT_LEAST_1)
    # penalty: its weight in the total reward.
    weight: float = ranged(1.0, FINITE_AT_LEAST_0)


@dataclass
class WarmupConfig:
    # Supervised steps on the env's worked solutions before RL; 0 skips the warm start.
    steps: int = ranged(0, FINITE_AT_LEAST_0)
    batch_size: int = ranged(32, AT_LEAST_1)
    lr: float = ranged(3e-3, FINITE_AT_LEAST_0)


@dataclass
class DeterminismConfig:
    # torch.use_deterministic_algorithms (costs: see conf/determinism/strict.yaml).
    deterministic_algorithms: bool = True
    # Only warn when an op has no deterministic implementation, instead of raising.
    warn_only: bool = False
    # CUBLAS_WORKSPACE_CONFIG (GPU); "" leaves the environment's value.
    cublas_workspace: str = ":4096:8"
    # VLLM_BATCH_INVARIANT for the vLLM engine (GPU, compute capability >= 8.0).
    vllm_batch_invariant: bool = False
    # torch intra-op threads; 0 keeps torch's default (one per core).
    num_threads: int = ranged(0, FINITE_AT_LEAST_0)


@dataclass
class CheckpointConfig:
    # Checkpoint every N RL steps (and at the end, and on Ctrl-C / SIGTERM); 0: only those.
    every: int = ranged(10, FINITE_AT_LEAST_0)
    # Complete checkpoints kept; older ones are deleted.
    keep_last: int = ranged(2, AT_LEAST_1)


@dataclass
class DistributedConfig:
    # Under a launcher (`accelerate launch`, torchrun): a collective that waits longer than this
    # for another process fails the run, naming this rank. It bounds a hang (a peer stuck, a
    # node gone); a peer that dies is noticed at once. It must exceed the longest gap between
    # processes within a step (e.g. a slower process's sampling).
    timeout_s: float = ranged(1800.0, FINITE_ABOVE_0)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # `_target_` of an Env class and its arguments.
    env: Any = MISSING
    # `_target_` of the grader that decides correctness (env and rewards refer to it as ${grader}).
    grader: Any = MISSING
    # name -> {_target_: reward function or class, weight: float, ...its arguments}.
    reward: dict[str, Any] = field(default_factory=dict)
    # `_target_` of an advantage function and its arguments.
    advantage: Any = MISSING
    loss: LossConfig = field(default_factory=LossConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    # Completions that hit max_tokens (the limit is max_tokens x the env's max_turns).
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    # Passes over each batch of rollouts, each in `minibatches` optimizer steps; more than one
    # optimizer step computes the old policy's logprobs first (see rlkit.rl.update).
    updates_per_batch: int = ranged(1, AT_LEAST_1)
    minibatches: int = ranged(1, AT_LEAST_1)
    # Asynchronous RL with bounded staleness: the rollouts of step s are sampled by the policy
    # of step max(0, s - K), sampled while steps s-K .. s-1 train (see rlkit.rl.schedule); the
    # schedule is a function of the step, so a run is still bitwise reproducible. 0: synchronous.
    max_steps_off_policy: int = ranged(0, AT_LEAST_0)
    # `_target_` of a rollout engine class and its options (see conf/engine/).
    engine: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    determinism: DeterminismConfig = field(default_factory=DeterminismConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Several processes (data parallel), when a launcher starts them; ignored in one process.
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # never (a fresh run dir), or auto (continue from its newest complete checkpoint, if any).
    resume: Resume = Resume.never
    # Extra metric sinks (`_target_` of a logger class), or null.
    logger: Any = None
    seed: int = ranged(0, SEED)
    steps: int = ranged(20, AT_LEAST_1)
    groups_per_step: int = ranged(8, AT_LEAST_1)
    group_size: int = ranged(8, AT_LEAST_1)
    max_tokens: int = ranged(64, AT_LEAST_1)
    temperature: float = ranged(1.0, FINITE_AT_LEAST_0)
    # Stop strings for rollouts and eval (the end-of-turn token always stops), e.g. ["</answer>"].
    stop: list[str] = field(default_factory=list)
    # Eval on the held-out set every N steps (and at the start and the end).
    eval_every: int = ranged(10, AT_LEAST_1)
    # Sampling temperature of the eval; 0 is greedy.
    eval_temperature: float = ranged(0.0, FINITE_AT_LEAST_0)
    # Episodes per eval problem: eval/accuracy averages them, eval/pass@K counts any correct.
    eval_samples: int = ranged(1, AT_LEAST_1)
    # Write sample completions every N steps.
    samples_every: int = ranged(10, AT_LEAST_1)
    # What a reward that raises or returns a non-finite value does: raise, or skip its group.
    on_reward_error: OnRewardError = OnRewardError["raise"]
    # What an environment that raises in `step` does: raise, or skip its group.
    on_env_error: OnEnvError = OnEnvError["raise"]
    # Seconds one call of users' code may take (a reward on one group, an env's step, grade or
    # metrics); past it the call fails as if it raised (on_reward_error / on_env_error). 0: none.
    plugin_timeout_s: float = ranged(60.0, FINITE_AT_LEAST_0)
