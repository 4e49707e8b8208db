"""How good is the base model before RL, given every benefit of the doubt?

recipe=smollm2 grades the last number a completion writes within 16 tokens. Part of what RL then
gains is format: answering briefly. This script measures the untrained base model on the recipe's
held-out problems (greedy, in its chat template) with a generous budget and generous readings, so
that the recipe's gain can be stated beyond format:

- budgets of 16 (the recipe's) and 128 tokens;
- three readings of each completion: the last number (the recipe's grader), the first number
  after an "=" (how the model writes "47 + 38 = 85"), and "the answer is among the numbers it
  wrote" (an upper bound: any reading at all would be at most this).

    python scripts/smollm2_baseline.py            # the base model
    python scripts/smollm2_baseline.py RUN_DIR    # a run's final adapter, for comparison

It prints one row per budget and the accuracy by operation.
"""

from __future__ import annotations

import re
import sys

from rlkit import ServiceClient, types
from rlkit.run.config import as_callable, compose

NUMBER = re.compile(r"-?\d[\d,]*")


def numbers(text: str) -> list[int]:
    return [int(n.replace(",", "")) for n in NUMBER.findall(text) if n.strip(",-")]


def readings(text: str) -> dict[str, int | None]:
    found = numbers(text)
    after = numbers(text.split("=", 1)[1]) if "=" in text else []
    return {
        "last number": found[-1] if found else None,
        'first after "="': after[0] if after else (found[0] if found else None),
        "among its numbers": found,
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
    print(f"{len(problems)} held-out problems of recipe=smollm2, greedy\n")
    print(
        '| max_tokens | last number | first after "=" | among its numbers | by op (last number) |'
    )
    print("|---|---|---|---|---|")
    for budget in (16, 128):
        params = types.SamplingParams(max_tokens=budget, temperature=0.0)
        futures = [
            sampler.sample(
                types.ModelInput.from_ints(
                    tokenizer.apply_chat_template(
                        list(p.messages), add_generation_prompt=True, return_dict=False
                    )
                ),
                1,
                params,
            )
            for p in problems
        ]
        right = {"last number": 0, 'first after "="': 0, "among its numbers": 0}
        by_op: dict[str, list[int]] = {}
        for problem, future in zip(problems, futures, strict=True):
            text = tokenizer.decode(future.result().sequences[0].tokens, skip_special_tokens=True)
            answer = int(problem.answer)
            for name, value in readings(text).items():
                right[name] += answer in value if isinstance(value, list) else value == answer
            last = readings(text)["last number"] == answer
            by_op.setdefault(problem.info["tag"], []).append(last)
        cells = " | ".join(f"{100 * right[k] / len(problems):.1f}%" for k in right)
        ops = ", ".join(f"{tag} {100 * sum(v) / len(v):.1f}%" for tag, v in sorted(by_op.items()))
        print(f"| {budget} | {cells} | {ops} |", flush=True)


if __name__ == "__main__":
    main()
