"""dataset: problems from a data set of questions and answers (a local JSONL / JSON / CSV /
Parquet file, or a `datasets` hub id), graded by the run's grader.

Order: RL step `s` takes problems `s * n ... (s + 1) * n - 1` of an endless sequence of epochs, each
epoch a permutation of the training problems drawn from (`seed`, epoch). The position is a
function of the step, so a resumed run continues exactly where it stopped. The held-out set is
`eval_path` (or `eval_split` of a hub id), else an `eval_fraction` of the data set split off by
`eval_seed` (the same for every run seed, so runs share it).
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

from rlkit.rl.envs.base import Env, Grade, Problem
from rlkit.rl.envs.records import DataError, Record, field, load_records
from rlkit.rl.graders.base import Grader, GraderError
from rlkit.rl.graders.exact_match import ExactMatch

# `builtin:NAME` paths are data sets shipped inside rlkit (rlkit/data/), made by scripts/.
BUILTIN = "builtin:"
DATA_DIR = Path(__file__).resolve().parents[2] / "data"


class DatasetEnv(Env):
    def __init__(
        self,
        path: str,
        prompt_field: str = "question",
        answer_field: str = "answer",
        split: str = "train",
        subset: str | None = None,
        prompt_template: str = "{prompt}",
        system_prompt: str | None = None,
        answer_pattern: str | None = None,
        solution_field: str | None = None,
        tag_field: str | None = None,
        eval_path: str | None = None,
        eval_split: str | None = None,
        eval_fraction: float = 0.1,
        eval_size: int = 200,
        eval_seed: int = 1234,
        seed: int = 0,
        grader: Grader | None = None,
    ) -> None:
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"env.eval_fraction must be in [0, 1), got {eval_fraction}")
        if eval_size < 1:
            raise ValueError(f"env.eval_size must be >= 1, got {eval_size}")
        self.fields = {"prompt": prompt_field, "answer": answer_field}
        self.prompt_template, self.system_prompt = prompt_template, system_prompt
        self.answer_re = _compile(answer_pattern)
        self.solution_field, self.tag_field = solution_field, tag_field
        self.grader, self.seed = grader or ExactMatch(), seed
        records = load_records(_resolve(path), split, "env.path", subset)
        if eval_path or eval_split:
            where = ("env.eval_path", eval_path) if eval_path else ("env.eval_split", path)
            held_out = load_records(_resolve(where[1]), eval_split or split, where[0], subset)
            train = records
        else:
            shuffled = records[:]
            random.Random(eval_seed).shuffle(shuffled)
            n_eval = round(eval_fraction * len(records))
            held_out, train = shuffled[:n_eval], shuffled[n_eval:]
        if not train:
            raise DataError(f"env.path={path}: no training problems left after the eval split")
        self.train = [self.make(r) for r in train]
        self._eval = [self.make(r) for r in held_out[:eval_size]]
        self._no_eval = (
            f"env.eval_fraction={eval_fraction} holds out no problems of env.path={path} "
            f"({len(records)} records): set env.eval_fraction > 0 or env.eval_path"
        )
        _warn_overlap(self.train, self._eval)
        for problem in (*self.train, *self._eval):  # a reference the grader cannot read
            try:
                self.grader("", problem.answer)
            except GraderError as exc:
                raise DataError(f"{problem.info['where']}: {exc}") from None

    def make(self, record: Record) -> Problem:
        prompt = field(record, self.fields["prompt"], "env.prompt_field")
        answer = field(record, self.fields["answer"], "env.answer_field")
        if self.answer_re:
            match = self.answer_re.search(answer)
            if not match:
                raise DataError(
                    f"{record.where}: env.answer_pattern {self.answer_re.pattern!r} does not "
                    f"match the answer field {answer!r:.80}"
                )
            answer = match.group(1).strip()
        try:
            text = self.prompt_template.format_map({**record.fields, "prompt": prompt})
        except (KeyError, IndexError, ValueError) as exc:
            raise DataError(
                f"{record.where}: env.prompt_template {self.prompt_template!r} cannot be filled "
                f"({type(exc).__name__}: {exc}); fields: {', '.join(record.fields)}"
            ) from None
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        info = {"where": record.where}
        if self.solution_field:
            info["solution"] = field(record, self.solution_field, "env.solution_field")
        if self.tag_field:
            info["tag"] = field(record, self.tag_field, "env.tag_field")
        return Problem((*system, {"role": "user", "content": text}), answer, info)

    def sample(self, rng: random.Random, n: int, step: int) -> list[Problem]:
        size = len(self.train)
        positions = range(step * n, (step + 1) * n)
        return [self.train[self._order(pos // size)[pos % size]] for pos in positions]

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.train)))
        random.Random(f"{self.seed}/data/{epoch}").shuffle(order)
        return order

    def eval_problems(self) -> list[Problem]:
        if not self._eval:  # the trainer evaluates before its first step
            raise DataError(self._no_eval)
        return list(self._eval)

    def solution(self, problem: Problem) -> str:
        if "solution" not in problem.info:
            raise DataError(
                "warmup.steps > 0 needs worked solutions: set env.solution_field to the field "
                "that holds them"
            )
        return problem.info["solution"]

    def grade(self, problem: Problem, completion: str) -> Grade:
        return self.grader(completion, problem.answer)


def _warn_overlap(train: list[Problem], held_out: list[Problem]) -> None:
    """A warning when held-out prompts are also training prompts (e.g. env.eval_path names the
    training file): eval accuracy would then measure memory, not generalisation."""
    seen = {_key(p) for p in train}
    shared = [p for p in held_out if _key(p) in seen]
    if shared:
        print(
            f"warning: {len(shared)} of the {len(held_out)} eval problems are also training "
            f"problems (first: {shared[0].info['where']}): held-out accuracy will overstate "
            "generalisation; check env.eval_path / env.eval_split against env.path",
            file=sys.stderr,
        )


def _key(problem: Problem) -> tuple:
    return tuple((m["role"], m["content"]) for m in problem.messages)


def _resolve(path: str) -> str:
    if not path.startswith(BUILTIN):
        return path
    name = path.removeprefix(BUILTIN)
    file = DATA_DIR / name
    if not file.is_file():
        shipped = sorted(p.relative_to(DATA_DIR).as_posix() for p in DATA_DIR.rglob("*.jsonl"))
        raise DataError(f"{path}: no such built-in data set; built-in: {', '.join(shipped)}")
    return str(file)


def _compile(pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise ValueError(f"env.answer_pattern {pattern!r} does not compile: {exc}") from None
    if compiled.groups < 1:
        raise ValueError(f"env.answer_pattern {pattern!r} needs a group: (...) around the answer")
    return compiled
