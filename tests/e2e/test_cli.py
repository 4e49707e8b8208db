"""The command line on a user's mistakes and hostile input, in a subprocess each: one line
for a user's error (bad config, bad data, a misbehaving plugin, a run dir in use or that is a
file, a full disk, a second SIGTERM), a traceback for a bug; every entry point's usage; `--help`."""

import json
import os
import subprocess
import sys

import pytest

from rlkit.run.outputs import read_jsonl
from tests.e2e import warm
from tests.e2e.runs import cli as rlkit_cli
from tests.e2e.runs import replace_rollout_metrics, wait_for_lines

# Every test runs `python -m rlkit` (or another entry point) in a subprocess.
pytestmark = pytest.mark.slow

TINY = ["recipe=pair_sum", "model=rlkit_tiny"]

FAST = [
    *TINY,
    "adapter.rank=4",
    "warmup.steps=1",
    "warmup.batch_size=2",
    "steps=1",
    "groups_per_step=2",
    "group_size=2",
    "max_tokens=4",
    "env.eval_size=2",
]


def cli(tmp_path, *args, env=None):
    run_dir = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"  # a fresh one per call
    return warm.run(
        "rlkit", [*args, f"hydra.run.dir={run_dir}"], tmp_path, {**os.environ, **(env or {})}, 300
    )


def test_help_lists_groups(tmp_path):
    out = rlkit_cli(["--help"], cwd=tmp_path).stdout
    for group in ("reward:", "advantage:", "loss:", "model:", "env:", "grader:"):
        assert group in out, out
    recipes = next(line for line in out.splitlines() if line.startswith("recipe:"))
    assert {"pair_sum", "word_problems", "calculator"} <= set(recipes[7:].replace(",", " ").split())


def test_bad_config_fails_before_loading_a_model(tmp_path):
    proc = rlkit_cli(
        ["recipe=pair_sum", "group_size=0", f"hydra.run.dir={tmp_path}/r"], tmp_path, check=False
    )
    assert proc.returncode != 0
    assert "config error: group_size must be >= 1, got 0" in proc.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_bad_data_is_one_line_naming_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2"}\n')
    proc = rlkit_cli(["env=dataset", f"env.path={tmp_path / 'd.jsonl'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "d.jsonl line 2: no field 'answer' (env.answer_field=answer)" in proc.stderr


@pytest.mark.slow
def test_vllm_on_a_head_size_it_cannot_serve_fails_before_the_warm_start(tmp_path):
    proc = cli(tmp_path, *FAST, "engine=vllm")
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: engine=vllm cannot serve this model on CPU: its attention head_dim is 16"
        )
    ), proc.stderr
    assert "Traceback" not in proc.stderr and "warm start" not in proc.stderr
    assert not (tmp_path / "run0" / "metrics.jsonl").exists()  # nothing to resume


@pytest.mark.slow
def test_a_users_error_is_one_line_a_bug_keeps_its_traceback(tmp_path):
    (tmp_path / "mine.py").write_text(
        "def bad_reward(completions, problem):\n"
        "    raise ZeroDivisionError('boom')\n"
        "from rlkit.rl.envs.pair_sum import PairSumEnv\n"
        "class BrokenEnv(PairSumEnv):\n"
        "    def eval_problems(self):\n"
        "        return 5  # not a list: rlkit's loop fails on it as on a bug of its own\n"
    )
    env = {"PYTHONPATH": str(tmp_path)}
    reward = cli(tmp_path, *FAST, "+reward.bad._target_=mine.bad_reward", env=env)
    assert reward.returncode == 1 and "Traceback" not in reward.stderr, reward.stderr
    assert "error: reward 'bad' raised ZeroDivisionError: boom" in reward.stderr

    config = cli(tmp_path, *FAST, "group_size=1")
    assert "Traceback" not in config.stderr
    assert config.stderr.strip().endswith(
        "config error: group_size must be >= 2, got 1: "
        "advantages compare a group's completions with each "
        "other, and a group whose rewards are all equal is skipped"
    )

    # What an env returns is checked like a reward's: one line naming it.
    broken = cli(tmp_path, *FAST, "env._target_=mine.BrokenEnv", env=env)
    assert broken.returncode == 1 and "Traceback" not in broken.stderr, broken.stderr
    assert "error: env BrokenEnv.eval_problems() returned int, not a list" in broken.stderr

    # A bug in rlkit (injected: a function of the loop that raises) keeps its traceback.
    raising = replace_rollout_metrics(tmp_path / "bug", "    raise AssertionError('an rlkit bug')")
    bug = cli(tmp_path, *FAST, env={"PYTHONPATH": raising})
    assert bug.returncode == 1 and "Traceback" in bug.stderr, bug.stderr
    assert "AssertionError: an rlkit bug" in bug.stderr


