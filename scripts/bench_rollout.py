"""Rollout throughput of engine=hf vs engine=vllm, side by side in one process.

Both engines get the same model (random init, built locally from a Qwen3 config: nothing is
downloaded), the same adapter rank, prompts, group size, max_tokens and seeds. Rounds alternate
between the engines so that a noisy machine slows both alike. Each round is what an RL step does:
an optimizer step changes the adapter, the engine is synced (`time/sync`), then every group is
sampled (all requests queued, then collected).

    python scripts/bench_rollout.py                          # CPU: sizes small, medium
    python scripts/bench_rollout.py --sizes small,medium,qwen3-0.6b --groups 64   # a GPU

Prints one markdown row per model size: tokens/s of each engine, their ratio, sync time per
step, and engine start time. Random-init models rarely emit end-of-turn, so nearly every
completion runs to max_tokens; tokens/s counts the tokens actually generated.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import rlkit
from rlkit.api import types
from rlkit.backend import models

SIZES = {
    # rlkit-small's shape: 1.8M parameters.
    "small": models.BuiltinSpec(192, 576, 4, 6, 2, 32),
    # ~19M parameters.
    "medium": models.BuiltinSpec(512, 1536, 6, 8, 4, 64),
    # Qwen3-0.6B's layer shapes (28 layers, 1024 wide, head_dim 128) with rlkit's byte vocabulary.
    "qwen3-0.6b": models.BuiltinSpec(1024, 3072, 28, 16, 8, 128, max_position_embeddings=4096),
}


def build(size: str, root: Path) -> str:
    """A model directory for `size` (weights + tokenizer), built once under `root`."""
    target = root / size
    if not (target / "config.json").exists():
        tokenizer = models.build_tokenizer()
        model = models.build_model(SIZES[size], len(tokenizer), tokenizer)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    return str(target)


class Contender:
    """One engine's training client on the model, with its timings."""

    def __init__(self, engine: str, model_dir: str, args) -> None:
        self.engine = engine
        service = rlkit.ServiceClient(engine=engine, engine_options=engine_options(engine, args))
        self.trainer = service.create_lora_training_client(model_dir, rank=args.rank, seed=0)
        tok = self.trainer.get_tokenizer()
        self.prompts = [
            types.ModelInput.from_ints(tok.encode(f"Add adjacent pairs, multiply: {i} {i + 3}"))
            for i in range(args.groups)
        ]
        text = tok.encode("The answer is <answer>42</answer>")
        self.datum = types.Datum(
            model_input=types.ModelInput.from_ints(text[:-1]),
            loss_fn_inputs={"target_tokens": text[1:], "weights": [1.0] * (len(text) - 1)},
        )
        self.args = args
        t = time.perf_counter()
        self.sampler = self.trainer.save_weights_and_get_sampling_client()
        self.start_s = time.perf_counter() - t
        self.sync_s: list[float] = []
        self.sample_s: list[float] = []
        self.tokens: list[int] = []

    def round(self, index: int, timed: bool) -> None:
        self.trainer.forward_backward([self.datum], "cross_entropy")
        self.trainer.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        t = time.perf_counter()
        self.sampler = self.trainer.save_weights_and_get_sampling_client()
        sync = time.perf_counter() - t
        t = time.perf_counter()
        futures = [
            self.sampler.sample(
                prompt,
                self.args.group_size,
                types.SamplingParams(max_tokens=self.args.max_tokens, seed=1000 * index + i),
            )
            for i, prompt in enumerate(self.prompts)
        ]
        tokens = sum(len(s.tokens) for f in futures for s in f.result().sequences)
        if timed:
            self.sample_s.append(time.perf_counter() - t)
            self.sync_s.append(sync)
            self.tokens.append(tokens)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / sum(self.sample_s)


def engine_options(engine: str, args) -> dict:
    if engine != "vllm":
        return {}
    return {"kv_cache_gib": args.kv_cache_gib, "enforce_eager": not args.compile}


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} GPU)"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="small,medium", help=f"from {', '.join(SIZES)}")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--groups", type=int, default=16, help="prompts per round")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after 1 warm-up)")
    parser.add_argument("--kv-cache-gib", type=float, default=None)
    parser.add_argument("--compile", action="store_true", help="vLLM without enforce_eager")
    parser.add_argument("--model-dir", default=None, help="where built models go (default: temp)")
    args = parser.parse_args()

    root = Path(args.model_dir or tempfile.mkdtemp(prefix="rlkit-bench-"))
    engines = args.engines.split(",")
    print(f"# {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"# {args.groups} prompts x {args.group_size} samples x {args.max_tokens} tokens, "
        f"LoRA rank {args.rank}, {args.rounds} timed rounds\n"
    )
    header = ["model", "params"]
    for e in engines:
        header += [f"{e} tok/s", f"{e} sync s/step", f"{e} start s"]
    if len(engines) == 2:
        header.append(f"{engines[1]}/{engines[0]}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for size in args.sizes.split(","):
        model_dir = build(size, root)
        contenders = [Contender(e, model_dir, args) for e in engines]
        for index in range(args.rounds + 1):  # round 0 warms up
            for c in contenders:
                c.round(index, timed=index > 0)
        model = contenders[0].trainer._learner.model
        params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        row = [size, f"{params / 1e6:.1f}M"]
        for c in contenders:
            row += [
                f"{c.tokens_per_s:,.0f}",
                f"{statistics.median(c.sync_s):.3f}",
                f"{c.start_s:.1f}",
            ]
        if len(contenders) == 2:
            row.append(f"{contenders[1].tokens_per_s / contenders[0].tokens_per_s:.2f}x")
        print("| " + " | ".join(row) + " |", flush=True)
        del contenders
        if "vllm" in engines:  # free its memory and worker processes before the next size
            from rlkit.backend.engines import vllm

            vllm.shutdown()


if __name__ == "__main__":
    main()
