"""Peak memory and step time of LoRA, DoRA, QLoRA and QDoRA on the same model, side by side.

Each (model, variant) runs in its own subprocess, so each has its own memory high-water mark.
The models are built locally with random init (Qwen3 shapes, rlkit's byte vocabulary; nothing
is downloaded) and cached under $RLKIT_CACHE_DIR. Variants of one model run back to back, so a
noisy machine slows them alike: read the ratios.

    python scripts/bench_quantized.py                         # CPU: sizes medium, large
    python scripts/bench_quantized.py --sizes medium,1b --budget-gib 8
    python scripts/bench_quantized.py --device cuda --dtype bfloat16 --sizes large,1b,4b

Per variant: the memory after the model loads and the peak while training and sampling (CPU:
resident memory, VmHWM reset after loading, since the load itself reads the full-precision
checkpoint; GPU: torch's allocated memory), the time of one forward_backward + optim_step, and
of one sampling round (sync + 4 prompts x 4 samples x 16 tokens). "Fits in budget" divides the
budget by the measured bytes per base parameter (CPU: peak minus the process's memory before
the model loads), a linear estimate.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    # ~19M parameters (rlkit's rollout benchmark's "medium").
    "medium": (512, 1536, 6, 8, 4, 64),
    # ~0.32B parameters: 16 layers of 1024 wide.
    "large": (1024, 3072, 16, 16, 8, 64),
    # ~1.1B parameters (TinyLlama-like shapes): 22 layers of 2048, MLP 5632.
    "1b": (2048, 5632, 22, 32, 4, 64),
    # ~3.6B parameters: Qwen3-4B's layers (36 of 2560, MLP 9728) with rlkit's byte vocabulary.
    "4b": (2560, 9728, 36, 32, 8, 128),
}


def random_sequences(count: int = 4, length: int = 65) -> list[list[int]]:
    """The benchmarks' batch: `count` seeded random byte-token sequences of `length` tokens."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 259, (length,), generator=generator).tolist() for _ in range(count)]


def build_once(size: str) -> str:
    """The built-in name of the benchmark model of `size`, registered in this process; built
    on first use (by the parent, so that no measured process pays for it), then cached."""
    from rlkit.backend import models

    name = f"bench-{size}"
    models.BUILTIN_MODELS[name] = models.BuiltinSpec(*SIZES[size])
    models.builtin_path(name)
    return name


def run_child(script: str, *args: str) -> dict:
    """Run `script --child ARGS` in a fresh process; its result is its last line's JSON."""
    out = subprocess.run(
        [sys.executable, script, "--child", *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


VARIANTS = {
    "lora": {},
    "dora": {"use_dora": True},
    "qlora": {"quantize": "nf4"},
    "qdora": {"quantize": "nf4", "use_dora": True},
}


def status(field: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def base_parameters(model_dir: Path) -> int:
    """Parameters of the full-precision checkpoint (a 4-bit tensor's numel counts bytes)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def child(size: str, variant: str, rank: int, steps: int, device: str, dtype: str) -> dict:
    import torch

    import rlkit
    from rlkit.api import types
    from rlkit.backend import models

    name = build_once(size)  # built by the parent: found in the cache
    gpu = device.startswith("cuda")
    before = 0 if gpu else status("VmRSS")
    service = rlkit.ServiceClient(device=device, dtype=dtype)
    trainer = service.create_lora_training_client(name, rank=rank, seed=0, **VARIANTS[variant])
    # Memory freed while loading (the full-precision tensors a quantized load reads) goes back
    # to the system, so that what is measured is what the model holds.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    if gpu:
        loaded = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        loaded = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    data = []
    for tokens in random_sequences():
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 64},
            )
        )
    step_times = []
    for _ in range(steps + 1):  # the first one warms up
        t = time.perf_counter()
        trainer.forward_backward(data, "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=1e-4)).result()
        step_times.append(time.perf_counter() - t)
    t = time.perf_counter()
    sampler = trainer.save_weights_and_get_sampling_client()
    futures = [
        sampler.sample(
            types.ModelInput.from_ints(d.model_input.to_ints()[:16]),
            num_samples=4,
            sampling_params=types.SamplingParams(max_tokens=16, temperature=1.0, seed=i),
        )
        for i, d in enumerate(data)
    ]
    for f in futures:
        f.result()
    sample_time = time.perf_counter() - t
    return {
        "size": size,
        "variant": variant,
        "base_params": base_parameters(models.builtin_path(name)),
        "rss_before_model": before,
        "rss_loaded": loaded,
        "peak": torch.cuda.max_memory_allocated() if gpu else status("VmHWM"),
        "step_s": sorted(step_times[1:])[len(step_times[1:]) // 2],
        "sample_s": sample_time,
        "probe_mismatch": sampler.sync_metrics["sync/probe_mismatch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="medium,large")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="the base's (and 4-bit compute) dtype")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.rank, args.steps, args.device, args.dtype)))
        return
    gib = 2**30
    where = args.device
    if args.device.startswith("cuda"):
        import torch

        where = f"{torch.cuda.get_device_name()}, memory = torch's peak allocated"
    else:
        where = f"{os.cpu_count()} CPU threads, memory = peak resident set"
    print(
        f"rank {args.rank}, {args.dtype}, 4 x 64-token sequences per step, {where}, "
        f"budget {args.budget_gib:g} GiB\n"
    )
    print(
        "| model | variant | loaded (GiB) | peak (GiB) | peak / lora | step (s) | "
        "sampling round (s) | probe mismatch | fits in budget (params) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        build_once(size)
        lora_peak = None
        for variant in args.variants.split(","):
            r = run_child(
                __file__, size, variant, "--rank", str(args.rank), "--steps", str(args.steps),
                "--device", args.device, "--dtype", args.dtype,
            )  # fmt: skip
            lora_peak = r["peak"] if variant == "lora" else lora_peak
            ratio = f"{r['peak'] / lora_peak:.2f}" if lora_peak else "-"
            per_param = (r["peak"] - r["rss_before_model"]) / r["base_params"]
            fits = args.budget_gib * gib / per_param
            print(
                f"| {size} ({r['base_params'] / 1e6:.0f}M) | {variant} | "
                f"{r['rss_loaded'] / gib:.2f} | {r['peak'] / gib:.2f} | "
                f"{ratio} | {r['step_s']:.2f} | {r['sample_s']:.2f} | "
                f"{r['probe_mismatch']:.1e} | {fits / 1e9:.2f}B ({per_param:.2f} B/param) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
