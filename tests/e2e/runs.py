"""What the end-to-end tests share (`from tests.e2e.runs import ...`): shortened runs, the CLI
in a subprocess, bitwise comparison of run dirs, and fault injection and waiting in child
processes."""

import os
import subprocess
import time
import urllib.request

from rlkit.run import compare
from tests.e2e import warm

# A shortened pair_sum run on the tiny model: seconds, not minutes.
FAST = [
    "recipe=pair_sum",
    "model=rlkit_tiny",
    "adapter.rank=4",
    "warmup.steps=2",
    "warmup.batch_size=4",
    "steps=3",
    "groups_per_step=2",
    "group_size=4",
    "max_tokens=12",
    "env.eval_size=4",
    "eval_every=2",
    "samples_every=1",
    "optim.schedule=linear",  # (the recipe's too) asserted below
    # Length varies even when answers are all wrong, so RL steps have a signal.
    "reward=[format,correct,concise]",
    "reward.concise.only_correct=false",
]


def cli(args, cwd, extra_env=None, check=True):
    """`python -m rlkit ARGS` in `cwd`, in a process of its own (forked from a warm interpreter:
    tests/e2e/warm.py), its output captured."""
    proc = warm.run("rlkit", args, cwd, {**os.environ, **(extra_env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"rlkit {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


# A tiny pair_sum run (rlkit-tiny, 4 RL steps, checkpoints at steps 0, 2, 4): what the
# reproducibility tests compare byte for byte.
STEPS = 4
TINY = [
    "recipe=pair_sum",
    "model=rlkit_tiny",
    "adapter.rank=4",
    "warmup.steps=1",
    "warmup.batch_size=4",
    f"steps={STEPS}",
    "groups_per_step=2",
    "group_size=4",
    "max_tokens=8",
    "env.eval_size=2",
    f"eval_every={STEPS}",
    "samples_every=2",
    # Length varies even when answers are all wrong, so RL steps have a signal.
    "reward=[format,correct,concise]",
    "reward.concise.only_correct=false",
    "checkpoint.every=2",
    "determinism.num_threads=1",
]


def assert_same_as(reference, run_dir):
    """`run_dir` is bitwise the run `reference` (as `rlkit.repro compare` says), metrics.jsonl
    and the adapter's files byte for byte."""
    result = compare.compare(reference, run_dir)
    assert result.equal, compare.report(result, reference, run_dir)
    assert (run_dir / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (run_dir / "adapter" / name).read_bytes() == (
            reference / "adapter" / name
        ).read_bytes()


def replace_rollout_metrics(directory, body: str) -> str:
    """A PYTHONPATH under which a Python process replaces, as it starts (sitecustomize), the
    loop's `rlkit.rl.rollouts.rollout_metrics` with one running `body` (Python lines, indented
    by 4; `original(*args, **kwargs)` is the real one). For fault injection in child processes."""
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(
        "import time\n\nimport rlkit.rl.rollouts\n\n"
        "original = rlkit.rl.rollouts.rollout_metrics\n\n\n"
        f"def replacement(*args, **kwargs):\n{body}\n\n\n"
        "rlkit.rl.rollouts.rollout_metrics = replacement\n"
    )
    return str(directory)


def wait_for_lines(path, lines: int, process, timeout: float = 240.0) -> None:
    """Until the file `path` has `lines` lines (a run's progress), `process` ends, or `timeout`
    seconds pass."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.2)


def free_port() -> int:
    """A TCP port nothing listens on right now, on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(tmp_path, *args: str) -> tuple[subprocess.Popen, str]:
    """`python -m rlkit.service` on a free port, its --dir under `tmp_path`, once it answers;
    the process and its URL."""
    port = free_port()
    proc = subprocess.Popen(  # forked from a warm interpreter (tests/e2e/warm.py)
        [
            warm.python(),
            "-m",
            "rlkit.service",
            "--port",
            str(port),
            "--dir",
            str(tmp_path / "svc"),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the service exited:\n{proc.stdout.read()}")
        try:
            urllib.request.urlopen(f"{url}/api/v1/healthz", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("the service did not answer within 120 s")


def trainer_logprobs(trainer, types, prompt: list[int], completion: list[int]) -> list[float]:
    """The training client's logprobs of `completion` after `prompt` (a cross_entropy forward
    pass), to hold a sampler's logprobs against; `types`: the API's types module (rlkit's or
    the tinker SDK's)."""
    full = prompt + list(completion)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={"target_tokens": full[1:], "weights": [1.0] * (len(full) - 1)},
    )
    out = trainer.forward([datum], "cross_entropy").result()
    return out.loss_fn_outputs[0]["logprobs"].tolist()[len(prompt) - 1 :]
