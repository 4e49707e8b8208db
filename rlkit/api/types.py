"""Data that crosses the seam, named as in the hosted Tinker SDK's `tinker.types`.

Everything here is plain data: dataclasses of Python lists and numbers, so it can be logged,
compared and (later) sent between processes. Objects of the hosted SDK's own `tinker.types` are
accepted wherever these are, by duck typing (`to_ints()`, `tolist()`), without importing it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

StopReason = Literal["stop", "length"]

# The dtypes a model runs in, by the name the config and the client take (`model.dtype`,
# `create_lora_training_client(dtype=...)`, `model.quant_compute_dtype`); "auto" besides.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EncodedTextChunk:
    """A run of token ids; the only chunk kind a local text model needs."""

    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class ModelInput:
    """A token sequence fed to the model, as a list of chunks."""

    chunks: list[EncodedTextChunk] = field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=[int(t) for t in tokens])])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.tokens]

    @property
    def length(self) -> int:
        return sum(len(chunk.tokens) for chunk in self.chunks)

    def append(self, chunk: EncodedTextChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[int(token)]))


TensorDtype = Literal["int64", "float32"]


@dataclass
class TensorData:
    """A flat list of numbers plus dtype and shape: what a loss input or output looks like."""

    data: list[int] | list[float]
    dtype: TensorDtype
    shape: list[int] | None = None

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        dtype: TensorDtype = "int64" if np.issubdtype(array.dtype, np.integer) else "float32"
        return cls(data=array.reshape(-1).tolist(), dtype=dtype, shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        return cls.from_numpy(tensor.detach().cpu().numpy())

    @classmethod
    def from_list(cls, values: Sequence[Any]) -> TensorData:
        return cls.from_numpy(np.asarray(values))

    def to_numpy(self) -> np.ndarray:
        array = np.asarray(self.data, dtype=np.int64 if self.dtype == "int64" else np.float32)
        return array.reshape(self.shape) if self.shape is not None else array

    def to_torch(self) -> torch.Tensor:
        return torch.from_numpy(self.to_numpy())

    def tolist(self) -> list:
        return self.to_numpy().tolist()


def to_tensor_data(value: Any) -> TensorData:
    """Coerce a loss input given as TensorData (ours or the SDK's), torch, numpy or a list."""
    if isinstance(value, TensorData):
        return value
    if isinstance(value, torch.Tensor):
        return TensorData.from_torch(value)
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if hasattr(value, "to_numpy"):  # the hosted SDK's TensorData
        return TensorData.from_numpy(np.asarray(value.to_numpy()))
    if isinstance(value, list | tuple):
        return TensorData.from_list(value)
    raise TypeError(
        f"expected TensorData, torch.Tensor, numpy array or list, got {type(value).__name__}"
    )


def to_token_list(model_input: Any) -> list[int]:
    """Token ids of a ModelInput (ours or the SDK's) or of a plain list of ints."""
    if hasattr(model_input, "to_ints"):
        return [int(t) for t in model_input.to_ints()]
    if isinstance(model_input, list | tuple):
        return [int(t) for t in model_input]
    raise TypeError(f"expected ModelInput or a list of token ids, got {type(model_input).__name__}")


@dataclass
class Datum:
    """One training sequence: the model input and everything its loss needs, position-aligned.

    Position i of every `loss_fn_inputs` tensor belongs to position i of `model_input`, which
    predicts `target_tokens[i]` (the next token of the full sequence).
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.loss_fn_inputs = {k: to_tensor_data(v) for k, v in self.loss_fn_inputs.items()}


@dataclass
class SamplingParams:
    """How to sample. `top_k=-1` and `top_p=1` disable those filters; `temperature=0` is greedy.

    `stop` is a list of strings or a list of token ids; the tokenizer's end-of-turn token always
    stops too. `seed` makes one request reproducible on its own.
    """

    max_tokens: int | None = None
    seed: int | None = None
    stop: str | Sequence[str] | Sequence[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or >= 1, got {self.top_k}")


@dataclass
class AdamParams:
    """One optimizer step's hyperparameters; a schedule is the caller's loop, step by step."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    # 0 means no clipping.
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("learning_rate", "eps", "weight_decay", "grad_clip_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"AdamParams.{name} must be a finite number >= 0, got {value}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"AdamParams.{name} must be in [0, 1), got {value}")


@dataclass
class SampledSequence:
    """One completion: its tokens (the stop token included when it stopped), one logprob each."""

    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None
    # With sample(topk_sample_logprobs=k): each token's position's k most likely tokens,
    # [(token id, logprob), ...] from the most likely, the raw policy's logprobs.
    topk_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class SampleResponse:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    # With sample(topk_prompt_logprobs=k): each prompt position's k most likely tokens (None for
    # the first position, which nothing predicts).
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclass
class ForwardBackwardOutput:
    """Per-datum outputs (`logprobs` of each target token, `elementwise_loss`) and metrics."""

    loss_fn_output_type: str
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]

    @property
    def loss(self) -> float:
        return self.metrics["loss:sum"]


@dataclass
class OptimStepResponse:
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SaveWeightsResponse:
    """Where the weights went; `path` is a local directory that `load_state` accepts."""

    path: str


@dataclass
class SaveWeightsForSamplerResponse:
    path: str


@dataclass
class LoadWeightsResponse:
    path: str


@dataclass
class GetInfoResponse:
    base_model: str
    lora_rank: int
    model_id: str
    vocab_size: int
    trainable_params: int
    # The longest sequence (prompt + completion) the model takes, in tokens (local extension).
    max_context_length: int | None = None
