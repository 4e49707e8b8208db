"""vLLM on CPU at a high LoRA rank: serving a step's merged weights instead of its adapter.

vLLM-CPU's LoRA kernels slow down with the rank (0.21x the hf engine at rank 64, see
benchmarks/README.md). `engine=vllm engine.weights=merged` serves a step's policy as plain
weights instead: W + scale B A reloaded into the adapted layers of a LoRA-free vLLM, sampled
with no LoRA kernels. This times three engines on one RL step's sampling (the weight sync, then
16 prompts x 8 completions of 40 tokens), alternating them in one process on the same model,
adapter and requests, after the same training step for each:

- `vllm lora`: engine=vllm (the adapter reloaded in place, sampled with its LoRA kernels);
- `vllm merged`: engine=vllm with engine.weights=merged;
- `hf`: the hf engine (a merged copy, its batched decode loop).

The probe gap is each engine's post-sync probe (mean |logprob difference| to the trainer).

    python scripts/bench_vllm_merged.py --sizes small,25m --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GROUPS, GROUP_SIZE, MAX_TOKENS = 16, 8, 40
ENGINES = {
    "vllm lora": ("vllm", {"weights": "lora"}),
    "vllm merged": ("vllm", {"weights": "merged"}),
    "hf": ("hf", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,25m")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(
        f"{GROUPS} prompts x {GROUP_SIZE} completions x {MAX_TOKENS} tokens, LoRA rank "
        f"{args.rank}, float32, {args.threads} threads, {args.rounds} timed rounds after one "
        "warm-up, each: a training step, then each engine's sync + sampling\n"
    )
    print("| model | way | s/round median (min-max) | sync s | tokens/round | probe gap |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        measure(size, args.rank, args.rounds)


def measure(size: str, rank: int, rounds: int) -> None:
    import torch
    from bench_vs_trl import model_path

    import rlkit
    from rlkit.api import types

    path = model_path(size)
    trainers = {
        way: rlkit.ServiceClient(
            device="cpu", dtype="float32", engine=engine, engine_options=options
        ).create_lora_training_client(path, rank=rank, seed=0)
        for way, (engine, options) in ENGINES.items()
    }
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 259, (72,), generator=g).tolist() for _ in range(GROUPS)]
    data = [
        types.Datum(
            types.ModelInput.from_ints(p[:-1]), {"target_tokens": p[1:], "weights": [1.0] * 71}
        )
        for p in prompts
    ]
    params = [
        types.SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i) for i in range(GROUPS)
    ]
    results: dict[str, dict[str, list[float]]] = {
        way: {"total": [], "sync": [], "tokens": [], "gap": []} for way in ENGINES
    }
    for step in range(rounds + 1):
        for way, trainer in trainers.items():
            trainer.forward_backward(data, "cross_entropy").result()  # the same update for all
            trainer.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            t = time.perf_counter()
            sampler = trainer.save_weights_and_get_sampling_client(f"{size}-{step}")
            synced = time.perf_counter()
            futures = [
                sampler.sample(types.ModelInput.from_ints(p), GROUP_SIZE, sp)
                for p, sp in zip(prompts, params, strict=True)
            ]
            tokens = sum(len(s.tokens) for f in futures for s in f.result().sequences)
            if step == 0:
                continue  # warm-up
            r = results[way]
            r["total"].append(time.perf_counter() - t)
            r["sync"].append(synced - t)
            r["tokens"].append(tokens)
            r["gap"].append(sampler.sync_metrics["sync/probe_mismatch"])
    for way, r in results.items():
        ts = r["total"]
        print(
            f"| {size} | {way} | {statistics.median(ts):.2f} ({min(ts):.2f}-{max(ts):.2f}) "
            f"| {statistics.median(r['sync']):.2f} | {statistics.mean(r['tokens']):.0f} "
            f"| {max(r['gap']):.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
