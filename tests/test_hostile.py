"""The hostile-input battery (issue 11): each case a new user or a hostile tester tried, kept so
none regresses. Config-level cases load no model.

Cases that already behaved well are kept where they live: typos, wrong types and unknown options
(test_config.py), NaN datums and out-of-vocabulary ids (test_errors.py), kills and corrupt or
pickled checkpoints (test_repro.py, test_checkpoint.py), rewards that raise, return NaN or too
few values (test_trainer.py, test_algorithm.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import replace_rollout_metrics

from rlkit.api import losses
from rlkit.api.errors import RlkitError
from rlkit.run import checkpoint, sweep
from rlkit.run.config import compose
from rlkit.run.schema import ConfigError
from rlkit.run.session import summarize
from rlkit.run.validate import validate

TINY = ["recipe=pair_sum", "model=rlkit_tiny"]


def config_error(*overrides) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose([*TINY, *overrides]))
    return str(info.value)


# ---- config-level: no model loads --------------------------------------------------------------
def test_group_size_one_is_refused_naming_the_key():
    assert "group_size must be >= 2, got 1" in config_error("group_size=1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_on_a_cpu_build_names_model_device():
    message = config_error("model.device=cuda")
    assert message.startswith("model.device=cuda, but torch") and "use model.device=cpu" in message
    assert "model.device=cuda:3" in config_error("model.device=cuda:3")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("env.high=abc", "env.high='abc' must be int (the high argument of"),
        ("env.n_choices=[2,x]", "env.n_choices=[2, 'x'] must be a list of int"),
        ("env.system_prompt=3", "env.system_prompt=3 must be str"),
        ("+reward.concise.max_chars=1.5", "reward.concise.max_chars=1.5 must be int"),
    ],
)
def test_component_arguments_are_checked_against_their_annotations(override, message):
    extra = ["reward=[format,correct,concise]"] if "concise" in override else []
    assert message in config_error(*extra, override.lstrip("+"))


def test_a_components_own_value_check_is_a_config_error_naming_it():
    from rlkit.run.build import as_callable

    cfg = compose([*TINY, "env.n_choices=[3]"])
    with pytest.raises(ConfigError, match=r"^env: env.n_choices must be even numbers >= 2"):
        as_callable(cfg.env, "env")


def test_an_inverted_clip_range_is_refused_in_the_config_and_the_api():
    message = config_error("loss=ppo", "loss.config.clip_low_threshold=2")
    assert "clip_low_threshold <= 1 <= clip_high_threshold" in message and "2.0 and 1.2" in message
    with pytest.raises(ValueError, match="clip_low_threshold <= 1 <= clip_high_threshold"):
        losses.get_loss("cispo").resolve_config("cispo", {"clip_high_threshold": 0.9})


def test_a_cache_dir_that_is_a_file_is_named(tmp_path, monkeypatch):
    import rlkit

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    monkeypatch.setenv("RLKIT_CACHE_DIR", str(not_a_dir))
    with pytest.raises(RlkitError, match=f"RLKIT_CACHE_DIR={not_a_dir} is a file, not a directory"):
        rlkit.ServiceClient(device="cpu")


def test_summary_json_holds_null_never_nan(tmp_path, capsys):
    history = [{"step": 0, "reward/mean": float("nan")}, {"step": 1, "reward/mean": None}]
    summarize(history, tmp_path)

    def refuse(constant):
        raise ValueError(f"{constant} in summary.json")

    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert summary["reward/mean_first"] is None and summary["eval/accuracy_final"] is None
    assert "mean reward n/a -> n/a" in capsys.readouterr().err
    sweep.write_table([{"name": "x", "summary": summary, "dir": tmp_path}], tmp_path / "t.md")
    assert "| 1 | x | n/a | n/a | n/a |" in (tmp_path / "t.md").read_text()


# ---- checkpoints (a tiny training client, no RL loop) -------------------------------------------
BASE = [*TINY, "adapter.rank=8"]


def saved_checkpoints(tmp_path, trainer, steps):
    ckpt = checkpoint.Checkpointer(tmp_path / "run", compose(BASE))
    ckpt.resume(trainer)
    for step in steps:
        ckpt.save(step)
    return ckpt


def test_resuming_with_another_adapter_rank_is_refused_before_loading(tmp_path, trainer, service):
    ckpt = saved_checkpoints(tmp_path, trainer, [0])
    fresh = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    cfg = compose([*TINY, "adapter.rank=4", "resume=auto"])
    with pytest.raises(ConfigError, match=r"different adapter.rank \(8 -> 4\)"):
        checkpoint.Checkpointer(ckpt.run_dir, cfg).resume(fresh)


def test_a_garbage_adapter_with_a_matching_checksum_falls_back(tmp_path, trainer, service, capsys):
    ckpt = saved_checkpoints(tmp_path, trainer, [0, 2])
    bad = ckpt.dir / "step_000002"
    weights = bad / "state" / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    sums = json.loads((bad / "checksums.json").read_text())
    sums["state/adapter_model.safetensors"] = checkpoint.sha256(weights)
    (bad / "checksums.json").write_text(json.dumps(sums))

    fresh = service.create_lora_training_client("rlkit-tiny", rank=8, seed=0)
    resumed = checkpoint.Checkpointer(ckpt.run_dir, compose([*BASE, "resume=auto"])).resume(fresh)
    err = " ".join(capsys.readouterr().err.split())
    assert f"skipping checkpoint {bad}: unreadable" in err, err
    assert resumed.step == 0


def test_the_pickle_refusal_does_not_advise_weights_only_false(tmp_path, trainer, service, capsys):
    ckpt = saved_checkpoints(tmp_path, trainer, [0, 2])
    bad = ckpt.dir / "step_000002"
    torch.save({"payload": object()}, bad / "state" / "optimizer.pt")
    sums = json.loads((bad / "checksums.json").read_text())
    sums["state/optimizer.pt"] = checkpoint.sha256(bad / "state" / "optimizer.pt")
    (bad / "checksums.json").write_text(json.dumps(sums))
    fresh = service.create_lora_training_client("rlkit-tiny", rank=8, seed=0)
    checkpoint.Checkpointer(ckpt.run_dir, compose([*BASE, "resume=auto"])).resume(fresh)
    err = capsys.readouterr().err
    assert "refused: it holds a pickled object" in err and "weights_only=False" not in err


# ---- the command line: one line for a user's error, a traceback for a bug -----------------------
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
    return subprocess.run(
        [sys.executable, "-m", "rlkit", *args, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


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


def test_an_unreachable_hub_fails_at_once_with_one_message(monkeypatch):
    """Fault injection: the hub lookup fails as it does offline; no retried download follows."""
    import huggingface_hub

    from rlkit.api.errors import ModelNotFoundError
    from rlkit.backend import models

    calls = []

    def unreachable(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(ModelNotFoundError, match="the model hub / its local cache — Connection"):
        models.load_tokenizer("not-a-model")
    assert calls == ["not-a-model"]


def test_wandb_that_cannot_start_online_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    import wandb

    from rlkit.run.wandb_logger import WandbLogger

    monkeypatch.setenv("WANDB_API_KEY", "short")  # malformed: wandb refuses it before any network
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(str(tmp_path), {"seed": 0}, init_timeout=5)
    assert logger.mode == "offline"
    assert "online start failed: AuthenticationError" in capsys.readouterr().err
    logger.close()

    real_init = wandb.init

    def unreachable(**kwargs):  # fault injection: what an unreachable server raises
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("Timed out while retrying: no such host")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", unreachable)
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    logger = WandbLogger(str(tmp_path), {"seed": 0})
    assert logger.mode == "offline"
    assert "online start failed: CommError: Timed out" in capsys.readouterr().err
    logger.close()


def test_a_server_that_answers_html_is_named_with_its_url(tmp_path):
    """`engine.url` pointing at something that is not vLLM (a web page on the port)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import rlkit
    from rlkit.backend.engines.vllm_server import ServerError

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>It works!</html>")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        service = rlkit.ServiceClient(
            device="cpu", engine="vllm_server", engine_options={"url": url}
        )
        trainer = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
        with pytest.raises(ServerError) as info:
            trainer.save_weights_and_get_sampling_client()
    finally:
        server.shutdown()
    message = str(info.value)
    assert message.startswith(f"engine=vllm_server: {url}/v1/models did not answer as vLLM's")
    assert "'<html>It works!</html>'" in message and "rlkit.serve" in message


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("symlink", r"adapter_model.safetensors is a link to /dev/zero, not a weights file"),
        ("garbage", r"cannot read .*adapter_model.safetensors as safetensors \(SafetensorError"),
        ("missing", r"adapter_model.safetensors is missing, not a weights file"),
        ("state_list", r"rlkit_state.json holds list, not a JSON object"),
        ("state_json", r"cannot read .*rlkit_state.json: Expecting property name"),
    ],
)
def test_load_state_from_a_damaged_folder_names_the_file(trainer, damage, message):
    path = Path(trainer.save_state("x").result().path)
    weights, state = path / "adapter_model.safetensors", path / "rlkit_state.json"
    if damage in ("symlink", "garbage", "missing"):
        weights.unlink()
    if damage == "symlink":
        weights.symlink_to("/dev/zero")
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 64)
    elif damage == "state_list":
        state.write_text("[1, 2]")
    elif damage == "state_json":
        state.write_text("{not json")
    with pytest.raises(RlkitError, match=message):
        trainer.load_state(str(path)).result()


