"""What a KL penalty to the base model costs: peak memory and step time, side by side.

Three variants of the same PPO step on the same locally built model (random init, rlkit's byte
vocabulary; nothing is downloaded), each in its own subprocess so that each has its own memory
high-water mark:
- none: forward_backward + optim_step, no KL;
- adapter_off: the reference logprobs from the trainer's own model with the adapter switched
  off (`compute_reference_logprobs`, what `kl.coef` > 0 does), then the step with kl_coef;
- adapter_swap: the reference is a saved adapter (`set_reference(path)`, what
  `kl.reference=start` does after a warm start), swapped in for the reference's forward pass;
- base_copy: the reference from a separately loaded base model (a sampling client on the base,
  `compute_logprobs`), then the same step: what a framework without the adapter trick pays.
It also prints the largest difference between the two references' logprobs (they are the same
model: it should be float rounding).

    python scripts/bench_kl.py                   # sizes medium (19M), large (0.32B)
    python scripts/bench_kl.py --sizes large --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantized import (  # noqa: E402
    base_parameters,
    build_once,
    random_sequences,
    run_child,
    status,
)

VARIANTS = ("none", "adapter_off", "adapter_swap", "base_copy")


def child(size: str, variant: str, rank: int, steps: int) -> dict:
    import torch

    import rlkit
    from rlkit.api import types
    from rlkit.backend import models

    name = build_once(size)  # built by the parent: found in the cache
    before = status("VmRSS")
    scratch = tempfile.mkdtemp(prefix="bench-kl-")  # the swapped-in reference adapter
    service = rlkit.ServiceClient(device="cpu", dtype="float32", checkpoint_dir=scratch)
    trainer = service.create_lora_training_client(name, rank=rank, seed=0)
    base = service.create_sampling_client(base_model=name) if variant == "base_copy" else None
    if variant == "adapter_swap":  # a reference adapter that is not the base: one step away
        trainer.forward_backward(
            [_datum(torch.arange(3, 68).tolist())], "cross_entropy", None
        ).result()
        trainer.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        trainer.set_reference(trainer.save_weights_for_sampler("ref").result().path).result()
    loaded = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    data = []
    for tokens in random_sequences():
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "logprobs": [-5.5] * 64,
                    "advantages": [1.0] * 32 + [-1.0] * 32,
                    "weights": [0.0] * 16 + [1.0] * 48,
                },
            )
        )
    config = {} if variant == "none" else {"kl_coef": 0.05, "kl_estimator": "k3"}
    step_times, ref_times, diff = [], [], 0.0
    for _ in range(steps + 1):  # the first one warms up
        t = time.perf_counter()
        batch = data
        if variant != "none":
            refs = trainer.compute_reference_logprobs(data).result()
            refs = [r.to_torch() for r in refs]
            if variant == "base_copy":
                own = refs
                refs = [
                    torch.tensor(
                        base.compute_logprobs(
                            types.ModelInput.from_ints(
                                d.model_input.to_ints()
                                + [d.loss_fn_inputs["target_tokens"].to_torch()[-1].item()]
                            )
                        ).result()[1:]
                    )
                    for d in data
                ]
                diff = max(
                    diff, max(float((a - b).abs().max()) for a, b in zip(own, refs, strict=True))
                )
            batch = [
                types.Datum(d.model_input, {**d.loss_fn_inputs, "ref_logprobs": r})
                for d, r in zip(data, refs, strict=True)
            ]
            ref_times.append(time.perf_counter() - t)
        trainer.forward_backward(batch, "ppo", config).result()
        trainer.optim_step(types.AdamParams(learning_rate=1e-4)).result()
        step_times.append(time.perf_counter() - t)
    median = lambda xs: sorted(xs[1:])[len(xs[1:]) // 2]  # noqa: E731
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "base_params": base_parameters(models.builtin_path(name)),
        "rss_before_model": before,
        "rss_loaded": loaded,
        "peak": status("VmHWM"),
        "step_s": median(step_times),
        "ref_s": median(ref_times) if ref_times else 0.0,
        "ref_diff": diff,
    }


def _datum(tokens):
    from rlkit.api import types

    n = len(tokens) - 1
    return types.Datum(
        types.ModelInput.from_ints(tokens[:-1]),
        {"target_tokens": tokens[1:], "weights": [1.0] * n},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="medium,large")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.rank, args.steps)))
        return
    gib = 2**30
    print(
        f"rank {args.rank}, float32, PPO on 4 x 64-token sequences, {os.cpu_count()} CPU "
        "threads, memory = peak resident set (after the models load, and overall)\n"
    )
    print(
        "| model | variant | loaded (GiB) | peak (GiB) | peak / none | step (s) | step / none | "
        "reference (s) | max abs diff vs copy |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        build_once(size)
        first = None
        for variant in VARIANTS:
            r = run_child(
                __file__, size, variant, "--rank", str(args.rank), "--steps", str(args.steps)
            )
            first = first or r
            print(
                f"| {size} ({r['base_params'] / 1e6:.0f}M) | {variant} | "
                f"{r['rss_loaded'] / gib:.2f} | {r['peak'] / gib:.2f} | "
                f"{r['peak'] / first['peak']:.2f} | {r['step_s']:.2f} | "
                f"{r['step_s'] / first['step_s']:.2f} | {r['ref_s']:.2f} | "
                f"{r['ref_diff']:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
