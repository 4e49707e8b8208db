"""Engine names and settings: which engine class a learner builds, with which options.

`EngineSettings.parse` runs once, when the ServiceClient is made (or the run's config is
validated), so a bad engine name or option fails before any model loads, naming the key.
"""

from __future__ import annotations

import importlib
import typing
from dataclasses import dataclass, fields
from typing import Any

from rlkit.api.typecheck import matches, type_name
from rlkit.backend import models

# Short name -> engine class. A new engine needs no line here: its dotted path works as well.
ENGINES = {
    "hf": "rlkit.backend.engines.hf.HFEngine",
    "vllm": "rlkit.backend.engines.vllm.VLLMEngine",
    "vllm_server": "rlkit.backend.engines.vllm_server.VLLMServerEngine",
}
# Options every engine takes (the learner reads them; the engine never sees them).
COMMON_OPTIONS = ("probe_tolerance",)


@dataclass(frozen=True)
class EngineSettings:
    """The rollout engine a learner builds, and the options it is built with."""

    # The engine class (see base.Engine).
    engine: type
    # The engine's own options: an instance of `engine.Options`.
    options: Any
    # Largest mean |engine - trainer| logprob on the post-sync probe; None: by dtype (Learner).
    probe_tolerance: float | None = None

    @property
    def name(self) -> str:
        return self.engine.name

    @classmethod
    def parse(
        cls, engine: str = "hf", engine_options: dict | None = None, where: str = "engine_options "
    ) -> EngineSettings:
        """From a short name or a dotted path, and a dict of options. Errors name the key,
        prefixed with `where` (`engine.` for a run's config)."""
        engine_cls = _engine_class(engine)
        options = dict(engine_options or {})
        tolerance = options.pop("probe_tolerance", None)
        if not matches(tolerance, float | None):
            raise ValueError(f"{where}probe_tolerance={tolerance!r} must be a number or null")
        if tolerance is not None and not tolerance > 0:
            raise ValueError(f"{where}probe_tolerance must be > 0, got {tolerance!r}")
        known = [f.name for f in fields(engine_cls.Options)]
        if unknown := sorted(set(options) - set(known)):
            raise ValueError(
                f"unknown {', '.join(where + key for key in unknown)} for engine "
                f"{engine_cls.name!r}; known: {', '.join([*COMMON_OPTIONS, *known])}"
            )
        hints = typing.get_type_hints(engine_cls.Options)
        for key, value in options.items():
            if not matches(value, hints[key]):
                raise ValueError(f"{where}{key}={value!r} must be {type_name(hints[key])}")
        try:
            engine_options = engine_cls.Options(**options)
        except ValueError as exc:
            raise ValueError(f"{where}{exc}") from None
        return cls(engine_cls, engine_options, tolerance)

    def check(self, base_model: str, device, spec) -> None:
        """Raises when the engine cannot serve this model, before any weights load (an engine
        class may define `check(model_config, device, spec, options)`; most need none, and for
        them the model's config is not even read)."""
        check = getattr(self.engine, "check", None)
        if check is not None:
            check(models.load_config(base_model), device, spec, self.options)

    def build(self, learner):
        """The engine for `learner` (an engine may hand over to another, e.g. vllm -> hf)."""
        return self.engine.build(learner, self.options)


def _engine_class(engine: str) -> type:
    path = ENGINES.get(engine, engine)
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(
            f"unknown engine {engine!r}; known engines: {', '.join(ENGINES)} "
            "(or the dotted path of an engine class)"
        )
    try:
        engine_cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import engine {path!r}: {exc}") from None
    for needed in ("name", "Options", "build"):
        if not hasattr(engine_cls, needed):
            raise ValueError(f"engine {path!r} has no {needed!r} (see rlkit.backend.engines.base)")
    return engine_cls