# ---- round 2: documented commands, plugin seams, limits, locks (CLI: the line a user sees) -------
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
    rows = [json.loads(x) for x in (tmp_path / "run0" / "metrics.jsonl").read_text().splitlines()]
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
    first = subprocess.Popen(
        [sys.executable, "-m", "rlkit", *FAST, "steps=100000", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        from conftest import wait_for_lines

        wait_for_lines(run_dir / "metrics.jsonl", 1, first)  # running, lock held
        assert first.poll() is None
        second = subprocess.run(
            [sys.executable, "-m", "rlkit", *FAST, f"hydra.run.dir={run_dir}", "resume=auto"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 1
    assert last_line(second) == (
        f"error: {run_dir} is in use by another run (process {first.pid}, lock "
        f"{run_dir}/.rlkit.lock); wait for it to end, or choose another hydra.run.dir"
    )
    assert (run_dir / "metrics.jsonl").read_text()  # the first run's metrics are still there


@pytest.mark.slow
def test_a_run_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "rlkit", *FAST, f"hydra.run.dir={tmp_path / 'taken' / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
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

    from conftest import wait_for_lines

    (tmp_path / "plugins.py").write_text(PLUGINS)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlkit", *FAST, "+reward.slow._target_=plugins.sleepy"]
        + [f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    wait_for_lines(run_dir / "metrics.jsonl", 1, proc)  # the warm start's row: RL step 0 begins
    time.sleep(1)  # in the reward's 30 s sleep
    proc.send_signal(signal.SIGTERM)  # finish the step, then checkpoint ...
    time.sleep(5.5)  # (a repeat within 5 s is the same request arriving twice: a launcher's)
    proc.send_signal(signal.SIGTERM)  # ... no: stop now
    _, err = proc.communicate(timeout=120)
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
def test_every_entry_point_prints_its_usage_and_exits_0(module, flag):
    proc = subprocess.run(
        [sys.executable, "-m", module, flag], capture_output=True, text=True, timeout=120
    )
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
