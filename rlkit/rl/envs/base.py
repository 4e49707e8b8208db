"""The environment protocol: problems with known answers, and episodes of one or more turns.

An environment makes the problems of a step on demand (from an RNG the trainer hands it and the
step's number, so the trainer owns all randomness and a resumed run draws the same), keeps a
fixed held-out set for evaluation, can write a worked solution for the supervised warm start,
and grades a completion: whether it is correct is the task's knowledge, not the loop's (it
decides `train/accuracy` and `eval/accuracy`). How a completion is *rewarded* is the reward
functions' business.

An episode starts from a problem's prompt (the initial observation). The model acts (one turn:
up to `max_tokens` tokens, ending at the end-of-turn token, a stop string of the run or one of
the env's `stop`); the environment answers with `step(problem, transcript)`: text that goes into
the context (a tool's result, the user's next message), or None when the episode is over. At most
`max_turns` model turns. The environment's text stays in the context but out of the loss.
A single-turn task is the one-turn case: the default `step` ends the episode.

Rewards and `grade` see the episode's whole transcript (model turns and observations, as text).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from rlkit.api.errors import RlkitError

# The roles an environment's message may take (see `Env.observation_role`).
ROLES = ("tool", "user")


@dataclass(frozen=True)
class Problem:
    # The chat messages that make up the prompt (system, user, ...).
    messages: tuple[dict[str, str], ...]
    # The reference answer, as text.
    answer: str
    # Anything a reward may want (operands, difficulty, ...). `tag` splits eval metrics by kind.
    info: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Grade:
    """What the environment says of one completion."""

    # The completion's answer is the right one.
    correct: bool
    # The completion states an answer in the expected form (right or wrong).
    formatted: bool


class EnvError(RlkitError):
    """An environment raised while stepping an episode (see `on_env_error`)."""


class Env:
    """Base class of environments; subclasses implement `sample`, `eval_problems` and `grade`
    (and `solution` for a warm start). Multi-turn ones set `max_turns` and implement `step`."""

    # Most model turns in an episode.
    max_turns: int = 1
    # Strings that end a model turn (e.g. a tool call's closing tag), besides the run's `stop`.
    stop: tuple[str, ...] = ()
    # How `step`'s observations enter the context: None, as raw text continuing the model's
    # turn; "tool" or "user", as a message of that role in the tokenizer's chat template (the
    # model's turn ends, the message follows, then a new model turn). `step` may also return
    # {"role": ..., "content": ...} to choose per observation.
    observation_role: str | None = None

    def sample(self, rng: random.Random, n: int, step: int) -> list[Problem]:
        """The `n` problems of step `step`; draw any randomness from `rng`."""
        raise NotImplementedError

    def eval_problems(self) -> list[Problem]:
        raise NotImplementedError

    def solution(self, problem: Problem) -> str | list[str]:
        """A worked solution for the warm start: the completion's text, or for several turns a
        list alternating the model's turns and the environment's observations (those are kept
        out of the supervised loss)."""
        raise NotImplementedError(f"{type(self).__name__} has no worked solutions (warmup.steps)")

    def grade(self, problem: Problem, completion: str) -> Grade:
        raise NotImplementedError

    def step(self, problem: Problem, transcript: str) -> str | dict | None:
        """The environment's answer to the model's latest turn (the end of `transcript`): its
        text (a message of role `observation_role`, or raw text when that is None), a message
        `{"role": "tool" | "user", "content": text}`, or None to end the episode."""
        return None

    def metrics(self, problem: Problem, transcript: str) -> dict[str, float]:
        """Numbers about one finished episode (e.g. tool calls), averaged over a step's
        episodes and logged as `env/NAME` (`eval/NAME` on the held-out set)."""
        return {}


def env_name(env: Env) -> str:
    return type(env).__name__


def check_env(env: Env) -> Env:
    """What the loop relies on in an environment it did not write: at least one turn, stop
    strings, and a held-out set to evaluate on. An EnvError naming the env otherwise."""
    turns = env.max_turns
    if isinstance(turns, bool) or not isinstance(turns, int) or turns < 1:
        raise EnvError(f"env {env_name(env)}: max_turns must be an int >= 1, got {turns!r}")
    if env.observation_role not in (None, *ROLES):
        raise EnvError(
            f"env {env_name(env)}: observation_role must be null, 'tool' or 'user', got "
            f"{env.observation_role!r}"
        )
    stop = env.stop
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise EnvError(
            f"env {env_name(env)}: stop must be a tuple of non-empty strings, got {stop!r:.80}"
        )
    _check_problems(env, env.eval_problems(), None, "eval_problems()")
    return env


def draw(env: Env, rng: random.Random, n: int, step: int) -> list[Problem]:
    """`env.sample(rng, n, step)`, checked: exactly `n` Problems."""
    return _check_problems(env, env.sample(rng, n, step), n, f"sample(rng, {n}, step={step})")


def _check_problems(env: Env, problems: object, n: int | None, call: str) -> list[Problem]:
    name = env_name(env)
    if isinstance(problems, str | bytes | dict) or not hasattr(problems, "__iter__"):
        raise EnvError(f"env {name}.{call} returned {type(problems).__name__}, not a list")
    problems = list(problems)
    if not problems:
        raise EnvError(f"env {name}.{call} returned no problems")
    if n is not None and len(problems) != n:
        raise EnvError(f"env {name}.{call} returned {len(problems)} problems for the {n} asked")
    if bad := next((p for p in problems if not isinstance(p, Problem)), None):
        raise EnvError(
            f"env {name}.{call} returned a {type(bad).__name__} {bad!r:.60} among its problems; "
            "each must be a Problem(messages, answer, info)"
        )
    return problems
