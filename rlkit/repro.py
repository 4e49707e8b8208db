"""Reproducibility: seeds derived from the run seed, the determinism switches, the run manifest,
and `python -m rlkit.repro compare RUN_A RUN_B`.

Every random stream of a run is a pure function of the run seed and a name (`derive_seed(seed,
"problems", step)`), never of how many draws came before. So a resumed run regenerates exactly
the problems and per-request sampling seeds an uninterrupted one would, and any rollout engine
that honours `SamplingParams.seed` reproduces the same rollouts without engine-specific state.
The global RNGs (python, numpy, torch) are seeded too, for code that uses them anyway, and
checkpoints save and restore their states.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
from dataclasses import dataclass, field
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
NOT_HASHED = ("resume",)


# ---- seeds --------------------------------------------------------------------------------------
def derive_seed(seed: int, *names: object) -> int:
    """A 31-bit seed for the stream `names` of run `seed` (sha256: stable across processes,
    platforms and Python versions, unlike hash())."""
    key = "/".join(map(str, (seed, *names)))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") & 0x7FFF_FFFF


def rng(seed: int, *names: object) -> random.Random:
    """A private `random.Random` for the stream `names` of run `seed`."""
    return random.Random(derive_seed(seed, *names))


def apply_determinism(cfg) -> None:
    """Seed the global RNGs and set the determinism switches of `cfg.determinism`.

    Call before any model or engine starts: the environment variables are read when CUDA's
    cuBLAS and vLLM initialize, not later.
    """
    import numpy as np
    import torch

    det = cfg.determinism
    if det.cublas_workspace:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = det.cublas_workspace
    os.environ["VLLM_BATCH_INVARIANT"] = "1" if det.vllm_batch_invariant else "0"
    if det.num_threads:
        torch.set_num_threads(det.num_threads)
    torch.use_deterministic_algorithms(det.deterministic_algorithms, warn_only=det.warn_only)
    if det.deterministic_algorithms:
        torch.backends.cudnn.benchmark = False  # benchmarking picks kernels by timing
    random.seed(derive_seed(cfg.seed, "python"))
    np.random.seed(derive_seed(cfg.seed, "numpy"))
    torch.manual_seed(derive_seed(cfg.seed, "torch"))


# ---- the manifest -------------------------------------------------------------------------------
def config_hash(config: dict) -> str:
    kept = {k: v for k, v in config.items() if k not in NOT_HASHED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def git_info(path: Path | None = None) -> dict | None:
    """Commit and dirty flag of the checkout rlkit runs from; None outside a git checkout."""
    package = (path or Path(__file__).parent).resolve()

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
    }


def build_manifest(cfg, device, dtype, resumed_from: dict | None = None) -> dict:
    from omegaconf import OmegaConf

    import rlkit

    config = OmegaConf.to_container(cfg, resolve=True)
    return {
        "config": config,
        "config_hash": config_hash(config),
        "rlkit_version": rlkit.__version__,
        "git": git_info(),
        "versions": package_versions(),
        "device": device_info(device, dtype),
        "engine": cfg.engine.name,
        "determinism": determinism_state(cfg, dtype),
        "env": {name: os.environ.get(name) for name in KERNEL_ENV_VARS},
        "resumed_from": resumed_from,
        "command": sys.argv,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_manifest(run_dir: Path, cfg, device, dtype, resumed_from: dict | None = None) -> Path:
    path = Path(run_dir) / "manifest.json"
    manifest = build_manifest(cfg, device, dtype, resumed_from)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


# ---- compare ------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """How two run directories differ; `equal` means metrics.jsonl and adapter/ are bitwise equal."""

    metrics: str | None = None  # first divergence, or None when the files are identical
    adapter: list[str] = field(default_factory=list)  # files of adapter/ that differ
    manifest: list[str] = field(default_factory=list)  # "key: A vs B" per differing field

    @property
    def equal(self) -> bool:
        return self.metrics is None and not self.adapter


def first_divergence(a: Path, b: Path) -> str | None:
    """Where two metrics.jsonl files first differ: the step and the metric, or None."""
    lines_a, lines_b = a.read_bytes().splitlines(), b.read_bytes().splitlines()
    for line_a, line_b in zip(lines_a, lines_b, strict=False):
        if line_a == line_b:
            continue
        rec_a, rec_b = json.loads(line_a), json.loads(line_b)
        if rec_a.get("step") != rec_b.get("step"):
            return f"step {rec_a.get('step')} (A) vs step {rec_b.get('step')} (B) on the same line"
        for key in sorted(set(rec_a) | set(rec_b)):
            if rec_a.get(key, "<absent>") != rec_b.get(key, "<absent>"):
                return (
                    f"step {rec_a['step']}, metric {key}: "
                    f"{rec_a.get(key, '<absent>')} (A) vs {rec_b.get(key, '<absent>')} (B)"
                )
        return f"step {rec_a['step']}: same values, different bytes"
    if len(lines_a) != len(lines_b):
        longer, extra = ("A", lines_a) if len(lines_a) > len(lines_b) else ("B", lines_b)
        step = json.loads(extra[min(len(lines_a), len(lines_b))]).get("step")
        return f"{longer} goes on from step {step} ({len(lines_a)} vs {len(lines_b)} lines)"
    return None


def differing_files(a: Path, b: Path) -> list[str]:
    """Relative paths under two directories whose bytes differ or that exist on one side only."""
    files_a = (
        {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()} if a.is_dir() else set()
    )
    files_b = (
        {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()} if b.is_dir() else set()
    )
    if not files_a and not files_b:
        return []
    out = []
    for rel in sorted(files_a | files_b):
        if rel not in files_a or rel not in files_b:
            out.append(f"{rel} (only in {'B' if rel not in files_a else 'A'})")
        elif (a / rel).read_bytes() != (b / rel).read_bytes():
            out.append(rel)
    return out


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def manifest_differences(a: Path, b: Path) -> list[str]:
    if not (a.exists() and b.exists()):
        return [f"manifest.json missing in {'A' if not a.exists() else 'B'}"]
    flat_a = flatten(json.loads(a.read_text()))
    flat_b = flatten(json.loads(b.read_text()))
    return [
        f"{key}: {flat_a.get(key, '<absent>')!r} (A) vs {flat_b.get(key, '<absent>')!r} (B)"
        for key in sorted(set(flat_a) | set(flat_b))
        if key.split(".")[0] not in VOLATILE and flat_a.get(key) != flat_b.get(key)
    ]


def compare(run_a: Path, run_b: Path) -> Comparison:
    run_a, run_b = Path(run_a), Path(run_b)
    for run in (run_a, run_b):
        if not (run / "metrics.jsonl").exists():
            raise FileNotFoundError(f"{run} is not a run directory (no metrics.jsonl)")
    return Comparison(
        metrics=first_divergence(run_a / "metrics.jsonl", run_b / "metrics.jsonl"),
        adapter=differing_files(run_a / "adapter", run_b / "adapter"),
        manifest=manifest_differences(run_a / "manifest.json", run_b / "manifest.json"),
    )


def report(result: Comparison, run_a: Path, run_b: Path) -> str:
    lines = [f"A = {run_a}", f"B = {run_b}"]
    if result.equal:
        lines.append("bitwise equal: metrics.jsonl and adapter/ are identical")
    else:
        lines.append("NOT equal:")
        if result.metrics:
            lines.append(f"  metrics.jsonl first diverges at {result.metrics}")
        if result.adapter:
            lines.append(f"  adapter/ files that differ: {', '.join(result.adapter)}")
        else:
            lines.append("  adapter/ files are identical")
    if result.manifest:
        lines.append("manifest fields that differ:")
        lines += [f"  {line}" for line in result.manifest]
    else:
        lines.append("manifests agree (timestamps and command lines aside)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlkit.repro", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser(
        "compare", help="are two runs bitwise equal? if not, where do they first diverge"
    )
    cmp.add_argument("run_a", type=Path)
    cmp.add_argument("run_b", type=Path)
    args = parser.parse_args(argv)
    try:
        result = compare(args.run_a, args.run_b)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(result, args.run_a, args.run_b))
    return 0 if result.equal else 1


if __name__ == "__main__":
    sys.exit(main())
