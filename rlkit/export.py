"""`python -m rlkit.export RUN_DIR OUT_DIR [--merge]`: a trained adapter, or the model with it
merged, as files other tools load.

RUN_DIR is a run directory (its `adapter/`, written when the run finished), or any adapter folder
rlkit saved (`save_weights_for_sampler`, `save_state`, a checkpoint's `state/`). Without --merge,
OUT_DIR gets the adapter in peft's format, its `base_model_name_or_path` pointing at the base
model's local checkpoint, with the tokenizer and its chat template:
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), OUT_DIR)`.
With --merge, OUT_DIR is a plain transformers checkpoint of base + adapter (LoRA: W + (alpha/r)
B A; DoRA: its magnitude times the normalised direction), which transformers, vLLM and friends
load as any model. A 4-bit base (QLoRA, QDoRA) is first de-quantized, value for value, so the
merged model is the one that was trained (its float32 weights hold the 4-bit values, not the
original checkpoint's); input embeddings tied to the output layer get their own copy of the
weight, as merging an adapter into the output layer would otherwise change them too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from rlkit.api.errors import RlkitError
from rlkit.api.quant import QuantSpec
from rlkit.backend import models

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "rlkit_state.json")


class ExportError(RlkitError):
    """What to export cannot be found or written."""


def find_adapter(run_dir: Path) -> Path:
    """The adapter folder of a run dir (or the folder itself, when it is one)."""
    for candidate in (run_dir / "adapter", run_dir):
        if all((candidate / name).is_file() for name in ADAPTER_FILES):
            return candidate
    if not run_dir.exists():
        raise ExportError(f"{run_dir} does not exist")
    hint = ""
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        state = run_dir / "checkpoints" / latest.read_text().strip() / "state"
        hint = f"; the run has not finished: export its latest checkpoint with {state} as RUN_DIR"
    raise ExportError(
        f"{run_dir} holds no adapter (no adapter/ with {', '.join(ADAPTER_FILES)}){hint}"
    )


def export(run_dir: Path, out_dir: Path, merge: bool = False) -> str:
    """Write the export into `out_dir` (which must not exist); returns a one-line summary."""
    adapter = find_adapter(run_dir)
    if out_dir.exists():
        raise ExportError(
            f"{out_dir} already exists: choose a new OUT_DIR (nothing is overwritten)"
        )
    state = json.loads((adapter / "rlkit_state.json").read_text())
    base, quant = state["base_model"], QuantSpec(**state["quant"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        if merge:
            summary = _merged(adapter, base, quant, staging)
        else:
            summary = _adapter(adapter, base, staging)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _adapter(adapter: Path, base: str, out: Path) -> str:
    for name in ADAPTER_FILES:
        shutil.copy2(adapter / name, out / name)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = models.resolve(base)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    models.load_tokenizer(base).save_pretrained(out)
    return f"adapter of {base} (peft format) with its tokenizer"


def _merged(adapter: Path, base: str, quant: QuantSpec, out: Path) -> str:
    from peft import PeftModel

    if quant.method == "int8":
        raise ExportError(
            "--merge of an int8 base: LLM.int8 layers compute part of each product in float16 "
            "at run time, which no float checkpoint reproduces; export the adapter without "
            "--merge and load it on the int8 base"
        )
    dtype = torch.float32
    model = models.load_model(base, dtype=dtype, quant=quant if quant.enabled else None)
    precision = "float32"
    if quant.enabled:
        dequantize(model, dtype)
        precision = f"float32, holding the de-quantized {quant.method} values of the base"
    models.untie_embeddings(model)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    models.save_checkpoint(merged, models.load_tokenizer(base), out)
    return f"{base} with the adapter merged, weights in {precision}"


def dequantize(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every 4-bit layer of `model` replaced by a float linear layer holding its de-quantized
    weight (the values the quantized layer computes with), and the record of quantization
    removed from its config."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            linear = torch.nn.Linear(
                module.in_features, module.out_features, module.bias is not None, dtype=dtype
            )
            linear.weight.data = weight.to(dtype)
            if module.bias is not None:
                linear.bias.data = module.bias.data.to(dtype)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, linear)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.is_loaded_in_4bit = False
    model.hf_quantizer = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlkit.export",
        description="Export a run's adapter (peft format), or the base model with it merged "
        "(--merge), with the tokenizer and chat template.",
    )
    parser.add_argument("run_dir", type=Path, help="a run dir, or an adapter folder rlkit saved")
    parser.add_argument("out_dir", type=Path, help="where to write (must not exist)")
    parser.add_argument("--merge", action="store_true", help="write base + adapter as one model")
    args = parser.parse_args(argv)
    try:
        summary = export(args.run_dir, args.out_dir, args.merge)
    except RlkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out_dir}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
