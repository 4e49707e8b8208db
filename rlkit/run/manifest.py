"""The run manifest: what decides a run's bits (config and its hash, versions, the installed
packages against the lock, the machine's traits, device, determinism switches, kernel-related
environment variables), written as `manifest.json`.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import re
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
# The lock `make setup` installs (a source checkout's; see docs/development.md).
LOCK = "requirements/cpu.txt"
# MKL's conditional-numerical-reproducibility branches (mkl_service.h): the code path its kernels
# take. AUTO picks one by processor; where MKL lists no branch for the processor (AMD's, for one)
# AUTO itself is reported and a generic path runs. Measured (docs/reproducibility.md): another
# branch, another pair_sum curve.
MKL_BRANCHES = {
    0: "OFF",
    1: "BRANCH_OFF",
    2: "AUTO",
    3: "COMPATIBLE",
    4: "SSE2",
    6: "SSSE3",
    7: "SSE4_1",
    8: "SSE4_2",
    9: "AVX",
    10: "AVX2",
    11: "AVX512_MIC",
    12: "AVX512",
    13: "AVX512_MIC_E1",
    14: "AVX512_E1",
}
# CPU flags that decide which vector kernels torch, MKL and oneDNN pick.
ISA_FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4", "vnni")
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


def _dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: how pip and uv compare names


def installed_packages() -> dict[str, str]:
    """Every installed distribution's version, by normalized name."""
    return dict(
        sorted((_dist_name(d.metadata["Name"]), d.version) for d in metadata.distributions())
    )


def environment_info(lock: Path | None = None) -> dict:
    """The installed packages, their digest, and how they stand against the lock: its sha256 and
    the packages whose installed version is not the locked one (null outside a source checkout,
    whose lock `make setup` installs)."""
    installed = installed_packages()
    listing = "\n".join(f"{name}=={version}" for name, version in installed.items())
    info: dict[str, Any] = {
        "packages": installed,
        "packages_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "lock": None,
    }
    lock = lock or Path(__file__).resolve().parents[2] / LOCK
    if lock.is_file():
        text = lock.read_text()
        pins = {
            _dist_name(n): v for n, v in re.findall(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", text, re.M)
        }
        info["lock"] = {
            "file": LOCK,
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            # What this environment has that the lock does not say: the first suspect when
            # two runs differ (`python -m rlkit.repro compare`).
            "not_as_locked": sorted(
                f"{name}=={installed.get(name, 'absent')} (locked {version})"
                for name, version in pins.items()
                if installed.get(name) != version
            ),
            "not_in_lock": sorted(
                f"{name}=={version}"
                for name, version in installed.items()
                if name not in pins and name != "rlkit"
            ),
        }
    return info


def cpu_info() -> dict:
    """The CPU's vendor, model and vector-ISA flags (Linux's /proc/cpuinfo; elsewhere what
    `platform` says) and its core count."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():
                    if fields:
                        break  # the first processor's block says it
                    continue
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = sorted(f for f in fields.get("flags", "").split() if f.startswith(ISA_FLAG_PREFIXES))
    return {
        "cpu_vendor": fields.get("vendor_id") or platform.processor() or None,
        "cpu_model": fields.get("model name") or platform.machine() or None,
        "cpu_isa_flags": " ".join(flags) or None,
        "cpu_count": os.cpu_count(),
    }


def mkl_info(torch) -> dict:
    """MKL's version, its branch in force (MKL_CBWR) and the branch AUTO takes on this CPU; null
    where torch has no MKL or its library does not export the calls."""
    info = {"mkl_version": None, "mkl_branch": None, "mkl_auto_branch": None}
    if not torch.backends.mkl.is_available():
        return info
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        text = ctypes.create_string_buffer(256)
        lib.MKL_Get_Version_String(text, len(text))
        info["mkl_version"] = text.value.decode(errors="replace").strip()
        lib.mkl_serv_cbwr_get.argtypes = [ctypes.c_int]
        branch, auto = lib.mkl_serv_cbwr_get(1), lib.mkl_serv_cbwr_get_auto_branch()
        info["mkl_branch"] = MKL_BRANCHES.get(branch, str(branch))
        info["mkl_auto_branch"] = MKL_BRANCHES.get(auto, str(auto))
    except (OSError, AttributeError):
        pass
    return info


def machine_traits() -> dict:
    """What of the machine and its math libraries decides the bits of CPU kernels, beside the
    package versions: the CPU, the kernels ATen dispatches to (its CPU capability), MKL's code
    path, oneDNN's version and the C library."""
    import torch

    onednn = re.search(r"MKL-DNN (v[\w.]+)", torch.__config__.show())
    return {
        **cpu_info(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **mkl_info(torch),
        "onednn_version": onednn.group(1) if onednn else None,
        "libc": " ".join(platform.libc_ver()).strip() or None,
    }


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
        "environment": environment_info(),
        "machine": machine_traits(),
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
