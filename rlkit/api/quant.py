"""The base model's quantization, declared once: the client API, the learner, checkpoints and
the run config (`model.quantize`, `model.quant_compute_dtype`, `model.double_quant`) all use
this class.

A quantized base (bitsandbytes) keeps the adapter in full precision on top of 4-bit or 8-bit
frozen weights: LoRA on it is QLoRA, DoRA on it is QDoRA.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rlkit.api.types import DTYPES

# The quantizations of the frozen base (the config's `model.quantize` choices).
METHODS = {
    "none": "full-precision base: LoRA, DoRA",
    "nf4": "4-bit NormalFloat (bitsandbytes): QLoRA, QDoRA",
    "fp4": "4-bit float (bitsandbytes)",
    "int8": "8-bit LLM.int8 (bitsandbytes); LoRA only",
}
# auto: the model's dtype.
COMPUTE_DTYPES = ("auto", *DTYPES)
# Devices bitsandbytes runs on (its CPU backend does 4-bit and 8-bit forward and backward).
DEVICES = ("cpu", "cuda")


class QuantizationUnavailable(Exception):
    """bitsandbytes cannot run this quantization here: `key` is the setting at fault
    (quantize, device, use_dora, compute_dtype), the message says why."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key


@dataclass(frozen=True)
class QuantSpec:
    """How the frozen base weights are stored and computed with."""

    # none (full precision), nf4 / fp4 (4-bit, bitsandbytes), int8 (8-bit, bitsandbytes).
    method: str = "none"
    # dtype of a 4-bit layer's matmul; auto: the model's dtype. int8 layers pick their own.
    compute_dtype: str = "auto"
    # 4-bit only: quantize the per-block scales too (~0.4 bits per weight less, lossless here).
    double_quant: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantize must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"quant_compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}; "
                f"got {self.compute_dtype!r}"
            )

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def to_dict(self) -> dict:
        return asdict(self)


def check_available(spec: QuantSpec, device_type: str, use_dora: bool = False) -> None:
    """Raises QuantizationUnavailable when `spec` cannot run on `device_type` here (bitsandbytes
    missing, a device it has no kernels for), or not with a DoRA adapter. Cheap: imports
    bitsandbytes, loads no model."""
    if not spec.enabled:
        return
    if device_type not in DEVICES:
        raise QuantizationUnavailable(
            "device", f"bitsandbytes runs on {' or '.join(DEVICES)} here, not {device_type}"
        )
    if spec.method == "int8" and use_dora:
        # Measured with bitsandbytes 0.50 + peft 0.21 on CPU: the first forward pass without
        # gradients (the post-sync probe, sampling) fails inside bitsandbytes' int8 matmul
        # once peft's DoRA has dequantized the weight for its norm.
        raise QuantizationUnavailable(
            "use_dora",
            "int8 with a DoRA adapter fails in bitsandbytes' int8 matmul at the first "
            "inference pass: use nf4 or fp4 for QDoRA, or a LoRA adapter with int8",
        )
    if spec.method == "int8" and spec.compute_dtype != "auto":
        raise QuantizationUnavailable(
            "compute_dtype", "int8 layers compute in float16 whatever is asked: leave it auto"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise QuantizationUnavailable(
            "quantize", f"it needs the bitsandbytes package ({exc}): pip install 'rlkit[quant]'"
        ) from None
