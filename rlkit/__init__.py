"""rlkit: RL post-training for language models on a local, Tinker-style API.

`import rlkit as tinker` gives code written for the hosted Tinker SDK the same names:
`ServiceClient`, `TrainingClient`, `SamplingClient`, `types`, and the common types at top level.
"""

from rlkit import types
from rlkit.client import APIFuture, SamplingClient, ServiceClient, TrainingClient
from rlkit.errors import (
    InvalidDatumError,
    ModelNotFoundError,
    NoGradientsError,
    RlkitError,
    UnknownLossError,
)
from rlkit.types import (
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

__version__ = "0.1.0"

__all__ = [
    "APIFuture",
    "AdamParams",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "InvalidDatumError",
    "ModelInput",
    "ModelNotFoundError",
    "NoGradientsError",
    "RlkitError",
    "SampleResponse",
    "SampledSequence",
    "SamplingClient",
    "SamplingParams",
    "ServiceClient",
    "TensorData",
    "TrainingClient",
    "UnknownLossError",
    "types",
]
