"""A GRPO loop written by hand on the Tinker-style API, and nothing else: no rlkit trainer.

Each step: draw `groups` addition problems; `sample` `group_size` answers to each; reward them
(1 for the right sum, and up to 0.5 for answering in digits at all, so even an untrained model's
answers differ); centre each group's rewards (the advantages); build one datum per answer
(advantages on the answer's tokens, the sampler's logprobs for the importance ratio);
`forward_backward` with `importance_sampling`, `optim_step`, and a new sampler.

The same script scales with no change: under `accelerate launch --multi_gpu --num_processes 2`
(gloo on CPU; one GPU each on a GPU machine) every process runs this loop on the same data, and
the client divides each call's work between them (sampling, forward/backward, and the rewards
through `map_items`) and gives every process the whole result. The last line each process prints
is the work it did itself.

    python -m rlkit.examples.rl_loop [--steps 20] [--base-model rlkit-tiny]
    accelerate launch --multi_gpu --num_processes 2 -m rlkit.examples.rl_loop
"""

from __future__ import annotations

import argparse
import random
import re
import time

import rlkit as tinker
from rlkit import client
from rlkit.api import types


def prompt_tokens(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)


def reward(answer: str, target: int) -> float:
    """1 for the right sum (the first number in the answer), plus up to 0.5 for the share of
    the answer's characters that are digits."""
    found = re.search(r"-?\d+", answer)
    digits = sum(c.isdigit() for c in answer) / max(len(answer), 1)
    return float(found is not None and int(found.group()) == target) + 0.5 * digits


def score_group(tokenizer, target: int, sequences) -> list[float]:
    return [reward(tokenizer.decode(s.tokens, skip_special_tokens=True), target) for s in sequences]


def run(
    base_model: str = "rlkit-tiny",
    steps: int = 20,
    groups: int = 8,
    group_size: int = 8,
    max_tokens: int = 8,
    learning_rate: float = 1e-2,
    rank: int = 16,
    seed: int = 0,
    verbose: bool = True,
) -> list[dict]:
    service = tinker.ServiceClient()
    trainer = service.create_lora_training_client(base_model=base_model, rank=rank, seed=seed)
    tokenizer = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client()
    rng = random.Random(seed)
    history = []
    for step in range(steps):
        t0 = time.perf_counter()
        problems = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(groups)]
        prompts = [prompt_tokens(tokenizer, f"{a}+{b}=") for a, b in problems]
        params = types.SamplingParams(
            max_tokens=max_tokens, temperature=1.0, seed=seed * 10_000 + step
        )
        # Every request is submitted before any result is read: they run as one batch.
        futures = [
            sampler.sample(types.ModelInput.from_ints(p), group_size, params) for p in prompts
        ]
        results = [f.result().sequences for f in futures]

        # Rewards are the user's code: map_items scores each group once, wherever it runs.
        sums = [a + b for a, b in problems]
        rewards_PG = client.map_items(
            lambda item: score_group(tokenizer, *item), list(zip(sums, results, strict=True))
        )
        datums_D = []
        for prompt, sequences, rewards_G in zip(prompts, results, rewards_PG, strict=True):
            mean = sum(rewards_G) / len(rewards_G)
            if all(r == rewards_G[0] for r in rewards_G):
                continue  # no signal in this group
            for seq, r in zip(sequences, rewards_G, strict=True):
                tokens = prompt + seq.tokens
                n = len(prompt) - 1
                datums_D.append(
                    types.Datum(
                        model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={
                            "target_tokens": tokens[1:],
                            "logprobs": [0.0] * n + seq.logprobs,
                            "advantages": [0.0] * n + [r - mean] * len(seq.tokens),
                        },
                    )
                )
        loss = None
        if datums_D:
            fwd_bwd = trainer.forward_backward(datums_D, "importance_sampling")
            trainer.optim_step(types.AdamParams(learning_rate=learning_rate)).result()
            loss = fwd_bwd.result().metrics["loss:sum"]
        sampler = trainer.save_weights_and_get_sampling_client()
        row = {
            "step": step,
            "reward": sum(map(sum, rewards_PG)) / (groups * group_size),
            "loss": loss,
            "datums": len(datums_D),
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        if verbose:
            shown = "-" if loss is None else f"{loss:.6f}"
            print(
                f"step {step:3d}  reward {row['reward']:.4f}  loss {shown}  datums {len(datums_D)}"
                f"  {row['seconds']:.2f} s",
                flush=True,
            )
    if verbose:
        work = trainer.work_counts()
        print(
            f"work done in this process: {work['forward_tokens']} tokens forward, "
            f"{work['sampled_tokens']} tokens sampled",
            flush=True,
        )
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="rlkit-tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    history = run(args.base_model, args.steps, args.groups, args.group_size, seed=args.seed)
    first, last = history[0]["reward"], sum(h["reward"] for h in history[-3:]) / 3
    print(f"mean reward {first:.4f} (step 0) -> {last:.4f} (last 3 steps)", flush=True)


if __name__ == "__main__":
    main()
