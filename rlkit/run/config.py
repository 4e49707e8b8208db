"""The run's structured config: Hydra composes YAML into these dataclasses.

Typed fields make a typo'd key or a wrong type fail at composition, naming the full key path.
`validate` then checks what types cannot (ranges, loss names, that every `_target_` imports and
binds its arguments) before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from rlkit.api.adapter import MAX_SEED, AdapterSpec
from rlkit.api.errors import RlkitError
from rlkit.api.quant import QuantizationUnavailable, QuantSpec, check_available
from rlkit.api.typecheck import matches, type_name
from rlkit.api.types import AdamParams


class ConfigError(RlkitError, ValueError):
    """A config value that composes but cannot work; the message names its key path."""


# Enumerations: the schema rejects any other value when Hydra composes, naming the key.
class DType(StrEnum):
    auto = "auto"  # bfloat16 on GPU, float32 on CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Quantize(StrEnum):
    none = "none"  # full-precision base: LoRA, DoRA
    nf4 = "nf4"  # 4-bit NormalFloat (bitsandbytes): QLoRA, QDoRA
    fp4 = "fp4"  # 4-bit float (bitsandbytes)
    int8 = "int8"  # 8-bit LLM.int8 (bitsandbytes); LoRA only


class Schedule(StrEnum):
    constant = "constant"
    linear = "linear"  # from lr at step 0 down to 0 after the last step


class Resume(StrEnum):
    never = "never"  # a fresh run dir
    auto = "auto"  # continue from its newest complete checkpoint, if any


class KLEstimator(StrEnum):
    k1 = "k1"  # logprob - ref: unbiased; in the loss its gradient is 0 in expectation
    k2 = "k2"  # (logprob - ref)^2 / 2
    k3 = "k3"  # exp(ref - logprob) - 1 - (ref - logprob): unbiased, low variance, >= 0
    low_var_kl = "low_var_kl"  # k3, clamped (verl's name)


class KLPlacement(StrEnum):
    loss = "loss"  # kl.coef * estimate per token, differentiated (GRPO's)
    reward = "reward"  # -kl.coef * (sequence's summed estimate) added to its reward (PPO-RLHF's)


class KLReference(StrEnum):
    start = "start"  # the policy RL starts from: the warm start's adapter, else the base model
    base = "base"  # the base model (the adapter switched off), even after a warm start


class Aggregation(StrEnum):
    token_sum = "token_sum"  # sum over tokens (the API's semantics)
    token_mean = "token_mean"  # mean over the minibatch's tokens (DAPO)
    sequence_mean = "sequence_mean"  # mean over sequences of their token mean (GRPO, GSPO)
    constant = "constant"  # sum / (max_tokens x sequences) (Dr. GRPO)


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


@dataclass
class ModelConfig:
    # Built-in name (rlkit-tiny, rlkit-small), local directory, or hub id.
    base_model: str = MISSING
    # float32, bfloat16, float16, or auto (bfloat16 on GPU, float32 on CPU).
    dtype: DType = DType.auto
    # cpu, cuda, cuda:N, mps, or auto.
    device: str = "auto"
    # Frozen base weights: none (full precision), nf4 / fp4 (4-bit), int8 (bitsandbytes).
    quantize: Quantize = Quantize.none
    # dtype a 4-bit layer computes in: auto (= model.dtype), float32, bfloat16, float16.
    quant_compute_dtype: DType = DType.auto
    # 4-bit only: also quantize the per-block scales (~0.4 bits per weight saved).
    double_quant: bool = True
    # Training rows that begin alike (a prompt's completions) share one forward pass over their
    # common beginning: same logprobs and gradients up to float rounding, less work.
    share_prefix: bool = True


def derived(cls: type, name: str, rename: dict | None = None, drop=(), extra=()) -> type:
    """A config dataclass with the fields (and defaults) of `cls`, so a setting is declared once:
    `rename` maps field names to config keys, `drop` leaves fields out, `extra` adds
    (name, type, default) fields of the config's own."""
    rename = rename or {}
    fields = [
        (rename.get(f.name, f.name), f.type, field(default=f.default))
        for f in dataclasses.fields(cls)
        if f.name not in drop
    ]
    fields += [(key, kind, field(default=default)) for key, kind, default in extra]
    return dataclasses.make_dataclass(name, fields)


