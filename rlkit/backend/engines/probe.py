"""The post-sync probe: proof that the engine serves the adapter it was just given.

A `Snapshot` is the adapter's tensors at one moment plus the trainer's own logprobs of a fixed
probe sequence under them. After the engine loads a snapshot it scores the same sequence; if its
logprobs are off by more than the tolerance, the engine is not serving what was trained (a stale
adapter, a dropped module, a wrong scale) and sampling stops with `StaleAdapterError`: training
on rollouts from the wrong policy fails silently otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlkit.api.errors import RlkitError

PROBE_LENGTH = 32


class StaleAdapterError(RlkitError):
    """The rollout engine does not serve the adapter it was just given."""


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
