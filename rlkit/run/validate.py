"""Everything about a composed config that can be checked without loading a model.

Types and enumerations are the schema's (Hydra checks them when it composes); ranges are rules
on the schema's fields (`schema.ranged`); the rest, rules that involve several keys, the
device, the quantized base, the engine's and the loss's options, and every `_target_`, is here.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

from rlkit.api.quant import QuantizationUnavailable, check_available
from rlkit.run.build import check_target, engine_args, loss_fn_config, quant_spec
from rlkit.run.schema import (
    Aggregation,
    ConfigError,
    KLEstimator,
    KLPlacement,
    OverlongMode,
    RunConfig,
    rules,
    sections,
)

# The sections the schema types (a `+key=value` must not add keys to them).
TYPED_SECTIONS = tuple(sections(RunConfig))
DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
RULES = rules(RunConfig)


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
    for key, rule in RULES:
        value = OmegaConf.select(cfg, key)
        if not rule.test(value):
            raise ConfigError(f"{key} must be {rule.text}, got {value}")
    if cfg.temperature == 0:
        raise ConfigError(
            "temperature=0: rollouts would be greedy, so a group's completions are all the same "
            "and every group is skipped (no signal); use temperature > 0 (eval_temperature "
            "sets the eval's)"
        )
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


# QuantizationUnavailable.key -> the run config's key.
QUANT_KEYS = {
    "quantize": "model.quantize",
    "device": "model.device",
    "use_dora": "adapter.use_dora",
    "compute_dtype": "model.quant_compute_dtype",
}


def _validate_quant(cfg: DictConfig) -> None:
    """A quantized base that cannot run here fails now, naming the key and the reason."""
    quant = quant_spec(cfg.model)
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


def _validate_engine(engine: DictConfig) -> None:
    if not isinstance(engine, DictConfig) or "_target_" not in engine:
        raise ConfigError("engine needs a _target_ (an engine class, see conf/engine/)")
    from rlkit.client import check_engine  # the engine's own options decide what is valid

    try:
        args = engine_args(engine)
        check_engine(args["engine"], args["engine_options"], where="engine.")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _validate_loss(cfg: DictConfig) -> None:
    from rlkit.api.losses import get_loss

    loss = cfg.loss
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