# adapter.*: AdapterSpec's fields; the adapter's seed is the run's `seed`.
AdapterConfig = derived(AdapterSpec, "AdapterConfig", drop=("seed",))
# optim.*: AdamParams' fields (learning_rate is `lr`), and the learning-rate schedule.
OPTIM_RENAME = {"learning_rate": "lr"}
OptimConfig = derived(
    AdamParams,
    "OptimConfig",
    rename=OPTIM_RENAME,
    extra=[("schedule", Schedule, Schedule.constant)],
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
    entropy_coef: float = 0.0


@dataclass
class KLConfig:
    # Weight of the KL(policy || reference) penalty; 0 = off. The reference is the trainer's
    # own model with its adapter switched off or swapped: one extra forward pass, no second copy.
    coef: float = 0.0
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
    buffer: int = 16
    # penalty: its weight in the total reward.
    weight: float = 1.0


@dataclass
class WarmupConfig:
    # Supervised steps on the env's worked solutions before RL; 0 skips the warm start.
    steps: int = 0
    batch_size: int = 32
    lr: float = 3e-3


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
    num_threads: int = 0


@dataclass
class CheckpointConfig:
    # Checkpoint every N RL steps (and at the end, and on Ctrl-C / SIGTERM); 0: only those.
    every: int = 10
    # Complete checkpoints kept; older ones are deleted.
    keep_last: int = 2


@dataclass
class DistributedConfig:
    # Under a launcher (`accelerate launch`, torchrun): a collective that waits longer than this
    # for another process fails the run, naming this rank. It bounds a hang (a peer stuck, a
    # node gone); a peer that dies is noticed at once. It must exceed the longest gap between
    # processes within a step (e.g. a slower process's sampling).
    timeout_s: float = 1800.0


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
    updates_per_batch: int = 1
    minibatches: int = 1
    # Asynchronous RL with bounded staleness: the rollouts of step s are sampled by the policy
    # of step max(0, s - K), sampled while steps s-K .. s-1 train (see rlkit.rl.schedule); the
    # schedule is a function of the step, so a run is still bitwise reproducible. 0: synchronous.
    max_steps_off_policy: int = 0
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
    seed: int = 0
    steps: int = 20
    groups_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 64
    temperature: float = 1.0
    # Stop strings for rollouts and eval (the end-of-turn token always stops), e.g. ["</answer>"].
    stop: list[str] = field(default_factory=list)
    # Eval on the held-out set every N steps (and at the start and the end).
    eval_every: int = 10
    # Sampling temperature of the eval; 0 is greedy.
    eval_temperature: float = 0.0
    # Episodes per eval problem: eval/accuracy averages them, eval/pass@K counts any correct.
    eval_samples: int = 1
    # Write sample completions every N steps.
    samples_every: int = 10
    # What a reward that raises or returns a non-finite value does: raise, or skip its group.
    on_reward_error: OnRewardError = OnRewardError["raise"]
    # What an environment that raises in `step` does: raise, or skip its group.
    on_env_error: OnEnvError = OnEnvError["raise"]
    # Seconds one call of users' code may take (a reward on one group, an env's step, grade or
    # metrics); past it the call fails as if it raised (on_reward_error / on_env_error). 0: none.
    plugin_timeout_s: float = 60.0


# Where the YAML lives: top-level conf/ and recipes/ in a source checkout; inside the package
# (rlkit/conf, rlkit/recipes) in an installed wheel, where the build copies them.
# The primary config file decides which, for both folders (a leftover empty rlkit/conf/ in an
# old checkout does not).
_PACKAGE = Path(__file__).resolve().parents[1]
_ROOT = _PACKAGE if (_PACKAGE / "conf" / "config.yaml").is_file() else _PACKAGE.parent
CONF_DIR = _ROOT / "conf"
RECIPES_DIR = _ROOT / "recipes"


def register() -> None:
    """The schema and the recipes (one YAML each in recipes/, the `recipe` group), into Hydra's
    config store; call before composing."""
    store = ConfigStore.instance()
    store.store(name="rlkit_schema", node=RunConfig)
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


POSITIVE_INTS = (
    "steps",
    "groups_per_step",
    "group_size",
    "max_tokens",
    "eval_every",
    "eval_samples",
    "samples_every",
    "adapter.rank",
    "warmup.batch_size",
    "checkpoint.keep_last",
    "updates_per_batch",
    "minibatches",
    "overlong.buffer",
)
NON_NEGATIVE = (
    "temperature",
    "eval_temperature",
    "optim.lr",
    "optim.eps",
    "optim.weight_decay",
    "optim.grad_clip_norm",
    "warmup.steps",
    "warmup.lr",
    "adapter.alpha",
    "determinism.num_threads",
    "checkpoint.every",
    "kl.coef",
    "loss.entropy_coef",
    "overlong.weight",
    "plugin_timeout_s",
)
POSITIVE = ("distributed.timeout_s",)
TYPED_SECTIONS = (
    "model",
    "adapter",
    "loss",
    "kl",
    "overlong",
    "optim",
    "warmup",
    "determinism",
    "checkpoint",
    "distributed",
)
DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _check_known_keys(cfg: DictConfig) -> None:
    """`+key=value` adds keys even to typed sections; reject any the schema does not know."""
    schema = OmegaConf.structured(RunConfig)
    known = set(schema.keys())  # `in` would skip keys whose value is MISSING
    for key in cfg:
        if key not in known:
            raise ConfigError(f"unknown key {key!r}; known keys: {', '.join(sorted(known))}")
    for section in TYPED_SECTIONS:
        for key in cfg[section]:
            if key not in set(schema[section].keys()):
                raise ConfigError(
                    f"unknown key '{section}.{key}'; {section} has: {', '.join(schema[section])}"
                )


def validate(cfg: DictConfig) -> None:
    """Everything that can be checked without loading a model; raises ConfigError.

    Enumerations (model.dtype, optim.schedule, resume, on_reward_error) and types are checked
    by the schema when Hydra composes the config."""
    _check_known_keys(cfg)
    for key in POSITIVE_INTS:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
    for key in NON_NEGATIVE:  # nan fails every comparison: `not 0 <= nan` catches it
        if not 0 <= OmegaConf.select(cfg, key) < math.inf:
            raise ConfigError(
                f"{key} must be a finite number >= 0, got {OmegaConf.select(cfg, key)}"
            )
    for key in POSITIVE:
        if not 0 < OmegaConf.select(cfg, key) < math.inf:
            raise ConfigError(
                f"{key} must be a finite number > 0, got {OmegaConf.select(cfg, key)}"
            )
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"seed must be in [0, 2**63 - 1], got {cfg.seed}")
    if cfg.temperature == 0:
        raise ConfigError(
            "temperature=0: rollouts would be greedy, so a group's completions are all the same "
            "and every group is skipped (no signal); use temperature > 0 (eval_temperature "
            "sets the eval's)"
        )
    for key in ("optim.beta1", "optim.beta2"):
        if not 0 <= OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {OmegaConf.select(cfg, key)}")
    if any(not text for text in cfg.stop):
        raise ConfigError(f"stop must be a list of non-empty strings, got {list(cfg.stop)}")
    _validate_device(cfg.model.device)
    _validate_quant(cfg)
    if cfg.group_size < 2:
        raise ConfigError(
            f"group_size must be >= 2, got {cfg.group_size}: advantages compare a group's "
            "completions with each other, and a group whose rewards are all equal is skipped"
        )
    workspace = cfg.determinism.cublas_workspace
    if workspace and not re.fullmatch(r":\d+:\d+(,:\d+:\d+)*", workspace):
        raise ConfigError(
            f"determinism.cublas_workspace must look like ':4096:8' (or be empty), got {workspace!r}"
        )
    if cfg.eval_samples > 1 and cfg.eval_temperature == 0:
        raise ConfigError(
            f"eval_samples={cfg.eval_samples} with eval_temperature=0: greedy samples are all "
            "the same; set eval_temperature > 0 for pass@k, or eval_samples=1"
        )
    _validate_engine(cfg.engine)
    _validate_loss(cfg)
    if not cfg.reward:
        raise ConfigError("reward is empty: select at least one, e.g. reward=[format,correct]")
    check_target("grader", cfg.grader, runtime_args=2)
    check_target("env", cfg.env)
    check_target("advantage", cfg.advantage, runtime_args=1)
    for name, entry in cfg.reward.items():
        check_target(f"reward.{name}", entry, runtime_args=2, extra=("weight",))
    if cfg.logger:  # logger=none composes to an empty node
        check_target("logger", cfg.logger, runtime_kwargs=("run_dir", "run_config"))


