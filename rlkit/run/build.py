"""Config nodes into what rlkit runs: a `_target_` node into its object (checked first against
the target's signature and annotations), and sections into the client's arguments."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import typing
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rlkit.api.quant import QuantSpec
from rlkit.api.typecheck import matches, type_name
from rlkit.api.types import AdamParams
from rlkit.run.schema import OPTIM_RENAME, QUANT_RENAME, ConfigError, KLPlacement


def quant_args(model: DictConfig) -> dict[str, Any]:
    """`model.quantize`, `model.quant_compute_dtype`, `model.double_quant` (QuantSpec's fields,
    renamed) as keyword arguments of create_lora_training_client."""
    values = plain(model)
    return {key: values[key] for key in quant_keys().values()}


def quant_spec(model: DictConfig) -> QuantSpec:
    """`model.*`'s quantization as the API's QuantSpec."""
    values = plain(model)
    return QuantSpec(**{name: values[key] for name, key in quant_keys().items()})


def quant_keys() -> dict[str, str]:
    """QuantSpec's field names -> the config's (and the client's keyword) names."""
    return {f.name: QUANT_RENAME.get(f.name, f.name) for f in dataclasses.fields(QuantSpec)}


def service_args(cfg: DictConfig) -> dict[str, Any]:
    """A run config's machine keys as ServiceClient arguments: device, dtype, prefix sharing
    and the engine with its options."""
    model = cfg.model
    return {
        "device": None if model.device == "auto" else model.device,
        "dtype": None if model.dtype == "auto" else str(model.dtype),
        "share_prefix": bool(model.share_prefix),
        **engine_args(cfg.engine),
    }


def engine_args(engine: DictConfig) -> dict[str, Any]:
    """`engine` as ServiceClient arguments: the engine class's path and its options."""
    options = {k: v for k, v in plain(engine).items() if k != "_target_"}
    return {"engine": engine._target_, "engine_options": options}


def loss_fn_config(cfg: DictConfig) -> dict[str, Any]:
    """`loss.config` plus the options the run turns on: the KL penalty in the loss
    (`kl.coef` > 0, `kl.placement=loss`) and the entropy bonus (`loss.entropy_coef` > 0)."""
    config = OmegaConf.to_container(cfg.loss.config)
    if cfg.kl.coef and cfg.kl.placement == KLPlacement.loss:
        config |= {"kl_coef": float(cfg.kl.coef), "kl_estimator": str(cfg.kl.estimator)}
    if cfg.loss.entropy_coef:
        config["entropy_coef"] = float(cfg.loss.entropy_coef)
    return config


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
    """A `_target_` node (the config's `key`) as an object, built by `hydra.utils.instantiate`:
    a class is instantiated with the node's arguments (plus `runtime` ones), a function, here or
    as a nested argument, is bound to its arguments (`_partial_`, unless the node says).
    Arguments arrive as plain lists and dicts. Keys in `extra` are rlkit's own, not passed on.
    A ValueError from a target's own checks of its arguments is a ConfigError naming `key`; any
    other error is the target's own, as it raised it."""
    spec = _partial_functions(OmegaConf.to_container(node, resolve=True))
    for name in extra:
        spec.pop(name, None)
    try:
        if not runtime:
            return instantiate(spec, _convert_="all")
        # Runtime arguments are objects, not config: bound after instantiate.
        built = instantiate(spec, _convert_="all", _partial_=True)
        return functools.partial(built, **runtime) if spec["_partial_"] else built(**runtime)
    except InstantiationException as exc:
        cause = exc.__cause__
        if cause is None:
            raise
        error = cause
    except ValueError as exc:
        error = exc
    if isinstance(error, ValueError):
        raise ConfigError(f"{key}: {error}") from error
    raise error


def _partial_functions(spec: Any) -> Any:
    """`spec` with `_partial_: true` on every `_target_` node that names a function and does not
    set it: rlkit's components take functions (rewards, graders, advantages) as callables."""
    if isinstance(spec, list):
        return [_partial_functions(v) for v in spec]
    if not isinstance(spec, dict):
        return spec
    spec = {k: _partial_functions(v) for k, v in spec.items()}
    if "_target_" in spec and "_partial_" not in spec:
        spec["_partial_"] = not inspect.isclass(import_target(spec["_target_"]))
    return spec
