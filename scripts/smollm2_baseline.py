"""How good is the base model before RL, given every benefit of the doubt?

recipe=smollm2 grades the last number a completion writes, within its max_tokens and up to its
stop (the first blank line). Part of what RL then gains is format: answering briefly. This
script measures the untrained base model on the recipe's held-out problems (greedy, in its chat
template) with a generous budget and generous readings, so that the recipe's gain can be stated
beyond format:

- the recipe's own budget (its max_tokens and stop: what its step-0 eval sees), and 128 tokens
  with no stop;
- three readings of each completion: the recipe's grader (the last number), the first number
  after an "=" (how the model writes "47 + 38 = 85"), and "the answer is among the numbers it
  wrote" (an upper bound: any reading at all would be at most this).

    python scripts/smollm2_baseline.py            # the base model
    python scripts/smollm2_baseline.py RUN_DIR    # a run's final adapter, for comparison

It prints one row per budget and the accuracy by operation.
"""

from __future__ import annotations

import sys

from rlkit import ServiceClient, types
from rlkit.rl.graders.base import parse_number
from rlkit.rl.graders.numeric import numbers_in
from rlkit.rl.sft import prompt_tokens
from rlkit.run.build import as_callable
from rlkit.run.config import compose

READINGS = ("the recipe's grader", 'first after "="', "among its numbers")


def readings(env, problem, text: str) -> dict[str, bool]:
    """Whether each reading of `text` finds the problem's answer."""
    answer = parse_number(problem.answer)
    found = [parse_number(n) for n in numbers_in(text)]
    after = [parse_number(n) for n in numbers_in(text.split("=", 1)[1])] if "=" in text else []
    return {
        READINGS[0]: env.grade(problem, text).correct,
        READINGS[1]: (after or found or [None])[0] == answer,
        READINGS[2]: answer in found,
    }


def main() -> None:
    cfg = compose(["recipe=smollm2"])
    env = as_callable(cfg.env, "env")
    problems = env.eval_problems()
    service = ServiceClient(device="cpu", dtype="float32")
    trainer = service.create_lora_training_client(cfg.model.base_model, rank=cfg.adapter.rank)
    if len(sys.argv) > 1:  # a run's final adapter
        trainer.load_state(f"{sys.argv[1]}/adapter", with_optimizer=False).result()
    sampler = trainer.save_weights_and_get_sampling_client()
    tokenizer = trainer.get_tokenizer()
    prompts = [types.ModelInput.from_ints(prompt_tokens(tokenizer, p.messages)) for p in problems]
    print(f"{len(problems)} held-out problems of recipe=smollm2, greedy\n")
    print(f"| budget | {' | '.join(READINGS)} | by op (the recipe's grader) |")
    print("|---|---|---|---|---|")
    budgets = {
        f"{cfg.max_tokens} tokens, stop {list(cfg.stop)} (the recipe's)": (
            cfg.max_tokens,
            cfg.stop,
        ),
        "128 tokens, no stop": (128, None),
    }
    for label, (max_tokens, stop) in budgets.items():
        params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)
        futures = [sampler.sample(prompt, 1, params) for prompt in prompts]
        right = dict.fromkeys(READINGS, 0)
        by_op: dict[str, list[bool]] = {}
        for problem, future in zip(problems, futures, strict=True):
            text = tokenizer.decode(future.result().sequences[0].tokens, skip_special_tokens=True)
            read = readings(env, problem, text)
            for name, ok in read.items():
                right[name] += ok
            by_op.setdefault(problem.info["tag"], []).append(read[READINGS[0]])
        cells = " | ".join(f"{100 * right[k] / len(problems):.1f}%" for k in READINGS)
        ops = ", ".join(f"{tag} {100 * sum(v) / len(v):.1f}%" for tag, v in sorted(by_op.items()))
        print(f"| {label} | {cells} | {ops} |", flush=True)


if __name__ == "__main__":
    main()
