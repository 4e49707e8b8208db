"""The reward protocol, and scoring a group of completions with a weighted list of rewards.

A reward is any callable `reward(completions: list[str], problem: Problem) -> list[float]`:
one value per completion of one problem (a GRPO group), so a reward may also compare the
completions with each other. Configure it with a `_target_` (a function, whose extra keyword
arguments come from the config, or a class, instantiated with them) and a `weight`.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from rlkit.api.errors import RlkitError
from rlkit.rl.envs.base import Problem

ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


def parse_answer(completion: str) -> str | None:
    """The text of the first `<answer>...</answer>` tag, or None when there is none."""
    match = ANSWER_RE.search(completion)
    return match.group(1) if match else None


class RewardError(RlkitError):
    """A reward raised, or returned something other than one finite number per completion."""


@dataclass(frozen=True)
class WeightedReward:
    name: str
    weight: float
    fn: Callable[[list[str], Problem], Sequence[float]]


@dataclass
class GroupScores:
    # Weighted sum of every reward, one per completion.
    total: list[float]
    # Each reward's own (unweighted) values, by reward name.
    components: dict[str, list[float]]


def score_group(
    rewards: Sequence[WeightedReward], completions: list[str], problem: Problem
) -> GroupScores:
    components = {}
    for reward in rewards:
        try:
            returned = reward.fn(completions, problem)
        except Exception as exc:
            raise RewardError(f"reward {reward.name!r} raised {type(exc).__name__}: {exc}") from exc
        values = _as_values(reward.name, returned, len(completions))
        components[reward.name] = values
    total = [
        sum(r.weight * components[r.name][i] for r in rewards) for i in range(len(completions))
    ]
    return GroupScores(total=total, components=components)


def _as_values(name: str, returned: object, expected: int) -> list[float]:
    """One finite float per completion, from any sequence of real numbers (python, numpy or
    torch scalars, 0-d arrays); a RewardError saying what came back otherwise."""
    if isinstance(returned, str | bytes) or not isinstance(returned, Iterable):
        raise RewardError(
            f"reward {name!r} returned {type(returned).__name__} {returned!r:.60}; it must "
            f"return a list of {expected} numbers, one per completion"
        )
    items = list(returned)
    values = [_real(v) for v in items]
    if len(values) != expected:
        raise RewardError(
            f"reward {name!r} returned {len(values)} values for {expected} completions"
        )
    bad = [item for item, v in zip(items, values, strict=True) if v is None]
    if bad:
        raise RewardError(f"reward {name!r} returned non-finite or non-numeric {bad[:3]}")
    return values


def _real(value: object) -> float | None:
    if getattr(value, "shape", None) == () and hasattr(value, "item"):  # numpy/torch 0-d
        value = value.item()
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    return None
