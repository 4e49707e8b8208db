"""Asynchronous RL with bounded staleness (`max_steps_off_policy`), end to end on CPU: the
schedule is a function of the step, so runs are bitwise identical however sampling and training
interleave, staleness is exactly K once K steps are done, and a SIGKILLed run resumes bitwise
(the checkpoint holds the older policies its next steps are sampled by)."""

import json
import os
import signal

import pytest

from rlkit.rl.loop import train
from rlkit.run.config import compose
from rlkit.run.outputs import read_jsonl
from rlkit.run.validate import validate
from tests.e2e import warm
from tests.e2e.runs import TINY, assert_same_as

pytestmark = pytest.mark.slow  # end-to-end runs

STEPS = 6
ASYNC = [
    *TINY,
    f"steps={STEPS}",
    "eval_every=3",
    "max_steps_off_policy=2",
    "loss.config.tis_cap=2.0",
    "+loss.config.seq_mask_cap=3.0",
    "+loss.config.token_mask_low=0.5",
    "+loss.config.token_mask_high=2.0",
]


def run_inprocess(run_dir, *extra):
    cfg = compose([*ASYNC, *extra])
    validate(cfg)
    return train(cfg, run_dir)


def metrics(run_dir) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("async") / "run"
    run_inprocess(run_dir)
    return run_dir


@pytest.mark.parametrize("phase", ["sampling", "training"])
def test_timing_does_not_change_the_bits(reference, tmp_path, monkeypatch, phase):
    """A slower sampling (or training) changes when the background sampling finishes, never
    which policy sampled which step: the same metrics, samples and adapter."""
    monkeypatch.setenv("RLKIT_SLOW", f"{phase}:0.2")
    run_inprocess(tmp_path / "run")
    assert_same_as(reference, tmp_path / "run")


def test_staleness_is_k_and_the_corrections_report(reference):
    rows = [r for r in metrics(reference) if 0 <= r["step"] < STEPS]
    assert [r["train/staleness_max"] for r in rows] == [0, 1, 2, 2, 2, 2]
    assert all(r["train/staleness_mean"] == r["train/staleness_max"] for r in rows)
    timings = [json.loads(line) for line in (reference / "timings.jsonl").read_text().splitlines()]
    assert all(t["time/overlap"] >= 0 for t in timings if "time/overlap" in t)
    trained = [r for r in rows if r["train/loss"] is not None]
    assert trained, rows
    for r in trained:
        assert 0 <= r["train/seq_masked_frac"] <= 1 and 0 <= r["train/token_masked_frac"] <= 1
        assert r["train/is_ratio_min"] <= 1 <= r["train/is_ratio_max"] or r["step"] == 0
    # Off-policy steps move the ratio away from 1; the first step is on-policy (ratio 1).
    assert rows[0]["train/is_ratio_std"] < 1e-5 or rows[0]["train/loss"] is None
    assert any(r["train/is_ratio_std"] > 1e-4 for r in trained if r["step"] >= 2)


def test_sigkill_then_resume_is_bitwise(reference, tmp_path, capsys):
    """Killed before RL step 5 (its checkpoint at step 4 done, steps 4 and 5 being sampled by
    policies 2 and 3 in the background): resume=auto samples them again from the checkpoint's
    policies, with the same seeds, and ends bitwise equal to the uninterrupted run."""
    run_dir = tmp_path / "run"
    done = warm.run(
        "rlkit",
        [*ASYNC, f"hydra.run.dir={run_dir}"],
        tmp_path,
        {**os.environ, "RLKIT_FAULT": "kill-rank:0:step:5"},
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    saved = run_dir / "checkpoints" / "step_000004" / "policies"
    assert sorted(p.name for p in saved.iterdir()) == ["000002", "000003"]
    run_inprocess(run_dir, "resume=auto")
    assert "resuming from" in capsys.readouterr().err
    assert_same_as(reference, run_dir)


def test_resuming_with_a_larger_k_names_the_missing_policy(reference, tmp_path):
    """The checkpoint holds the policies its own K needs; a larger K on resume needs an older
    one it does not have: one error naming it, before any step runs."""
    import shutil

    from rlkit.api.errors import RlkitError

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    with pytest.raises(RlkitError, match="policy 3, which samples a step still to run, is missing"):
        run_inprocess(run_dir, "resume=auto", "max_steps_off_policy=3")