def last_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_swapped_warmup_or_env_replaces_the_recipes_settings(tmp_path):
    """`recipe=pair_sum warmup=none` starts RL at once (it ran the recipe's 60-step warm start);
    `recipe=pair_sum env=dataset env.path=...` runs (it failed on the recipe's env.n_choices)."""
    no_warmup = [o for o in FAST if not o.startswith("warmup.")]
    proc = cli(tmp_path, *no_warmup, "warmup=none")
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(tmp_path / "run0" / "metrics.jsonl")
    assert rows[0]["step"] == 0 and "warm start" not in proc.stderr

    data = tmp_path / "sums.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"{a}+1", "answer": a + 1}) + "\n" for a in range(9))
    )
    proc = cli(tmp_path, *no_warmup, "warmup=none", "env=dataset", f"env.path={data}")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_a_second_run_on_a_run_dir_in_use_is_refused_at_once(tmp_path):
    run_dir = tmp_path / "shared"
    # Far more steps than the second run's start-up lasts (200 tiny steps once ended first, and
    # the second then resumed the finished run); the first is killed when the check is done.
    # Both forked from warm interpreters (tests/e2e/warm.py), each its own process: the first
    # from the one warm.start uses (its pid is the run's), the second from the one warm.python
    # names.
    first = warm.start(
        "rlkit",
        [*FAST, "steps=100000", f"hydra.run.dir={run_dir}"],
        tmp_path,
        os.environ,
        tmp_path / "first.out",
        tmp_path / "first.out",
    )
    try:
        wait_for_lines(run_dir / "metrics.jsonl", 1, first)  # running, lock held
        assert first.poll() is None
        second = subprocess.run(
            [warm.python(), "-m", "rlkit", *FAST, f"hydra.run.dir={run_dir}", "resume=auto"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        first.kill()
    assert second.returncode == 1
    assert last_line(second) == (
        f"error: {run_dir} is in use by another run (process {first.pid}, lock "
        f"{run_dir}/.rlkit.lock); wait for it to end, or choose another hydra.run.dir"
    )
    assert (run_dir / "metrics.jsonl").read_text()  # the first run's metrics are still there


@pytest.mark.slow
def test_a_run_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("x")
    proc = warm.run(
        "rlkit", [*FAST, f"hydra.run.dir={tmp_path / 'taken' / 'run'}"], tmp_path, timeout=120
    )
    assert proc.returncode == 1
    assert last_line(proc) == (
        f"error: hydra.run.dir={tmp_path}/taken/run cannot be a run directory: it is a file "
        f"(its parent {tmp_path}/taken is a file)"
    )


PLUGINS = """
import re
import os

from rlkit.rl.envs.pair_sum import PairSumEnv


def interrupts(completions, problem):
    raise KeyboardInterrupt


def backtracks(completions, problem):
    return [float(bool(re.match(r"(a+)+$", "a" * 40 + "b"))) for _ in completions]


def sleepy(completions, problem):
    import time

    time.sleep(30)
    return [0.0] * len(completions)


class Flood(PairSumEnv):
    max_turns = 2

    def step(self, problem, transcript):
        return "x" * 1_000_000
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "code", "line"),
    [
        (
            ["+reward.bad._target_=plugins.interrupts"],
            130,
            "Continue with:",
        ),
        (
            ["+reward.slow._target_=plugins.backtracks", "plugin_timeout_s=1"],
            1,
            "error: reward 'slow' did not return within plugin_timeout_s=1 s (one group of 2 "
            "completions)",
        ),
        (
            ["env._target_=plugins.Flood"],
            1,
            "observation of 1000000 tokens (problem",
        ),
        (["recipe=calculator", "env.max_turns=0"], 1, "config error: env: env.max_turns must be"),
    ],
)
def test_plugins_that_misbehave_are_one_line(tmp_path, overrides, code, line):
    (tmp_path / "plugins.py").write_text(PLUGINS)
    proc = cli(tmp_path, *FAST, *overrides, env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == code, proc.stderr
    assert line in last_line(proc) or line in proc.stderr.strip().splitlines()[-2], proc.stderr
    if code == 130:
        assert "interrupted (KeyboardInterrupt): the last complete checkpoint is" in proc.stderr


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_nothing_behind(tmp_path):
    proc = cli(
        tmp_path,
        *FAST,
        "steps=3",
        "checkpoint.every=1",
        env={"RLKIT_FAULT": "disk-full-in-checkpoint:2"},
    )
    assert proc.returncode == 1
    checkpoints = tmp_path / "run0" / "checkpoints"
    line = last_line(proc)
    assert line.startswith(
        f"error: disk full: checkpoint step_000002 could not be written to {checkpoints} ("
    )
    assert line.endswith(
        f"MiB free on that disk); the last good checkpoint is {checkpoints}/step_000001. Free "
        "some space, then continue with resume=auto"
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "latest",
        "step_000000",
        "step_000001",
        "warm_start",
    ]


@pytest.mark.slow
def test_a_second_sigterm_stops_at_once_with_one_line(tmp_path):
    import signal
    import time

    (tmp_path / "plugins.py").write_text(PLUGINS)
    run_dir = tmp_path / "run"
    proc = warm.start(
        "rlkit",
        [*FAST, "+reward.slow._target_=plugins.sleepy", f"hydra.run.dir={run_dir}"],
        tmp_path,
        {**os.environ, "PYTHONPATH": str(tmp_path)},
        tmp_path / "stdout",
        tmp_path / "stderr",
    )
    wait_for_lines(run_dir / "metrics.jsonl", 1, proc)  # the warm start's row: RL step 0 begins
    time.sleep(1)  # in the reward's 30 s sleep
    proc.send_signal(signal.SIGTERM)  # finish the step, then checkpoint ...
    time.sleep(5.5)  # (a repeat within 5 s is the same request arriving twice: a launcher's)
    proc.send_signal(signal.SIGTERM)  # ... no: stop now
    proc.wait(timeout=120)
    _, err = proc.output()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert (
        "interrupted (second SIGTERM: stopping now, without a checkpoint): the last complete "
        f"checkpoint is {run_dir}/checkpoints/step_000000. Continue with:" in err
    ), err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "flag"),
    [
        ("rlkit", "--help"),
        ("rlkit.serve", "--help"),  # exited 1 with a Hydra lexer error
        ("rlkit.serve", "-h"),
        ("rlkit.repro", "--help"),
        ("rlkit.examples.first_sft", "--help"),
    ],
)
def test_every_entry_point_prints_its_usage_and_exits_0(module, flag, tmp_path):
    proc = warm.run(module, [flag], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower() or "Usage" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_accelerates_cpu_launcher_starting_one_process_is_named(tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu"]
    launcher += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launcher += ["--dynamo_backend", "no", "-m", "rlkit", *FAST, "--cfg", "job"]
    proc = subprocess.run(launcher, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (
        "warning: accelerate launch was asked for 2 processes, but with --cpu it starts one: this "
        "run is 1 process. For 2 processes on CPU (gloo), launch with --multi_gpu "
        "--num_processes 2" in proc.stderr
    ), proc.stderr
