"""What the HTTP path costs: the pair_sum recipe's calls through `python -m rlkit.service` and the
official `tinker` SDK, against the same calls on rlkit's in-process client, side by side.

One RL step at the recipe's shapes (rlkit-small, LoRA rank 64, 16 prompts x 8 completions of up
to 40 tokens, importance_sampling): save weights for a sampler, sample the 16 prompts, build
the datums, forward_backward, optim_step. Steps alternate between the two clients (each has
its own adapter, same seed); the service runs in its own process on the same cores, idle while
the in-process client works. Prints the median step time of each and the overhead of the HTTP
path as a fraction of the in-process step.

    python scripts/bench_service.py [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(directory: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlkit.service", "--port", str(port), "--dir", directory],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/api/v1/healthz", timeout=1).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the service exited at start") from None
            time.sleep(0.2)
    raise SystemExit("the service did not start")


def step(trainer, tok, prompts, types) -> float:
    """One RL step; its wall time."""
    t = time.perf_counter()
    sampler = trainer.save_weights_and_get_sampling_client()
    sampler = sampler.result() if hasattr(sampler, "result") else sampler
    params = types.SamplingParams(max_tokens=40, temperature=1.0, stop=["</answer>"])
    futures = [sampler.sample(types.ModelInput.from_ints(p), 8, params) for p in prompts]
    datums = []
    for prompt, future in zip(prompts, futures, strict=True):
        sequences = future.result().sequences
        rewards = [float("<answer>" in tok.decode(s.tokens)) for s in sequences]
        mean = sum(rewards) / len(rewards)
        for seq, reward in zip(sequences, rewards, strict=True):
            n = len(prompt) - 1
            tokens = prompt + list(seq.tokens)
            datums.append(
                types.Datum(
                    model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={
                        "target_tokens": tokens[1:],
                        "logprobs": [0.0] * n + list(seq.logprobs),
                        "advantages": [0.0] * n + [reward - mean + 0.01] * len(seq.tokens),
                    },
                )
            )
    trainer.forward_backward(datums, "importance_sampling").result()
    trainer.optim_step(types.AdamParams(learning_rate=3e-4)).result()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    import tinker
    from tinker import types

    import rlkit
    from rlkit.rl.envs.pair_sum import PairSumEnv

    with tempfile.TemporaryDirectory() as directory:
        proc, url = start_service(directory)
        try:
            os.environ.update(TINKER_BASE_URL=url, TINKER_API_KEY="tml-local", TINKER_TELEMETRY="0")
            local = rlkit.ServiceClient(device="cpu", dtype="float32").create_lora_training_client(
                "rlkit-small", rank=64, seed=0
            )
            remote = tinker.ServiceClient().create_lora_training_client(
                base_model="rlkit-small", rank=64, seed=0
            )
            remote = remote.result()
            tok = local.get_tokenizer()
            env = PairSumEnv(n_choices=[2, 4], low=1, high=9)
            import random

            problems = env.sample(random.Random(0), 16, 0)
            prompts = [
                tok.apply_chat_template(
                    list(p.messages), add_generation_prompt=True, return_dict=False
                )
                for p in problems
            ]
            times: dict[str, list[float]] = {"in-process": [], "service": []}
            for i in range(args.steps + 1):
                for name, trainer in (("in-process", local), ("service", remote)):
                    seconds = step(trainer, tok, prompts, types)
                    if i:  # the first step of each warms up (engine build, first compile)
                        times[name].append(seconds)
        finally:
            proc.terminate()
            proc.wait(30)
    a, b = (statistics.median(times[k]) for k in ("in-process", "service"))
    print(f"{args.steps} steps each, pair_sum shapes (rlkit-small, r64, 16 x 8, 40 tokens)")
    print(f"in-process client  median {a:.3f} s/step  {[round(t, 3) for t in times['in-process']]}")
    print(f"through the service median {b:.3f} s/step  {[round(t, 3) for t in times['service']]}")
    print(f"HTTP path overhead: {b - a:+.3f} s/step = {(b - a) / a:+.1%} of the in-process step")


if __name__ == "__main__":
    main()
