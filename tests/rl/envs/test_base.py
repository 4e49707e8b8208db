"""The environment protocol (rlkit.rl.envs.base): what an env samples, and its number of
turns, are checked and named."""

import random

import pytest

from rlkit.rl.envs.base import EnvError
from tests.helpers import Echo


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda ps: ps[:1], r"Short.sample\(rng, 2, step=0\) returned 1 problems for the 2 asked"),
        (lambda ps: [], "returned no problems"),
        (lambda ps: None, "returned NoneType, not a list"),
        (
            lambda ps: ["2+2", *ps[1:]],
            "returned a str '2\\+2' among its problems; each must be a Problem",
        ),
    ],
)
def test_what_an_env_samples_is_checked(returned, message):
    from rlkit.rl.envs.base import draw

    class Short(Echo):
        def sample(self, rng, n, step=0):
            return returned(super().sample(rng, n, step))

    with pytest.raises(EnvError, match=message):
        draw(Short(), random.Random(0), 2, 0)


@pytest.mark.parametrize("turns", [0, -5, 1.5, True])
def test_an_env_with_no_turns_is_refused(turns):
    from rlkit.rl.envs.base import check_env

    class NoTurns(Echo):
        max_turns = turns

    with pytest.raises(EnvError, match=rf"env NoTurns: max_turns must be an int >= 1, got {turns}"):
        check_env(NoTurns())
