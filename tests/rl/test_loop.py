"""The RL loop's own arithmetic (rlkit.rl.loop): the learning-rate schedule. Whole runs of the
loop are tested end to end in tests/e2e/."""

from omegaconf import OmegaConf

from rlkit.rl.loop import learning_rate


def test_linear_schedule_decays_to_zero_after_the_last_step():
    cfg = OmegaConf.create({"steps": 4, "optim": {"lr": 1.0, "schedule": "linear"}})
    assert [learning_rate(cfg, s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    cfg.optim.schedule = "constant"
    assert {learning_rate(cfg, s) for s in range(4)} == {1.0}
