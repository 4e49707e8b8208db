"""Weight sync between trainer and engine, and the probe that proves it happened.

A `Snapshot` is the adapter's tensors at one moment plus the trainer's own logprobs of a fixed
probe sequence under them. After the engine loads a snapshot it scores the same sequence; if its
logprobs are off by more than the tolerance, the engine is not serving what was trained (a stale
adapter, a dropped module, a wrong scale) and sampling stops with `StaleAdapterError`: training
on rollouts from the wrong policy fails silently otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

import torch

from rlkit.engines.vllm import VLLMOptions
from rlkit.errors import RlkitError

log = logging.getLogger(__name__)
ENGINES = ("hf", "vllm")
PROBE_LENGTH = 32


class StaleAdapterError(RlkitError):
    """The rollout engine does not serve the adapter it was just given."""


@dataclass(frozen=True)
class EngineSettings:
    """The rollout engine a learner builds, checked once when the ServiceClient is made."""

    name: str = "hf"
    # Largest mean |engine - trainer| logprob on the probe; None: by dtype (see Learner).
    probe_tolerance: float | None = None
    # vLLM's options (ignored by hf).
    vllm: VLLMOptions = field(default_factory=VLLMOptions)

    @classmethod
    def parse(cls, name: str, options: dict | None) -> EngineSettings:
        """From `ServiceClient(engine=..., engine_options=...)`; a bad name or key is named."""
        if name not in ENGINES:
            raise ValueError(f"unknown engine {name!r}; known engines: {', '.join(ENGINES)}")
        options = dict(options or {})
        tolerance = options.pop("probe_tolerance", None)
        if tolerance is not None and not tolerance > 0:
            raise ValueError(f"engine_options probe_tolerance must be > 0, got {tolerance!r}")
        known = {f.name for f in fields(VLLMOptions)}
        if unknown := sorted(set(options) - known):
            raise ValueError(
                f"unknown engine_options {unknown}; known: probe_tolerance, {', '.join(sorted(known))}"
            )
        return cls(name, tolerance, VLLMOptions(**options))


@dataclass(frozen=True, eq=False)
class Snapshot:
    tensors: dict[str, torch.Tensor]
    # The trainer's logprobs of probe_tokens[1:] under these tensors.
    probe: torch.Tensor


def probe_tokens(vocab_size: int) -> list[int]:
    """A fixed, varied token sequence: the same for every run of a model."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (PROBE_LENGTH,), generator=generator).tolist()


def check_probe(
    served: torch.Tensor,
    snapshot: Snapshot,
    previous: Snapshot | None,
    tolerance: float,
    engine: str,
) -> float:
    """Mean |engine - trainer| logprob on the probe; raises when it exceeds `tolerance`."""
    mismatch = float((served - snapshot.probe).abs().mean())
    if mismatch <= tolerance:
        return mismatch
    detail = ""
    if previous is not None:
        to_previous = float((served - previous.probe).abs().mean())
        if to_previous < mismatch:
            detail = f"; it is closer to the previous adapter ({to_previous:.2e}): a stale adapter"
    raise StaleAdapterError(
        f"engine={engine} does not serve the adapter just synced: mean |logprob difference| "
        f"to the trainer on the probe is {mismatch:.2e} > tolerance {tolerance:.1e}{detail}. "
        "Set engine.probe_tolerance only if you know the engine's numerics differ this much."
    )


def build_engine(learner):
    """The learner's rollout engine, by name; DoRA on vLLM falls back to `hf` with a warning."""
    from rlkit.engines import hf

    if learner.engine.name == "vllm":
        if not learner.spec.use_dora:
            from rlkit.engines import vllm

            return vllm.VLLMEngine(
                learner.model,
                learner.base_model,
                learner.spec.rank,
                learner.dtype,
                learner.device,
                learner.engine.vllm,
            )
        log.warning(
            "engine=vllm cannot serve DoRA adapters (vLLM's LoRA path has no magnitude vector): "
            "sampling with engine=hf (the merged adapter) instead"
        )
    return hf.HFEngine(learner.model, learner.tokenizer)
