"""rlkit: RL post-training for language models on a local, Tinker-style API.

`import rlkit as tinker` gives code written for the hosted Tinker SDK the same names:
`ServiceClient`, `TrainingClient`, `SamplingClient`, `types`, and the common types at top level.

Names are imported on first use (PEP 562), so `import rlkit.rewards` or `import rlkit.envs`
(what a plugin author imports) does not pay for torch, transformers and peft.

The package in folders, layered top to bottom (each imports only the ones below it; `make lint`
checks it):
- `rl/`: the algorithm half: the RL loop, SFT, advantages, envs, rewards;
- `run/`: run plumbing: config schema, checkpoints, seeds, manifest, outputs, sweeps, plugins;
- `client.py`: the seam, the Tinker-style API; the two halves meet only here;
- `backend/`: the machine half: learner, batching, models, adapters, rollout engines;
- `api/`: what crosses the seam: types, losses, errors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "APIFuture": "rlkit.client",
    "ServiceClient": "rlkit.client",
    "TrainingClient": "rlkit.client",
    "SamplingClient": "rlkit.client",
    "InvalidDatumError": "rlkit.api.errors",
    "ModelNotFoundError": "rlkit.api.errors",
    "NoGradientsError": "rlkit.api.errors",
    "RlkitError": "rlkit.api.errors",
    "UnknownLossError": "rlkit.api.errors",
    "AdamParams": "rlkit.api.types",
    "Datum": "rlkit.api.types",
    "EncodedTextChunk": "rlkit.api.types",
    "ForwardBackwardOutput": "rlkit.api.types",
    "ModelInput": "rlkit.api.types",
    "SampledSequence": "rlkit.api.types",
    "SampleResponse": "rlkit.api.types",
    "SamplingParams": "rlkit.api.types",
    "TensorData": "rlkit.api.types",
}
__all__ = sorted([*_EXPORTS, "types"])

if TYPE_CHECKING:
    from rlkit.api import types  # noqa: F401
    from rlkit.api.errors import (  # noqa: F401
        InvalidDatumError,
        ModelNotFoundError,
        NoGradientsError,
        RlkitError,
        UnknownLossError,
    )
    from rlkit.api.types import (  # noqa: F401
        AdamParams,
        Datum,
        EncodedTextChunk,
        ForwardBackwardOutput,
        ModelInput,
        SampledSequence,
        SampleResponse,
        SamplingParams,
        TensorData,
    )
    from rlkit.client import (  # noqa: F401
        APIFuture,
        SamplingClient,
        ServiceClient,
        TrainingClient,
    )


def __getattr__(name: str):
    if name == "types":
        value = importlib.import_module("rlkit.api.types")
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'rlkit' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
