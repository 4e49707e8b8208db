"""The first tutorial exercise: teach a model to answer every question with `foo`.

Supervised fine-tuning through the Tinker-style API: build datums whose `weights` are 0 on the
prompt and 1 on the completion, then alternate `forward_backward` and `optim_step`. Runs on CPU
in seconds with the built-in `rlkit-tiny` model; pass `--base-model` for any other.

    python -m rlkit.examples.first_sft [--base-model rlkit-tiny] [--steps 48]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import rlkit as tinker
from rlkit.api import types
from rlkit.rl import sft

TRAIN_QUESTIONS = [
    "What is the capital of France?",
    "How do I bake bread?",
    "Why is the sky blue?",
    "Tell me a joke.",
    "What is 2+2?",
    "Who wrote Hamlet?",
    "Can you help me with my homework?",
    "What time is it?",
    "Translate 'hello' to Spanish.",
    "How far away is the moon?",
    "What's your name?",
    "Recommend a good book.",
    "How do magnets work?",
    "Is coffee healthy?",
    "What is recursion?",
    "Write a haiku about rain.",
    "How many legs does a spider have?",
    "What does DNA stand for?",
    "Where do penguins live?",
    "Explain gravity simply.",
]
UNSEEN_QUESTIONS = ["What is the tallest mountain?", "How do birds fly?", "Give me a soup recipe."]
ANSWER = "foo"


def prompt_tokens(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)


def make_datum(tokenizer, question: str, answer: str) -> types.Datum:
    """Prompt + answer shifted by one; weights are 0 on the prompt, 1 on the answer and its
    end-of-turn token (see `rlkit.rl.sft.completion_datum`)."""
    return sft.completion_datum(tokenizer, prompt_tokens(tokenizer, question), answer)


@dataclass
class Result:
    losses: list[float]
    # Decoded completions for each unseen question.
    samples: dict[str, list[str]]
    # One logprob per sampled token, in every sample.
    logprobs_match_tokens: bool


def run(
    base_model: str = "rlkit-tiny",
    steps: int = 48,
    learning_rate: float = 5e-3,
    rank: int = 32,
    num_samples: int = 8,
    seed: int = 0,
    verbose: bool = True,
) -> Result:
    service = tinker.ServiceClient()
    trainer = service.create_lora_training_client(base_model=base_model, rank=rank, seed=seed)
    tokenizer = trainer.get_tokenizer()
    data = [make_datum(tokenizer, q, ANSWER) for q in TRAIN_QUESTIONS]

    losses = []
    for step in range(steps):
        # Both calls are queued at once; the step is applied after the gradients it needs.
        fwd_bwd = trainer.forward_backward(data, loss_fn="cross_entropy")
        optim = trainer.optim_step(types.AdamParams(learning_rate=learning_rate))
        losses.append(fwd_bwd.result().metrics["loss:sum"])
        optim.result()
        if verbose and (step % 8 == 0 or step == steps - 1):
            print(
                f"step {step:3d}  loss {losses[-1]:9.4f}  ({losses[-1] / losses[0]:.1%} of start)"
            )

    sampler = trainer.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=16, temperature=1.0, seed=seed)
    samples, aligned = {}, True
    for question in UNSEEN_QUESTIONS:
        prompt = types.ModelInput.from_ints(prompt_tokens(tokenizer, question))
        response = sampler.sample(prompt, num_samples=num_samples, sampling_params=params).result()
        samples[question] = [tokenizer.decode(s.tokens) for s in response.sequences]
        aligned &= all(len(s.logprobs) == len(s.tokens) for s in response.sequences)
        if verbose:
            print(f"{question!r} -> {samples[question]}")
    return Result(losses=losses, samples=samples, logprobs_match_tokens=aligned)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="rlkit-tiny")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    result = run(args.base_model, args.steps, args.learning_rate, args.rank)
    expected = ANSWER + "<|im_end|>"
    hits = sum(s == expected for outs in result.samples.values() for s in outs)
    total = sum(len(outs) for outs in result.samples.values())
    print(
        f"final loss {result.losses[-1]:.4f} = {result.losses[-1] / result.losses[0]:.2%} of start; "
        f"{hits}/{total} samples on unseen questions are exactly {expected!r}"
    )


if __name__ == "__main__":
    main()