def _validate_device(device: str) -> None:
    if not DEVICE_RE.fullmatch(device):
        raise ConfigError(f"model.device must be auto, cpu, mps, cuda or cuda:N; got {device!r}")
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            raise ConfigError(
                f"model.device={device}, but torch {torch.__version__} has {build}: "
                "use model.device=cpu (or auto)"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"model.device={device}, but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("model.device=mps, but this machine has no MPS device: use cpu or auto")


def quant_args(model: DictConfig) -> dict[str, Any]:
    """`model.quantize`, `model.quant_compute_dtype`, `model.double_quant` as keyword arguments
    of create_lora_training_client."""
    return {
        "quantize": str(model.quantize),
        "quant_compute_dtype": str(model.quant_compute_dtype),
        "double_quant": bool(model.double_quant),
    }


# QuantizationUnavailable.key -> the run config's key.
QUANT_KEYS = {
    "quantize": "model.quantize",
    "device": "model.device",
    "use_dora": "adapter.use_dora",
    "compute_dtype": "model.quant_compute_dtype",
}


def _validate_quant(cfg: DictConfig) -> None:
    """A quantized base that cannot run here fails now, naming the key and the reason."""
    args = quant_args(cfg.model)
    quant = QuantSpec(args["quantize"], args["quant_compute_dtype"], args["double_quant"])
    if not quant.enabled:
        return
    device = cfg.model.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_available(quant, device.partition(":")[0], cfg.adapter.use_dora)
    except QuantizationUnavailable as exc:
        key = QUANT_KEYS[exc.key]
        value = OmegaConf.select(cfg, key)
        value = str(value).lower() if isinstance(value, bool) else value
        raise ConfigError(f"{key}={value} with model.quantize={quant.method}: {exc}") from None


def engine_args(engine: DictConfig) -> dict[str, Any]:
    """`engine` as ServiceClient arguments: the engine class's path and its options."""
    options = {k: v for k, v in plain(engine).items() if k != "_target_"}
    return {"engine": engine._target_, "engine_options": options}


def _validate_engine(engine: DictConfig) -> None:
    if not isinstance(engine, DictConfig) or "_target_" not in engine:
        raise ConfigError("engine needs a _target_ (an engine class, see conf/engine/)")
    from rlkit.client import check_engine  # the engine's own options decide what is valid

    try:
        args = engine_args(engine)
        check_engine(args["engine"], args["engine_options"], where="engine.")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def loss_fn_config(cfg: DictConfig) -> dict[str, Any]:
    """`loss.config` plus the options the run turns on: the KL penalty in the loss
    (`kl.coef` > 0, `kl.placement=loss`) and the entropy bonus (`loss.entropy_coef` > 0)."""
    config = OmegaConf.to_container(cfg.loss.config)
    if cfg.kl.coef and cfg.kl.placement == KLPlacement.loss:
        config |= {"kl_coef": float(cfg.kl.coef), "kl_estimator": str(cfg.kl.estimator)}
    if cfg.loss.entropy_coef:
        config["entropy_coef"] = float(cfg.loss.entropy_coef)
    return config


def _validate_loss(cfg: DictConfig) -> None:
    from rlkit.api.losses import get_loss

    loss = cfg.loss
    for key in ("kl.coef", "loss.entropy_coef", "overlong.weight"):
        if not OmegaConf.select(cfg, key) < float("inf"):
            raise ConfigError(
                f"{key} must be a finite number >= 0, got {OmegaConf.select(cfg, key)}"
            )
    try:
        spec = get_loss(loss.name)
    except KeyError as exc:
        raise ConfigError(f"loss: {exc}") from None
    if not spec.is_policy_loss:
        raise ConfigError(f"loss.name={loss.name!r} is not a policy-gradient loss (no advantages)")
    uses = [k for k in ("kl_coef", "entropy_coef") if k in loss_fn_config(cfg)]
    if missing := [k for k in uses if k not in spec.defaults]:
        raise ConfigError(
            f"loss.name={loss.name!r} has no {missing[0]} option (a loss registered with "
            "register_policy_loss has it): set kl.coef=0 / loss.entropy_coef=0, or use one that does"
        )
    try:
        spec.resolve_config(loss.name, loss_fn_config(cfg))
    except ValueError as exc:
        raise ConfigError(f"loss: {exc}") from None
    if cfg.kl.coef and cfg.kl.placement == KLPlacement.loss and cfg.kl.estimator == KLEstimator.k1:
        raise ConfigError(
            "kl.estimator=k1 with kl.placement=loss: k1's gradient is 0 in expectation on "
            "the policy's own samples, so the penalty would do nothing; use k3 (or k2, "
            "low_var_kl) in the loss, or kl.placement=reward for k1"
        )
    if loss.name == "gspo" and loss.aggregation != Aggregation.sequence_mean:
        raise ConfigError(
            f"loss=gspo with loss.aggregation={loss.aggregation}: GSPO's objective is a mean "
            "over sequences of a length-normalised ratio; use loss.aggregation=sequence_mean "
            "(conf/loss/gspo.yaml's)"
        )
    if cfg.overlong.mode == OverlongMode.penalty and cfg.overlong.buffer > cfg.max_tokens:
        raise ConfigError(
            f"overlong.buffer={cfg.overlong.buffer} exceeds max_tokens={cfg.max_tokens}: the "
            "penalty would start before the first token"
        )
    if cfg.max_steps_off_policy < 0:
        raise ConfigError(f"max_steps_off_policy must be >= 0, got {cfg.max_steps_off_policy}")
    if cfg.max_steps_off_policy > cfg.steps:
        raise ConfigError(
            f"max_steps_off_policy={cfg.max_steps_off_policy} exceeds steps={cfg.steps}: every "
            "step would be sampled by the starting policy"
        )
    batch = cfg.groups_per_step * cfg.group_size
    if cfg.minibatches > batch:
        raise ConfigError(
            f"minibatches={cfg.minibatches} exceeds the batch of groups_per_step x group_size "
            f"= {batch} completions"
        )


def plain(cfg: DictConfig) -> dict:
    """The config as plain, JSON-ready containers (enumerations as their names)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def adam_params(optim: DictConfig) -> AdamParams:
    """`optim.*` as the API's AdamParams (the same fields; `lr` is learning_rate)."""
    names = {f.name for f in dataclasses.fields(AdamParams)}
    keys = {OPTIM_RENAME.get(n, n): n for n in names}
    return AdamParams(**{keys[k]: v for k, v in optim.items() if k in keys})


def adapter_args(adapter: DictConfig) -> dict[str, Any]:
    """`adapter.*` as keyword arguments of create_lora_training_client (`alpha` is lora_alpha)."""
    args = {k: v for k, v in plain(adapter).items()}
    args["lora_alpha"] = args.pop("alpha")
    return args


def import_target(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"cannot import {path!r}: {exc}") from None


def check_target(
    key: str,
    node: Any,
    runtime_args: int = 0,
    runtime_kwargs: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
) -> None:
    """`node._target_` imports, and its signature binds the configured arguments.

    `runtime_args` positional and `runtime_kwargs` keyword arguments are supplied by the
    trainer later; keys in `extra` are read by rlkit itself and not passed on.
    """
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{key} needs a _target_ (a dotted path to a function or class)")
    target = import_target(node._target_)
    kwargs = {**_arguments(node, extra), **dict.fromkeys(runtime_kwargs)}
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # builtins without a signature: nothing to check
    try:
        if inspect.isclass(target) and runtime_args:
            signature.bind(**kwargs)  # runtime args go to the instance's __call__
        else:
            signature.bind(*[None] * runtime_args, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{key}: {node._target_} {exc}") from None
    _check_types(key, node, target)


def _arguments(node: DictConfig, extra=()) -> dict[str, Any]:
    """A `_target_` node's arguments: its keys but `_target_`-style ones and rlkit's own `extra`."""
    return {k: v for k, v in node.items() if not k.startswith("_") and k not in extra}


def _check_types(key: str, node: DictConfig, target: Any) -> None:
    """Each configured argument against its annotation (int, float, str, bool, lists of them,
    optional ones); others are not checked."""
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable annotations: nothing to check against
        return
    values = OmegaConf.to_container(node, resolve=True)
    for name, value in values.items():
        if name in hints and not matches(value, hints[name]):
            raise ConfigError(
                f"{key}.{name}={value!r} must be {type_name(hints[name])} "
                f"(the {name} argument of {node._target_})"
            )


def as_callable(node: DictConfig, key: str, extra=(), runtime: dict | None = None):
    """A `_target_` node (the config's `key`) as an object: a class is instantiated with the
    node's arguments (plus `runtime` ones), a function gets them bound with functools.partial.
    Keys in `extra` are rlkit's own, not passed on. A ValueError from a class's own checks of its
    arguments is a ConfigError naming `key`."""
    arguments = OmegaConf.to_container(OmegaConf.create(_arguments(node, extra)), resolve=True)
    arguments = {name: _build(value, f"{key}.{name}") for name, value in arguments.items()}
    kwargs = {**arguments, **(runtime or {})}
    target = import_target(node._target_)
    if not inspect.isclass(target):
        return functools.partial(target, **kwargs)
    try:
        return target(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from exc


def _build(value: Any, key: str) -> Any:
    """An argument that is itself a `_target_` node (e.g. `grader: ${grader}`) becomes its
    object; anything else stays as it is."""
    if isinstance(value, dict) and "_target_" in value:
        return as_callable(OmegaConf.create(value), key)
    return value


def compose(overrides: list[str] = ()) -> DictConfig:
    """The config `python -m rlkit OVERRIDES...` would run with (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlkit.run import plugins

    register()
    plugins.register_entry_points()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def options(group: str) -> list[str]:
    """The built-in options of a config group (file names without .yaml)."""
    folder = RECIPES_DIR if group == "recipe" else CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml"))
