"""The reward protocol, and scoring a group of completions with a weighted list of rewards.

A reward is any callable `reward(completions: list[str], problem: Problem) -> list[float]`:
one value per completion of one problem (a GRPO group), so a reward may also compare the
completions with each other. Configure it with a `_target_` (a function, whose extra keyword
arguments come from the config, or a class, instantiated with them) and a `weight`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rlkit.api.errors import RlkitError
from rlkit.rl.envs.base import Problem
from rlkit.rl.graders.base import tagged
from rlkit.rl.limits import TimeLimitExceeded, time_limit


def parse_answer(completion: str) -> str | None:
    """The text of the first `<answer>...</answer>` tag, or None when there is none."""
    return tagged(completion, "answer")


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
    rewards: Sequence[WeightedReward],
    completions: list[str],
    problem: Problem,
    timeout_s: float = 0.0,
) -> GroupScores:
    """Each reward's values for one group, and their weighted sum. A reward that raises, runs
    longer than `timeout_s` (0: no limit) or returns anything but one real number per
    completion is a RewardError naming it."""
    components = {}
    for reward in rewards:
        try:
            with time_limit(timeout_s, f"reward {reward.name!r}"):
                returned = reward.fn(completions, problem)
        except TimeLimitExceeded as exc:
            raise RewardError(f"{exc} (one group of {len(completions)} completions)") from None
        except Exception as exc:
            raise RewardError(f"reward {reward.name!r} raised {type(exc).__name__}: {exc}") from exc
        values = _as_values(reward.name, returned, len(completions))
        components[reward.name] = values
    total = [
        sum(r.weight * components[r.name][i] for r in rewards) for i in range(len(completions))
    ]
    return GroupScores(total=total, components=components)


def _as_values(name: str, returned: object, expected: int) -> list[float]:
    """One finite float per completion, from a sequence of real numbers (a list or tuple of
    python, numpy or torch scalars, bools as 0/1, or a 1-d numpy array / torch tensor); a
    RewardError saying what came back otherwise. A dict, a set or a generator is refused: its
    order (or its keys, iterated) is not one value per completion."""
    shape = getattr(returned, "shape", None)
    is_array = isinstance(shape, tuple | list) or type(shape).__name__ == "Size"
    if is_array and len(shape) != 1:
        raise RewardError(
            f"reward {name!r} returned a {type(returned).__name__} of shape {tuple(shape)}; it "
            f"must return {expected} numbers, one per completion (a list or a 1-d array)"
        )
    if not is_array and (isinstance(returned, str | bytes) or not isinstance(returned, Sequence)):
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
        raise RewardError(
            f"reward {name!r} returned non-finite or non-numeric values {bad[:3]!r:.80} "
            f"({type(bad[0]).__name__}); it must return real numbers"
        )
    return values


def _real(value: object) -> float | None:
    if getattr(value, "shape", None) == () and hasattr(value, "item"):  # numpy/torch 0-d
        value = value.item()
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    return None
