"""Write rlkit's built-in data set of arithmetic word problems (`env.path=builtin:...`).

    python scripts/make_word_problems.py            # rewrites rlkit/data/word_problems/

Each line of train.jsonl / test.jsonl is {"question", "answer", "solution", "kind"}: a short story
with two numbers and one operation (add, subtract, multiply), the answer, a worked solution in
the format the graders read (`3+4=7 <answer>7</answer>`), and the kind (eval accuracy is split by
it). The output is a function of the seed alone: the test suite checks that the shipped files are
what this script writes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "rlkit" / "data" / "word_problems"
NAMES = ["Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Ivy", "Jo", "Kai", "Lu", "Max"]
THINGS = ["apples", "pens", "coins", "books", "shells", "cards", "eggs", "stamps", "beads"]
# (kind, story, operator): the story's {a} and {b} are the operands.
STORIES = [
    ("add", "{n} has {a} {t} and gets {b} more. How many {t} does {n} have?", "+"),
    ("add", "{n} found {a} {t}, then {b} {t}. How many {t} in all?", "+"),
    ("sub", "{n} has {a} {t} and gives away {b}. How many {t} are left?", "-"),
    ("sub", "{n} had {a} {t} and lost {b}. How many {t} remain?", "-"),
    ("mul", "{n} has {a} bags with {b} {t} each. How many {t} in all?", "*"),
    ("mul", "{n} buys {a} boxes of {b} {t}. How many {t} is that?", "*"),
]


def problem(rng: random.Random) -> dict:
    kind, story, op = rng.choice(STORIES)
    # One-digit numbers: a 2M-parameter model learns to read them off the story, as in pair_sum.
    if op == "*":
        a, b = rng.randint(2, 5), rng.randint(2, 5)
    elif op == "+":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
    else:
        a = rng.randint(2, 9)
        b = rng.randint(1, a - 1)
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    question = story.format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b)
    solution = f"{a}{op}{b}={answer} <answer>{answer}</answer>"
    return {"question": question, "answer": str(answer), "solution": solution, "kind": kind}


def generate(seed: int, n_train: int, n_test: int) -> dict[str, list[dict]]:
    """Train and test sets with no question in both."""
    rng, seen, problems = random.Random(seed), set(), []
    while len(problems) < n_train + n_test:
        p = problem(rng)
        if p["question"] not in seen:
            seen.add(p["question"])
            problems.append(p)
    return {"train": problems[:n_train], "test": problems[n_train:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=200)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in generate(args.seed, args.train, args.test).items():
        path = args.out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} problems to {path}")


if __name__ == "__main__":
    main()
