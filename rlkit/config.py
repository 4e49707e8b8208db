"""The run's structured config: Hydra composes YAML into these dataclasses.

Typed fields make a typo'd key or a wrong type fail at composition, naming the full key path.
`validate` then checks what types cannot (ranges, loss names, that every `_target_` imports and
binds its arguments) before any model is loaded.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from rlkit.engines.sync import ENGINES
from rlkit.errors import RlkitError


class ConfigError(RlkitError, ValueError):
    """A config value that composes but cannot work; the message names its key path."""


@dataclass
class ModelConfig:
    # Built-in name (rlkit-tiny, rlkit-small), local directory, or hub id.
    base_model: str = MISSING
    # float32, bfloat16, float16, or auto (bfloat16 on GPU, float32 on CPU).
    dtype: str = "auto"
    # cpu, cuda, cuda:N, or auto.
    device: str = "auto"


@dataclass
class AdapterConfig:
    rank: int = 16
    alpha: float = 32.0
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    use_dora: bool = False


@dataclass
class LossConfig:
    # A name from the loss registry (rlkit.losses).
    name: str = "importance_sampling"
    # loss_fn_config passed to forward_backward (e.g. clip thresholds).
    config: dict[str, float] = field(default_factory=dict)


@dataclass
class EngineConfig:
    # Rollout engine: hf (transformers generate) or vllm.
    name: str = "hf"
    # Largest mean |logprob| gap between engine and trainer on the post-sync probe; None: by dtype.
    probe_tolerance: float | None = None
    # vllm only: KV cache GiB (None: gpu_memory_utilization on GPU, 0.5 GiB on CPU).
    kv_cache_gib: float | None = None
    # vllm only, GPU: fraction of GPU memory for vLLM when kv_cache_gib is None.
    gpu_memory_utilization: float = 0.35
    # vllm only: longest prompt + completion (None: the model's limit).
    max_model_len: int | None = None
    # vllm only: no CUDA graphs / compilation (faster start, slower decoding).
    enforce_eager: bool = True
    # vllm only: sequences decoded at once.
    max_num_seqs: int = 256


@dataclass
class OptimConfig:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    # 0 disables clipping.
    grad_clip_norm: float = 1.0
    # constant, or linear (from lr at step 0 down to 0 after the last step).
    schedule: str = "constant"


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
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # `_target_` of an Env class and its arguments.
    env: Any = MISSING
    # name -> {_target_: reward function or class, weight: float, ...its arguments}.
    reward: dict[str, Any] = field(default_factory=dict)
    # `_target_` of an advantage function and its arguments.
    advantage: Any = MISSING
    loss: LossConfig = field(default_factory=LossConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    determinism: DeterminismConfig = field(default_factory=DeterminismConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # never (a fresh run dir), or auto (continue from its newest complete checkpoint, if any).
    resume: str = "never"
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
    # Greedy eval on the held-out set every N steps (and at the start and the end).
    eval_every: int = 10
    # Write sample completions every N steps.
    samples_every: int = 10
    # What a reward that raises or returns a non-finite value does: raise, or skip its group.
    on_reward_error: str = "raise"


def register() -> None:
    ConfigStore.instance().store(name="rlkit_schema", node=RunConfig)


POSITIVE_INTS = (
    "steps",
    "groups_per_step",
    "group_size",
    "max_tokens",
    "eval_every",
    "samples_every",
    "adapter.rank",
    "warmup.batch_size",
    "engine.max_num_seqs",
    "checkpoint.keep_last",
)
NON_NEGATIVE = (
    "temperature",
    "optim.lr",
    "optim.eps",
    "optim.weight_decay",
    "optim.grad_clip_norm",
    "warmup.steps",
    "warmup.lr",
    "adapter.alpha",
    "determinism.num_threads",
    "checkpoint.every",
)


TYPED_SECTIONS = (
    "model",
    "adapter",
    "loss",
    "engine",
    "optim",
    "warmup",
    "determinism",
    "checkpoint",
)


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
    """Everything that can be checked without loading a model; raises ConfigError."""
    _check_known_keys(cfg)
    for key in POSITIVE_INTS:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
    for key in NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {OmegaConf.select(cfg, key)}")
    for key in ("optim.beta1", "optim.beta2"):
        if not 0 <= OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {OmegaConf.select(cfg, key)}")
    if cfg.optim.schedule not in ("constant", "linear"):
        raise ConfigError(f"optim.schedule must be constant or linear, got {cfg.optim.schedule!r}")
    if any(not text for text in cfg.stop):
        raise ConfigError(f"stop must be a list of non-empty strings, got {list(cfg.stop)}")
    if cfg.on_reward_error not in ("raise", "skip"):
        raise ConfigError(f"on_reward_error must be 'raise' or 'skip', got {cfg.on_reward_error!r}")
    if cfg.model.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(
            f"model.dtype must be auto, float32, bfloat16 or float16; got {cfg.model.dtype!r}"
        )
    if cfg.engine.name not in ENGINES:
        raise ConfigError(
            f"engine.name must be one of {', '.join(ENGINES)}; got {cfg.engine.name!r}"
        )
    if not 0 < cfg.engine.gpu_memory_utilization <= 1:
        raise ConfigError(
            f"engine.gpu_memory_utilization must be in (0, 1], got {cfg.engine.gpu_memory_utilization}"
        )
    for key in ("engine.probe_tolerance", "engine.kv_cache_gib", "engine.max_model_len"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be > 0 or null, got {value}")
    _validate_repro(cfg)
    _validate_loss(cfg.loss)
    if not cfg.reward:
        raise ConfigError("reward is empty: select at least one, e.g. reward=[format,correct]")
    check_target("env", cfg.env)
    check_target("advantage", cfg.advantage, runtime_args=1)
    for name, entry in cfg.reward.items():
        check_target(f"reward.{name}", entry, runtime_args=2, extra=("weight",))
    if cfg.logger:  # logger=none composes to an empty node
        check_target("logger", cfg.logger, runtime_kwargs=("run_dir", "run_config"))


def _validate_repro(cfg: DictConfig) -> None:
    if cfg.resume not in ("never", "auto"):
        raise ConfigError(f"resume must be never or auto, got {cfg.resume!r}")
    workspace = cfg.determinism.cublas_workspace
    if workspace and not re.fullmatch(r":\d+:\d+(,:\d+:\d+)*", workspace):
        raise ConfigError(
            f"determinism.cublas_workspace must look like ':4096:8' (or be empty), got {workspace!r}"
        )


def _validate_loss(loss: DictConfig) -> None:
    from rlkit.losses import get_loss

    try:
        spec = get_loss(loss.name)
        if "advantages" not in spec.inputs:
            raise ConfigError(
                f"loss.name={loss.name!r} is not a policy-gradient loss (no advantages)"
            )
        spec.resolve_config(loss.name, OmegaConf.to_container(loss.config))
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"loss: {exc}") from None


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
    kwargs = {k: v for k, v in node.items() if not k.startswith("_") and k not in extra}
    kwargs.update(dict.fromkeys(runtime_kwargs))
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


CONF_DIR = Path(__file__).parent / "conf"


def compose(overrides: list[str] = ()) -> DictConfig:
    """The config `python -m rlkit OVERRIDES...` would run with (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlkit import plugins

    register()
    plugins.register_entry_points()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def options(group: str) -> list[str]:
    """The built-in options of a config group (file names without .yaml)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
