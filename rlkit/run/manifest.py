"""The run manifest: what decides a run's bits (config and its hash, versions, device,
determinism switches, kernel-related environment variables), written as `manifest.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

# Environment variables that change which kernels run or how they reduce; recorded in the
# manifest (null when unset) because two runs that differ in them may differ in their bits.
KERNEL_ENV_VARS = (
    "CUBLAS_WORKSPACE_CONFIG",
    "VLLM_BATCH_INVARIANT",
    "VLLM_ATTENTION_BACKEND",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_LAUNCH_BLOCKING",
    "NVIDIA_TF32_OVERRIDE",
    "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_CBWR",
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "PYTHONHASHSEED",
)
# Distributions whose versions go in the manifest (null when not installed).
PACKAGES = ("torch", "transformers", "peft", "vllm", "tokenizers", "safetensors", "numpy")
# Manifest fields that differ between any two runs; `compare` does not list them.
VOLATILE = ("started_at", "command")
# Config keys that say how to start a run, not what it computes: left out of the config hash.
NOT_HASHED = ("resume", "distributed")


def config_hash(config: dict) -> str:
    kept = {k: v for k, v in config.items() if k not in NOT_HASHED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def git_info(path: Path | None = None) -> dict | None:
    """Commit and dirty flag of the checkout rlkit runs from; None outside a git checkout."""
    package = (path or Path(__file__).parents[1]).resolve()  # the rlkit package

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10
        )
        if out.returncode:
            raise OSError(out.stderr)
        return out.stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top / package.name != package:  # an installed copy that sits inside some other repo
            return None
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        candidates = (name, f"{name}-cpu") if name == "vllm" else (name,)
        versions[name] = None
        for dist in candidates:
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                pass
    return versions


def device_info(device, dtype) -> dict:
    import torch

    info = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "platform": platform.platform(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if torch.device(device).type == "cuda":
        index = torch.device(device).index or 0
        info.update(
            gpu=torch.cuda.get_device_name(index),
            compute_capability=".".join(map(str, torch.cuda.get_device_capability(index))),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def determinism_state(cfg, dtype) -> dict:
    """The switches as configured (dtype is `model.dtype`, resolved) and as torch reports them."""
    import torch

    return {
        "seed": cfg.seed,
        "dtype": str(dtype).removeprefix("torch."),
        **dict(cfg.determinism),
        "torch_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch_num_threads": torch.get_num_threads(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        # The hf engine's decode batch moves sampled logprobs by float rounding (docs/reproducibility.md).
        "engine_batch_rows": cfg.engine.get("batch_rows"),
    }


def build_manifest(
    cfg,
    device,
    dtype,
    engine: str,
    resumed_from: dict | None = None,
    processes: dict | None = None,
    sweep: dict | None = None,
) -> dict:
    import rlkit
    from rlkit.run.build import plain

    config = plain(cfg)
    return {
        "config": config,
        "config_hash": config_hash(config),
        "rlkit_version": rlkit.__version__,
        "git": git_info(),
        "versions": package_versions(),
        "device": device_info(device, dtype),
        "engine": engine,
        # World size, backend and launcher settings of a data-parallel run; one process: 1.
        "processes": processes or {"world_size": 1},
        # A sweep arm trained beside others on one base (hydra/launcher=adapters): which one.
        "sweep": sweep,
        "determinism": determinism_state(cfg, dtype),
        "env": {name: os.environ.get(name) for name in KERNEL_ENV_VARS},
        "resumed_from": resumed_from,
        "command": sys.argv,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_manifest(
    run_dir: Path,
    cfg,
    device,
    dtype,
    engine: str,
    resumed_from: dict | None = None,
    segment_start: int = 0,
    processes: dict | None = None,
    sweep: dict | None = None,
) -> Path:
    """`manifest.json`, the newest segment's, and `manifests/step_NNNNNN.json` for the segment
    that starts at RL step NNNNNN: a run resumed with another config or on another machine keeps
    the record of each of its parts (a fresh start clears earlier ones)."""
    manifest = build_manifest(cfg, device, dtype, engine, resumed_from, processes, sweep)
    text = json.dumps(manifest, indent=2, sort_keys=True)
    segments = Path(run_dir) / "manifests"
    if segment_start == 0 and resumed_from is None:
        shutil.rmtree(segments, ignore_errors=True)
    segments.mkdir(exist_ok=True)
    (segments / f"step_{segment_start:06d}.json").write_text(text + "\n")
    path = Path(run_dir) / "manifest.json"
    path.write_text(text + "\n")
    return path


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys (`{"a": {"b": 1}}` -> `{"a.b": 1}`)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}
