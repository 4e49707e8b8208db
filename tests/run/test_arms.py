"""A sweep's arms trained together (rlkit.run.arms): how many at a time, and which arms can
share a base model. The sweeps themselves run in tests/e2e/test_sweeps.py."""

import pytest
from omegaconf import OmegaConf

from rlkit.run.arms import SweepError, check_arms, check_shared
from rlkit.run.config import compose


def test_check_arms_and_check_shared():
    assert check_arms(3) == 3
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(SweepError, match="hydra.launcher.arms"):
            check_arms(bad)
    a = compose(["recipe=pair_sum", "seed=0", "optim.lr=1e-3", "adapter.rank=8"])
    b = compose(["recipe=pair_sum", "seed=1", "optim.lr=1e-4", "adapter.rank=4", "steps=3"])
    check_shared([a, b], ["a", "b"])  # what an adapter can differ in
    c = OmegaConf.merge(b, {"determinism": {"num_threads": 1}})
    with pytest.raises(SweepError, match=r"differ in determinism.num_threads \(0 vs 1\)"):
        check_shared([a, b, c], ["a", "b", "c"])
    d = OmegaConf.merge(b, {"max_steps_off_policy": 2})
    with pytest.raises(SweepError, match="arm 'd' has max_steps_off_policy=2"):
        check_shared([a, d], ["a", "d"])
