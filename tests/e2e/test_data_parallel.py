"""Data-parallel RL runs under a real launcher (`accelerate launch`, gloo on CPU), end to end.

Every run here is the same small pair_sum config on the tiny model (SFT warm start, eval, 3
groups over 2 processes: uneven shares on purpose). What is checked:
- two 2-process runs are bitwise identical (a rerun in `make test-all`; in `make test`, the
  killed-and-resumed run equals the uninterrupted one bit for bit);
- a 2-process run and the 1-process run agree within the stated tolerance (rollouts identical,
  numbers within rounding: the gradient sum's order differs), and only the main process wrote;
- a SIGKILLed rank fails the run promptly, the launcher names it, and `resume=auto` completes
  the run bitwise as if nothing had happened; a reward that raises in one process fails the
  run, naming that rank;
- SIGTERM to the launcher: every process stops after the same step, one checkpoint, exit 0 of
  every process; resuming it with 1 process instead of 2 completes it within the tolerance.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlkit.run.outputs import read_jsonl
from tests.e2e import warm
from tests.e2e.runs import free_port, replace_rollout_metrics, wait_for_lines

pytestmark = pytest.mark.slow  # starts launchers and their processes

ARGS = [
    "recipe=pair_sum",
    "model=rlkit_tiny",
    "adapter.rank=4",
    "warmup.steps=2",
    "warmup.batch_size=3",
    "steps=6",
    "groups_per_step=3",
    "group_size=4",
    "max_tokens=12",
    "env.eval_size=5",
    "eval_every=3",
    "samples_every=1",
    "checkpoint.every=2",
    "reward=[format,correct,concise]",
    "reward.concise.only_correct=false",
]
# The tolerance of a 2-process run against the 1-process run (docs/distributed.md).
# Rollouts are the same tokens; values that average many terms agree to float32 rounding; the
# adapter's parameters (|p| up to ~0.1 here) differ by rounding of the gradient sum's order.
EXACT = ("reward/", "eval/", "train/accuracy", "train/completion_tokens", "train/frac_skipped")
ADAPTER_ATOL = 1e-6
REL = 1e-5
# Quantities that are themselves rounding noise or sums of cancelling terms (a loss whose
# advantages sum to zero, a logprob gap of 1e-7): compared in absolute terms.
NOISE = ("train/logprob_mismatch", "train/kl_sampler_trainer", "sync/probe", "train/is_ratio_std")
NOISE_ATOL = 1e-5
# The loss: a sum over ~100 tokens of ratio x advantage, whose terms nearly cancel; the ratio's
# sampler logprobs also move by ~1e-7 with the batch the hf engine decodes them in (each
# process decodes its own share of the step). Measured: 1.0e-5 on a loss of 2e-4.
LOSS_REL, LOSS_ATOL = 1e-4, 5e-5


def launcher(processes, module, args, env) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch`'s arguments and environment to run `-m module *args` in `processes`
    processes (gloo on CPU), each forked from a warm interpreter (PYTHON_EXEC, which torchrun
    documents: tests/e2e/warm.py)."""
    launch = ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port()), "-m", module, *args]
    return launch, {**env, "PYTHON_EXEC": warm.python()}


def environment(cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "RLKIT_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1", **extra}


def launch(processes, module, args, env, timeout=300) -> subprocess.CompletedProcess:
    """`python -m module *args`, or with 2 processes `accelerate launch -m module *args`. Each
    `python -m`, the launcher's and its processes', is forked from a warm interpreter
    (tests/e2e/warm.py; the launcher's processes as `launcher` says)."""
    if processes == 1:
        return warm.run(module, args, os.getcwd(), env, timeout)
    args, env = launcher(processes, module, args, env)
    return warm.run("accelerate.commands.launch", args, os.getcwd(), env, timeout)


def run(processes, run_dir, cache, *extra, timeout=300, **env) -> subprocess.CompletedProcess:
    args = [*ARGS, f"hydra.run.dir={run_dir}", *extra]
    return launch(processes, "rlkit", args, environment(cache, **env), timeout)


def ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


def same_bits(a: Path, b: Path) -> None:
    for name in ("metrics.jsonl", "samples.jsonl", "adapter/adapter_model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def within_tolerance(a: Path, b: Path) -> None:
    rows_a, rows_b = metrics(a), metrics(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        assert row_a.keys() == row_b.keys()
        for key, x in row_a.items():
            y = row_b[key]
            if key.startswith(EXACT) or x is None or isinstance(x, int):
                assert x == y, (row_a["step"], key, x, y)
            elif key == "train/loss":
                assert x == pytest.approx(y, rel=LOSS_REL, abs=LOSS_ATOL), (row_a["step"], x, y)
            elif key.startswith(NOISE):
                assert abs(x - y) <= NOISE_ATOL, (row_a["step"], key, x, y)
            else:
                assert x == pytest.approx(y, rel=REL), (row_a["step"], key, x, y)
    # Same rollouts: the sample completions are the same text.
    assert (a / "samples.jsonl").read_bytes() == (b / "samples.jsonl").read_bytes()
    adapter_a = load_file(a / "adapter/adapter_model.safetensors")
    adapter_b = load_file(b / "adapter/adapter_model.safetensors")
    assert adapter_a.keys() == adapter_b.keys()
    for name, tensor in adapter_a.items():
        torch.testing.assert_close(tensor, adapter_b[name], rtol=0, atol=ADAPTER_ATOL)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def two(tmp_path_factory, cache) -> Path:
    """The reference: an uninterrupted 2-process run."""
    run_dir = tmp_path_factory.mktemp("two") / "run"
    ok(run(2, run_dir, cache))
    return run_dir


# A second uninterrupted 2-process run: `make test` checks that 2-process runs repeat bitwise
# through the killed-and-resumed run below, which must equal `two` bit for bit.
@pytest.mark.full
def test_two_processes_repeat_bitwise(tmp_path, cache, two):
    ok(run(2, tmp_path / "again", cache))
    same_bits(two, tmp_path / "again")


def test_two_processes_match_one_process_within_tolerance(tmp_path, cache, two):
    ok(run(1, tmp_path / "one", cache))
    within_tolerance(two, tmp_path / "one")
    # Something was learned (not a run of skipped steps).
    assert any(r.get("train/grad_norm") for r in metrics(two))

    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["processes"]["world_size"] == 2
    assert manifest["processes"]["backend"] == "gloo"
    assert manifest["processes"]["launcher_env"]["WORLD_SIZE"] == "2"
    one_manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert one_manifest["processes"] == {"world_size": 1}
    # Only the main process wrote: one .hydra record, each step logged once.
    assert [r["step"] for r in metrics(two)] == [-1, 0, 1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in two.iterdir() if p.name.startswith(".")) == [
        ".hydra",
        ".rlkit.lock",
    ]


def test_a_killed_rank_fails_the_run_and_resume_completes_it_bitwise(tmp_path, cache, two):
    run_dir = tmp_path / "run"
    done = run(2, run_dir, cache, RLKIT_FAULT="kill-rank:1:step:3")
    ended = time.time()
    assert done.returncode != 0
    out = done.stdout + done.stderr
    killed_at = float(re.search(r"kill-rank:1:step:3: SIGKILL at ([\d.]+)", out).group(1))
    # The launcher names the rank that died first; the survivor says what failed.
    assert "rank      : 1 (local_rank: 1)" in out and "SIGKILL" in out, out[-3000:]
    assert "rank 0 of 2: the stop flag across processes failed" in out, out[-3000:]
    # Bounded: the survivor's next exchange fails at once (measured: the launcher was done
    # 2.4 s after the kill, on a busy machine); the launcher's shutdown timeout (30 s) bounds it.
    print(f"run down {ended - killed_at:.2f} s after the SIGKILL")
    assert ended - killed_at < 40
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"

    ok(run(2, run_dir, cache, "resume=auto"))
    same_bits(two, run_dir)


def test_sigterm_to_the_launcher_stops_every_process_after_one_step_and_resumes_with_one(
    tmp_path, cache, two
):
    run_dir = tmp_path / "run"
    # Each logged step takes a second longer (injected; the bits do not change), so the signal,
    # forwarded by the launcher, lands well before the last of the 6 steps: at tiny-model speed
    # it took 2 to 6 steps to arrive, and one run in several finished before it.
    slow = replace_rollout_metrics(
        tmp_path / "slow", "    time.sleep(1.0)\n    return original(*args, **kwargs)"
    )
    args, env = launcher(
        2,
        "rlkit",
        [*ARGS, f"hydra.run.dir={run_dir}", "checkpoint.every=0"],
        environment(cache, PYTHONPATH=slow),
    )
    output = tmp_path / "output.txt"
    process = warm.start("accelerate.commands.launch", args, tmp_path, env, output, output)
    wait_for_lines(run_dir / "metrics.jsonl", 2, process)  # the warm start's row and step 0's
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    out = output.read_text()
    # torch's elastic agent ends with its own SignalException (exit 1) after forwarding the
    # signal; what matters is that every process finished cleanly.
    assert "ChildFailedError" not in out, out[-3000:]
    assert out.count("stopped by SIGTERM") == 1, out[-3000:]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    stopped_at = len(metrics(run_dir)) - 1  # the RL steps logged (after the warm-start row)
    print(f"stopped after {stopped_at} of 6 steps")
    assert 1 <= stopped_at < 6
    # checkpoint.every=0: checkpoints only at the end and on the signal, so exactly one.
    assert checkpoints == [f"step_{stopped_at:06d}"], (checkpoints, stopped_at)

    # Resumed with 1 process instead of 2: it works, and matches within the tolerance.
    done = run(1, run_dir, cache, "checkpoint.every=0", "resume=auto")
    ok(done)
    assert "resuming a 2-process run with 1" in done.stdout + done.stderr
    within_tolerance(two, run_dir)


def test_a_reward_that_raises_in_one_process_fails_the_run_naming_that_rank(tmp_path, cache):
    plugin = tmp_path / "rank_reward.py"
    plugin.write_text(
        "import os\n\n\n"
        "def explode_on_rank_1(completions, problem):\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        raise ValueError('this reward fails on rank 1')\n"
        "    return [0.0] * len(completions)\n"
    )
    done = run(
        2,
        tmp_path / "run",
        cache,
        "+reward.boom._target_=rank_reward.explode_on_rank_1",
        PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "error: rank 1: " in out and "this reward fails on rank 1" in out, out[-3000:]
    assert "rank      : 1 (local_rank: 1)" in out, out[-3000:]


def test_two_processes_and_one_group_train_on_the_process_that_has_it(tmp_path, cache):
    """`groups_per_step=1` on 2 processes (docs/distributed.md's case): rank 1 has no group while rank 0
    trains, every step; the step's loss is rank 0's (it was `float + None`)."""
    run_dir = tmp_path / "run"
    ok(run(2, run_dir, cache, "groups_per_step=1", "steps=2", "warmup.steps=1", timeout=240))
    rows = [r for r in metrics(run_dir) if r["step"] >= 0 and "reward/mean" in r]
    assert rows and all(r["train/frac_skipped_groups"] in (0.0, 1.0) for r in rows)
    assert any(r["train/loss"] is not None for r in rows), rows


STEP_LINE = re.compile(r"step +(\d+)  reward ([\d.]+)  loss (\S+)  datums (\d+)")
WORK_LINE = re.compile(r"work done in this process: (\d+) tokens forward, (\d+) tokens sampled")


def hand_loop(processes: int, cache: Path) -> tuple[list[tuple], list[tuple[int, int]]]:
    """The example's step lines (one set per process: they must agree) and work lines."""
    done = launch(processes, "rlkit.examples.rl_loop", ["--steps", "6"], environment(cache))
    ok(done)
    steps = [m.groups() for m in STEP_LINE.finditer(done.stdout)]
    work = [tuple(map(int, m.groups())) for m in WORK_LINE.finditer(done.stdout)]
    assert len(steps) == 6 * processes and len(work) == processes, done.stdout[-3000:]
    return steps, work


def test_a_hand_written_loop_scales_unchanged_and_splits_the_work(cache):
    """rlkit.examples.rl_loop (plain sample / forward_backward / optim_step calls) under the
    2-process launcher: both processes see the same steps, equal to one process's (the same
    rewards and datums: the same samples; the loss within rounding), and each process did part
    of the work, together exactly one process's."""
    one_steps, [(one_fwd, one_sampled)] = hand_loop(1, cache)
    two_steps, two_work = hand_loop(2, cache)
    by_step = sorted(two_steps, key=lambda s: int(s[0]))
    for i, (step, reward, loss, datums) in enumerate(one_steps):
        for other in by_step[2 * i : 2 * i + 2]:
            assert other[0] == step and other[1] == reward and other[3] == datums, (other, step)
            if loss != "-":
                assert float(other[2]) == pytest.approx(float(loss), rel=LOSS_REL, abs=LOSS_ATOL)
    assert sum(f for f, _ in two_work) == one_fwd and all(f > 0 for f, _ in two_work), two_work
    assert sum(s for _, s in two_work) == one_sampled and all(s > 0 for _, s in two_work)


def test_rewards_run_once_per_group_in_all_however_many_processes(tmp_path, cache):
    """Every process holds the whole step, but a reward (expensive in real runs: code
    execution, judges) scores each group once in all: a reward that counts its calls is called
    steps x groups_per_step times over the 2 processes, each of which does part of it."""
    plugin = tmp_path / "counting_reward.py"
    calls = tmp_path / "calls.txt"
    plugin.write_text(
        "import os\n\n\n"
        "def counted(completions, problem):\n"
        f"    with open({str(calls)!r}, 'a') as f:\n"
        "        f.write(f'{os.getpid()} {len(completions)}\\n')\n"
        "    return [float(len(c) % 3) for c in completions]\n"
    )
    ok(
        run(
            2,
            tmp_path / "run",
            cache,
            "+reward.counted._target_=counting_reward.counted",
            "steps=2",
            "warmup.steps=1",
            PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        )
    )
    lines = [line.split() for line in calls.read_text().splitlines()]
    assert len(lines) == 2 * 3, lines  # steps x groups_per_step
    assert {n for _, n in lines} == {"4"}  # group_size completions per call
    assert len({pid for pid, _ in lines}) == 2, lines


ASYNC = ("max_steps_off_policy=2",)


@pytest.fixture(scope="module")
def two_async(tmp_path_factory, cache) -> Path:
    run_dir = tmp_path_factory.mktemp("two-async") / "run"
    ok(run(2, run_dir, cache, *ASYNC))
    return run_dir


@pytest.mark.full
def test_asynchronous_runs_on_two_processes_repeat_bitwise(tmp_path, cache, two_async):
    """max_steps_off_policy=2 on 2 processes: the background sampling's exchanges go over a
    group of their own, so they never interleave with the training's: two runs are bitwise
    equal (`make test-all`; `make test` holds the run within the tolerance of one process,
    below, which an interleaving would break too)."""
    ok(run(2, tmp_path / "b", cache, *ASYNC))
    same_bits(two_async, tmp_path / "b")


def test_asynchronous_runs_on_two_processes_match_one_process(tmp_path, cache, two_async):
    ok(run(1, tmp_path / "one", cache, *ASYNC))
    within_tolerance(two_async, tmp_path / "one")
    assert [r.get("train/staleness_max") for r in metrics(two_async) if 0 <= r["step"] < 6] == [
        0,
        1,
        2,
        2,
        2,
        2,
    ]
