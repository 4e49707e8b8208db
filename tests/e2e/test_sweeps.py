"""Sweeps (`python -m rlkit -m ...`), end to end: the summary table and plot; and
`hydra/launcher=adapters`, a sweep's arms trained together as adapters on one base model, each
bitwise what it is under Hydra's basic launcher (batched into one pass: to rounding, and the
same bits in every rerun); refused sweeps; stop and resume."""

import json

import pytest

from rlkit.run import compare
from rlkit.run.outputs import read_jsonl
from tests.e2e.runs import FAST, cli

# Subprocess runs of `python -m rlkit -m`.
pytestmark = pytest.mark.slow


def test_sweep_writes_summary_table_and_plot(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = cli(
        ["-m", *FAST, "optim.lr=1e-4,3e-4", "seed=0,1", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
    )
    table = (sweep_dir / "sweep_summary.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4
    assert all(("optim.lr=" in row and "seed=" in row) for row in rows)
    assert (sweep_dir / "sweep_curves.png").stat().st_size > 1000
    assert "sweep summary" in proc.stderr


# Two arms of a shortened pair_sum run on the tiny model.
ARMS_RUN = [
    "recipe=pair_sum",
    "model=rlkit_tiny",
    "adapter.rank=4",
    "warmup.steps=3",
    "warmup.batch_size=4",
    "steps=4",
    "groups_per_step=2",
    "group_size=4",
    "max_tokens=12",
    "env.eval_size=4",
    "eval_every=2",
    "checkpoint.every=2",
    # Length varies even when answers are all wrong, so RL steps have a signal.
    "reward=[format,correct,concise]",
    "reward.concise.only_correct=false",
]
SWEEP = ["-m", *ARMS_RUN, "seed=0,1", "optim.lr=3e-4"]
ADAPTERS = ["hydra/launcher=adapters", "hydra.launcher.arms=2"]
ARMS = ("0", "1")


def bitwise(a, b) -> bool:
    """metrics.jsonl and adapter/ identical (what `python -m rlkit.repro compare` checks)."""
    return compare.compare(a, b).equal


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The sweep under the adapters launcher, uninterrupted: its dir and its process."""
    root = tmp_path_factory.mktemp("reference")
    proc = cli([*SWEEP, *ADAPTERS, f"hydra.sweep.dir={root / 'sweep'}"], cwd=root)
    return root / "sweep", proc


def resume_matches(tmp_path, sweep, reference) -> None:
    """`resume=auto` finishes every arm of `sweep`, bitwise as the uninterrupted sweep."""
    cli([*SWEEP, *ADAPTERS, f"hydra.sweep.dir={sweep}", "resume=auto"], cwd=tmp_path)
    for arm in ARMS:
        assert bitwise(sweep / arm, reference / arm), arm


def run_sweep(tmp_path_factory, name: str, args: list[str]):
    root = tmp_path_factory.mktemp(name)
    cli([*args, f"hydra.sweep.dir={root / 'sweep'}"], cwd=root)
    return root / "sweep"


@pytest.fixture(scope="module")
def basic(tmp_path_factory):
    """The sweep under Hydra's basic launcher: each arm run alone."""
    return run_sweep(tmp_path_factory, "basic", SWEEP)


@pytest.mark.slow
def test_arms_as_adapters_equal_the_basic_launchers_runs_bitwise(tmp_path, reference, basic):
    adapters, proc = reference
    again = tmp_path / "again"
    cli([*SWEEP, *ADAPTERS, f"hydra.sweep.dir={again}"], cwd=tmp_path)
    for arm in ARMS:
        assert bitwise(adapters / arm, basic / arm), arm  # as if each ran alone
        assert bitwise(adapters / arm, again / arm), arm  # and again, the same bits
        manifest = json.loads((adapters / arm / "manifest.json").read_text())
        assert manifest["sweep"] == {
            "launcher": "adapters",
            "arms": 2,
            "arm": int(arm),
            "batch": False,
        }
        assert (adapters / arm / "adapter" / "adapter_model.safetensors").is_file()
        assert (adapters / arm / ".hydra" / "overrides.yaml").is_file()
    # The arms differ (seeds): not one run written twice.
    assert not bitwise(adapters / "0", adapters / "1")
    assert (adapters / "sweep_summary.md").read_text().count("seed=") == 2
    assert (adapters / "sweep_curves.png").stat().st_size > 1000
    assert "sweep summary" in proc.stderr


# Metrics that time the run, not what it computed.
TIMINGS = ("seconds", "/s", "time")
BATCHED = [*SWEEP, *ADAPTERS, "hydra.launcher.batch=true"]


# Batched vs alone, measured over 8 arms (seeds 0-7, 4 RL steps each): rewards, accuracies,
# token counts and the lr are identical; relative gaps up to 4.2e-7 (grad_norm) and 1.2e-7
# (entropy, the warm start's loss); the loss, a sum of terms of order 1 that may nearly cancel,
# up to 8.1e-6 in absolute terms (a loss of 1.6e-4 once failed rel=1e-3/abs=1e-5 with a gap of
# 1.1e-5); quantities that are rounding noise themselves (the probe, sampler-trainer gaps) up to
# 1.7e-7. The bounds below are those maxima times >= 10.
EXACT = ("reward/", "eval/", "train/accuracy", "train/completion_tokens", "train/frac_", "train/lr")
EXACT += ("train/truncated_frac",)
NOISE = ("sync/probe_mismatch", "train/logprob_mismatch", "train/kl_sampler_trainer")
NOISE_ATOL, LOSS_ATOL, REL = 1e-6, 1e-4, 1e-5


def assert_close_runs(a, b) -> None:
    """The same steps and metrics, each float to rounding (timings aside)."""
    got, want = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key, value in w.items():
            if any(t in key for t in TIMINGS):
                continue
            where = (a, w["step"], key, g[key], value)
            if not isinstance(value, float) or key.startswith(EXACT):
                assert g[key] == value, where
            elif key.startswith(NOISE):
                assert abs(g[key] - value) <= NOISE_ATOL, where
            elif key == "train/loss":
                assert abs(g[key] - value) <= LOSS_ATOL, where
            else:
                assert g[key] == pytest.approx(value, rel=REL), where


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    """The sweep with its arms' forward_backward and sample calls batched, uninterrupted."""
    return run_sweep(tmp_path_factory, "batched", BATCHED)


@pytest.mark.slow
def test_batched_arms_are_their_runs_to_rounding_and_the_same_bits_every_time(
    tmp_path, basic, batched
):
    """hydra.launcher.batch=true: the arms' forward_backward calls run as one pass and their
    samples as one decode, each row through its arm's adapter: every arm's metrics are its
    basic run's to float rounding, and a rerun of the batched sweep gets the same bits."""
    again = tmp_path / "again"
    cli([*BATCHED, f"hydra.sweep.dir={again}"], cwd=tmp_path)
    # Shared passes, other sums: not every arm the same bits as alone.
    assert not all(bitwise(batched / arm, basic / arm) for arm in ARMS)
    for arm in ARMS:
        assert bitwise(batched / arm, again / arm), arm
        manifest = json.loads((batched / arm / "manifest.json").read_text())
        assert manifest["sweep"]["batch"] is True
        assert_close_runs(batched / arm, basic / arm)


@pytest.mark.slow
def test_a_sigkilled_batched_sweep_resumes_every_arm(tmp_path, batched):
    sweep = tmp_path / "sweep"
    killed = cli(
        [*BATCHED, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        extra_env={"RLKIT_FAULT": "kill-in-checkpoint:2"},
        check=False,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    cli([*BATCHED, f"hydra.sweep.dir={sweep}", "resume=auto"], cwd=tmp_path)
    for arm in ARMS:  # each arm from its own checkpoint: to rounding the uninterrupted sweep
        assert_close_runs(sweep / arm, batched / arm)


@pytest.mark.slow
def test_a_sigkilled_sweep_resumes_every_arm_exactly(tmp_path, reference):
    sweep = tmp_path / "sweep"
    # Killed halfway through writing the checkpoint of step 2 (by whichever arm gets there
    # first): the process dies with every arm wherever it was.
    killed = cli(
        [*SWEEP, *ADAPTERS, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        extra_env={"RLKIT_FAULT": "kill-in-checkpoint:2"},
        check=False,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (sweep / "0" / "summary.json").exists()
    resume_matches(tmp_path, sweep, reference[0])


@pytest.mark.slow
def test_sigterm_stops_every_arm_with_a_checkpoint_and_resume_finishes_them(tmp_path, reference):
    sweep = tmp_path / "sweep"
    # SIGTERM (sent by the process itself after an arm's 2nd warm-start step): every arm
    # finishes what it is doing, writes a checkpoint and stops; the sweep exits 0.
    stopped = cli(
        [*SWEEP, *ADAPTERS, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        extra_env={"RLKIT_FAULT": "sigterm-in-warmup:2"},
    )
    assert "sweep stopped" in stopped.stdout + stopped.stderr
    assert "resume=auto" in stopped.stdout + stopped.stderr
    for arm in ARMS:
        assert (sweep / arm / "checkpoints" / "latest").exists(), arm
        assert not (sweep / arm / "summary.json").exists()
    resume_matches(tmp_path, sweep, reference[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    "swept, key",
    [
        ("model.base_model=rlkit-tiny,rlkit-small", "model.base_model"),
        ("engine=hf,vllm", "engine._target_"),
        ("model.dtype=float32,bfloat16", "model.dtype"),
    ],
)
def test_arms_that_cannot_share_a_base_are_refused_naming_the_key(tmp_path, swept, key):
    sweep = tmp_path / "sweep"
    proc = cli([*SWEEP, swept, *ADAPTERS, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert f"differ in {key}" in lines[0] and "hydra/launcher=basic" in lines[0]
    assert not list(sweep.glob("*/metrics.jsonl"))  # nothing ran


@pytest.mark.slow
def test_fewer_than_one_arm_at_a_time_is_refused(tmp_path):
    proc = cli(
        [*SWEEP, "hydra/launcher=adapters", "hydra.launcher.arms=0"], cwd=tmp_path, check=False
    )
    assert proc.returncode == 1
    assert "hydra.launcher.arms must be a whole number >= 1" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_a_batch_switch_that_is_not_a_boolean_is_refused(tmp_path):
    proc = cli([*SWEEP, *ADAPTERS, "hydra.launcher.batch=sometimes"], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "hydra.launcher.batch" in proc.stderr and "sometimes" in proc.stderr, proc.stderr
