"""Runs on vLLM (its CPU build), end to end: `python -m rlkit ... engine=vllm`; and
engine=vllm_server against a real vLLM server that the module starts on 127.0.0.1 with
`python -m rlkit.serve`: weight sync in place, the post-sync probe over HTTP, seeds and logprobs, a
stale adapter caught, and the named errors of a server that is down, serves another model, or dies
in the middle of a run (whose last checkpoint stays intact).

Without vLLM installed these tests skip, unless RLKIT_REQUIRE_VLLM=1 (set by `make test`, so CI
cannot pass by skipping them).
"""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from rlkit.api import types
from rlkit.backend.engines.probe import StaleAdapterError
from rlkit.backend.engines.vllm_server import ServerError, VLLMServerEngine
from rlkit.run.outputs import read_jsonl
from tests.e2e import warm
from tests.e2e.runs import FAST, cli, free_port, trainer_logprobs, wait_for_lines
from tests.helpers import skip_module_without_vllm

pytestmark = pytest.mark.slow  # runs rlkit on vLLM; starts a vLLM server

skip_module_without_vllm()

MODEL, RANK = "rlkit-small", 8
# Measured on CPU in float32: probe mismatch ~2e-7, sampled-token logprob gap <= 5e-7.
TOLERANCE = 1e-4


def test_trainer_cli_with_engine_vllm(tmp_path):
    """A few RL steps through `python -m rlkit ... engine=vllm` with truncated IS switched on."""

    run_dir = tmp_path / "run"
    cli(
        [
            *FAST,
            "model=rlkit_small",
            "engine=vllm",
            "loss.config.tis_cap=2.0",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in records if r["step"] >= 0 and "reward/mean" in r]
    assert len(steps) == 3
    for r in steps:
        assert r["sync/probe_mismatch"] < TOLERANCE
        if r["train/loss"] is not None:  # a step whose groups were all skipped trains nothing
            assert r["train/logprob_mismatch"] < TOLERANCE
            assert r["train/tis_capped_frac"] == 0.0  # no token is off by a factor of 2
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("RLKIT_CACHE_DIR")
    os.environ["RLKIT_CACHE_DIR"] = str(path)  # the server and this process share the models
    yield path
    if old is None:
        os.environ.pop("RLKIT_CACHE_DIR", None)
    else:
        os.environ["RLKIT_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def server(cache, tmp_path_factory):
    """A vLLM server for rlkit-small at rank 8, as `python -m rlkit.serve` starts it."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "rlkit.serve", "model=rlkit_small", f"adapter.rank={RANK}"]
            + ["--", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=5).read()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("the vLLM server did not start:\n" + log.read_text()[-3000:])
            time.sleep(1)
    yield process, url
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def training_client(url, model=MODEL):
    import rlkit

    service = rlkit.ServiceClient(device="cpu", engine="vllm_server", engine_options={"url": url})
    return service.create_lora_training_client(model, rank=RANK, seed=0)


def one_step(trainer, prompt):
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(prompt[:-1]),
        loss_fn_inputs={"target_tokens": prompt[1:], "weights": [1.0] * (len(prompt) - 1)},
    )
    trainer.forward_backward([datum], "cross_entropy").result()
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()


def test_sync_probe_seeds_and_logprobs_over_http(server):
    _, url = server
    trainer = training_client(url)
    prompt = trainer.get_tokenizer().encode("pairs 1 2 3 4 ->", add_special_tokens=False)
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=11)
    previous = None
    for _ in range(3):
        one_step(trainer, prompt)
        sampler = trainer.save_weights_and_get_sampling_client()
        assert sampler.sync_metrics["sync/probe_mismatch"] < TOLERANCE
        first = sampler.sample(types.ModelInput.from_ints(prompt), 4, params).result()
        again = sampler.sample(types.ModelInput.from_ints(prompt), 4, params).result()
        tokens = [s.tokens for s in first.sequences]
        assert tokens == [s.tokens for s in again.sequences]  # the seed decides the tokens
        assert len(set(map(tuple, tokens))) > 1  # 4 different samples, not one repeated
        # The server's logprobs of its sampled tokens are the trainer's.
        seq = first.sequences[0]
        mine = trainer_logprobs(trainer, types, prompt, seq.tokens)
        assert max(abs(a - b) for a, b in zip(mine, seq.logprobs, strict=True)) < TOLERANCE
        assert tokens != previous  # the adapter changed, and the server serves the new one
        previous = tokens


def test_a_stale_adapter_is_caught_by_the_probe(server, monkeypatch):
    _, url = server
    trainer = training_client(url)
    prompt = trainer.get_tokenizer().encode("stale?", add_special_tokens=False)
    one_step(trainer, prompt)
    trainer.save_weights_and_get_sampling_client()  # the first adapter, loaded for real

    def keep_the_old_adapter(self, key, snapshot):  # fault injection: the server is not told
        self.loaded_key = key

    monkeypatch.setattr(VLLMServerEngine, "load", keep_the_old_adapter)
    one_step(trainer, prompt)
    with pytest.raises(StaleAdapterError, match="closer to the previous adapter"):
        trainer.save_weights_and_get_sampling_client()


def test_a_server_that_is_down_or_serves_another_model_is_named(server):
    _, url = server
    nothing = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerError, match=f"cannot reach the rollout server at {nothing}"):
        training_client(nothing).save_weights_and_get_sampling_client()
    with pytest.raises(ServerError) as wrong:
        training_client(url, model="rlkit-tiny").save_weights_and_get_sampling_client()
    message = str(wrong.value)
    assert url in message and "rlkit-small" in message and "'rlkit-tiny'" in message


RUN = [
    "recipe=pair_sum",
    "model=rlkit_small",
    f"adapter.rank={RANK}",
    "warmup.steps=0",
    "groups_per_step=2",
    "group_size=4",
    "max_tokens=12",
    "env.eval_size=4",
    "eval_every=100",
    "reward=[format,correct,concise]",
    "reward.concise.only_correct=false",
    "engine=vllm_server",
]


def test_a_run_on_the_server_then_the_server_dies_mid_run(server, tmp_path, cache):
    process, url = server
    run_dir = tmp_path / "dies"
    run = subprocess.Popen(  # forked from a warm interpreter (tests/e2e/warm.py)
        [warm.python(), "-m", "rlkit", *RUN, "steps=200", "checkpoint.every=1"]
        + [f"engine.url={url}", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_lines(run_dir / "metrics.jsonl", 2, run)  # its first 2 steps are logged
    os.killpg(process.pid, signal.SIGKILL)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1, err[-3000:]
    assert f"cannot reach the rollout server at {url}" in err, err[-3000:]
    assert "Traceback" not in err
    # Until then the steps trained and synced: the server's probe agreed with the trainer.
    rows = read_jsonl(run_dir / "metrics.jsonl")
    probes = [r["sync/probe_mismatch"] for r in rows if r.get("step", -1) >= 0 and "train/lr" in r]
    assert len(probes) >= 2 and max(probes) < TOLERANCE, rows
    # The last checkpoint is complete: it verifies.
    from rlkit.run.checkpoint import verify

    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert verify(run_dir / "checkpoints" / latest) is None
