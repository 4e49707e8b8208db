"""`python -m rlkit.service` driven by the official `tinker` SDK, unchanged: the service in a
subprocess, the SDK in this process (its env variables point it at the service)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import tinker
from tinker import types

from rlkit.backend.engines import vllm as vllm_engine
from tests.e2e import warm
from tests.e2e.runs import start_service as start
from tests.e2e.runs import trainer_logprobs

pytestmark = pytest.mark.slow
# Without vLLM its test skips, unless RLKIT_REQUIRE_VLLM=1 (`make test`): then it fails.
requires_vllm = pytest.mark.skipif(
    not vllm_engine.available() and os.environ.get("RLKIT_REQUIRE_VLLM") != "1",
    reason="vllm is not installed (pip install 'rlkit[cpu]')",
)


@pytest.fixture(scope="module")
def service_url(tmp_path_factory):
    proc, url = start(tmp_path_factory.mktemp("service"))
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def sdk(service_url, monkeypatch):
    monkeypatch.setenv("TINKER_BASE_URL", service_url)
    monkeypatch.setenv("TINKER_API_KEY", "tml-local")
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    client = tinker.ServiceClient()
    yield client
    client.close("success").result()


def foo_datum(tok) -> types.Datum:
    """The tutorial's first exercise: answer `foo`, the loss on the answer only."""
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi?"}], add_generation_prompt=True, return_dict=False
    )
    answer = tok.encode("foo", add_special_tokens=False) + [tok.eos_token_id]
    tokens = prompt + answer
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "weights": [0.0] * (len(prompt) - 1) + [1.0] * len(answer),
        },
    )


def test_the_sft_loop_learns_and_a_saved_state_reloads_to_the_same_logprobs(sdk):
    trainer = sdk.create_lora_training_client(base_model="rlkit-tiny", rank=16, seed=0).result()
    datum = foo_datum(trainer.get_tokenizer())
    losses = []
    for _ in range(20):
        fb = trainer.forward_backward([datum], "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=5e-3)).result()
        losses.append(fb.result().metrics["loss:sum"])
    assert losses[-1] < 0.2 * losses[0], losses

    before = trainer.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    path = trainer.save_state("after-sft").result().path
    assert path.startswith("tinker://") and path.endswith("/weights/after-sft")
    again = sdk.create_training_client_from_state(path).result()
    after = again.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    assert after.tolist() == before.tolist()

    sampler = trainer.save_weights_and_get_sampling_client().result()
    out = sampler.sample(
        datum.model_input, num_samples=3, sampling_params=types.SamplingParams(max_tokens=6)
    ).result()
    assert len(out.sequences) == 3
    assert all(len(s.logprobs) == len(s.tokens) > 0 for s in out.sequences)


def test_the_same_requests_give_the_same_bits_as_rlkit_in_process(sdk):
    """A client on the service gets what rlkit's own client gets, bit for bit."""
    import rlkit

    local = rlkit.ServiceClient(device="cpu", dtype="float32")
    mine = local.create_lora_training_client("rlkit-tiny", rank=8, seed=3)
    theirs = sdk.create_lora_training_client(base_model="rlkit-tiny", rank=8, seed=3).result()
    datum = foo_datum(mine.get_tokenizer())
    for client in (mine, theirs):
        client.forward_backward([datum], "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    a = mine.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    b = theirs.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    assert b.tolist() == a.tolist()


@pytest.mark.parametrize(
    "bad, message",
    [
        ("base_model", "no-such-model"),
        ("loss", "'stable_reinforce' (Tinker has not published its objective"),
        ("lengths", "target_tokens"),
        ("path", "no checkpoint at 'tinker://nope/weights/x'"),
        ("context", "exceeds the model's context of"),
        ("alt", "sample(prompt_alt_tokens_k=2) is not supported"),
    ],
)
def test_bad_input_is_one_line_the_sdk_shows(sdk, bad, message):
    with pytest.raises(tinker.RequestFailedError) as info:
        if bad == "base_model":
            sdk.create_lora_training_client(base_model="no-such-model", rank=8).result()
        trainer = sdk.create_lora_training_client(base_model="rlkit-tiny", rank=8).result()
        datum = types.Datum(
            model_input=types.ModelInput.from_ints([1, 2, 3]),
            loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
        )
        if bad == "loss":
            trainer.forward_backward([datum], "stable_reinforce").result()
        if bad == "lengths":
            short = types.Datum(
                model_input=types.ModelInput.from_ints([1, 2, 3]),
                loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, 1.0, 1.0]},
            )
            trainer.forward_backward([short], "cross_entropy").result()
        if bad == "path":
            sdk.create_training_client_from_state("tinker://nope/weights/x").result()
        if bad in ("context", "alt"):
            sampler = trainer.save_weights_and_get_sampling_client().result()
            prompt = types.ModelInput.from_ints([1, 2, 3])
            if bad == "context":
                params = types.SamplingParams(max_tokens=10**6)
                sampler.sample(prompt, 1, params).result()
            params = types.SamplingParams(max_tokens=2)
            sampler.sample(prompt, 1, params, prompt_alt_tokens_k=2).result()
    text = str(info.value)
    assert message in text and "Traceback" not in text and info.value.category == "user"


def test_another_host_needs_an_api_key_and_a_wrong_key_is_refused(tmp_path, monkeypatch):
    proc = warm.run(
        "rlkit.service", ["--host", "0.0.0.0", "--dir", tmp_path], tmp_path, timeout=120
    )
    assert proc.returncode == 1 and "--api-key" in proc.stderr.strip().splitlines()[-1]
    server, url = start(tmp_path, "--api-key", "tml-secret")
    try:
        monkeypatch.setenv("TINKER_BASE_URL", url)
        monkeypatch.setenv("TINKER_API_KEY", "tml-wrong")
        monkeypatch.setenv("TINKER_TELEMETRY", "0")
        with pytest.raises(tinker.AuthenticationError, match="wrong API key"):
            tinker.ServiceClient().create_lora_training_client(base_model="rlkit-tiny", rank=8)
    finally:
        server.terminate()
        server.wait(30)


def test_an_rl_loop_written_for_tinker_samples_and_trains(sdk):
    """The tutorial's RLVR shape on pair sums: sample groups, reward, advantages, then
    importance_sampling on the sampled tokens; the policy moves."""
    trainer = sdk.create_lora_training_client(base_model="rlkit-tiny", rank=8, seed=1).result()
    tok = trainer.get_tokenizer()
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"{a}+{b}="}],
            add_generation_prompt=True,
            return_dict=False,
        )
        for a, b in [(1, 2), (3, 4)]
    ]
    first = None
    for _ in range(3):
        sampler = trainer.save_weights_and_get_sampling_client().result()
        params = types.SamplingParams(max_tokens=6, temperature=1.0)
        futures = [sampler.sample(types.ModelInput.from_ints(p), 4, params) for p in prompts]
        datums = []
        for prompt, future in zip(prompts, futures, strict=True):
            sequences = future.result().sequences
            rewards = [float("3" in tok.decode(s.tokens)) + 0.1 * len(s.tokens) for s in sequences]
            mean = sum(rewards) / len(rewards)
            for seq, reward in zip(sequences, rewards, strict=True):
                tokens = prompt + seq.tokens
                n = len(prompt) - 1
                datums.append(
                    types.Datum(
                        model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={
                            "target_tokens": tokens[1:],
                            "logprobs": [0.0] * n + list(seq.logprobs),
                            "advantages": [0.0] * n + [reward - mean] * len(seq.tokens),
                        },
                    )
                )
        out = trainer.forward_backward(datums, "importance_sampling").result()
        trainer.optim_step(types.AdamParams(learning_rate=2e-2)).result()
        logprobs = out.loss_fn_outputs[0]["logprobs"].tolist()
        first = first or (datums[0], logprobs)
    again = trainer.forward([first[0]], "importance_sampling").result()
    assert again.loss_fn_outputs[0]["logprobs"].tolist() != first[1]  # the policy moved


# Five SFT steps on a client of `service` (the SDK's or rlkit's own), then its logprobs: run in
# each SDK process, and in this one on rlkit's client for what each gets alone.
FIVE_STEPS = """
from tinker import types
def five_steps(service, seed):
    trainer = service.create_lora_training_client(base_model="rlkit-tiny", rank=8, seed=seed)
    trainer = trainer.result() if hasattr(trainer, "result") else trainer
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7, 8]),
        loss_fn_inputs={"target_tokens": [6, 7, 8, 9], "weights": [1.0] * 4},
    )
    for _ in range(5):
        trainer.forward_backward([datum], "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=1e-2))
    out = trainer.forward([datum], "cross_entropy").result()
    return out.loss_fn_outputs[0]["logprobs"].tolist()
"""
TWO_CLIENTS = (
    FIVE_STEPS
    + """
import json, sys, tinker
print(json.dumps(five_steps(tinker.ServiceClient(), int(sys.argv[1]))))
"""
)


def test_two_sdk_processes_at_once_each_get_what_they_get_alone(service_url, tmp_path):
    import json

    import rlkit

    script = tmp_path / "client.py"
    script.write_text(TWO_CLIENTS)
    env = {
        **os.environ,
        "TINKER_BASE_URL": service_url,
        "TINKER_API_KEY": "tml-local",
        "TINKER_TELEMETRY": "0",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(seed)], env=env, stdout=subprocess.PIPE, text=True
        )
        for seed in (11, 12)
    ]
    results = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    steps: dict = {}
    exec(FIVE_STEPS, steps)
    for seed, got in zip((11, 12), results, strict=True):
        local = rlkit.ServiceClient(device="cpu", dtype="float32")
        assert got == steps["five_steps"](local, seed)  # what it gets alone
    assert results[0] != results[1]


def test_saved_weights_outlive_a_restart_and_unknown_futures_fail_in_one_line(
    tmp_path, monkeypatch
):
    import json

    monkeypatch.setenv("TINKER_API_KEY", "tml-local")
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [1.0] * 3},
    )
    server, url = start(tmp_path)
    try:
        monkeypatch.setenv("TINKER_BASE_URL", url)
        sdk = tinker.ServiceClient()
        trainer = sdk.create_lora_training_client(base_model="rlkit-tiny", rank=8, seed=5).result()
        trainer.forward_backward([datum], "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        path = trainer.save_state("kept").result().path
        before = trainer.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
        sdk.close("success").result()  # no heartbeats left calling a killed service
    finally:
        server.kill()
        server.wait(30)
    server, url = start(tmp_path)  # the same --dir
    try:
        monkeypatch.setenv("TINKER_BASE_URL", url)
        sdk = tinker.ServiceClient()
        again = sdk.create_training_client_from_state(path).result()
        after = again.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
        assert after.tolist() == before.tolist()
        request = urllib.request.Request(
            f"{url}/api/v1/retrieve_future",
            data=json.dumps({"request_id": "req-from-before"}).encode(),
            headers={"X-API-Key": "tml-local", "Content-Type": "application/json"},
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        assert "unknown to this service" in answer["error"] and "\n" not in answer["error"]
        sdk.close("success").result()
    finally:
        server.terminate()
        server.wait(30)


def test_async_calls(sdk):
    import asyncio

    async def run():
        trainer = await sdk.create_lora_training_client(base_model="rlkit-tiny", rank=8)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints([5, 6, 7]),
            loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [1.0] * 3},
        )
        fb = trainer.forward_backward([datum], "cross_entropy")  # futures that can be awaited
        step = trainer.optim_step(types.AdamParams(learning_rate=1e-2))
        loss = (await fb).metrics["loss:sum"]
        await step
        sampler = await trainer.save_weights_and_get_sampling_client()
        out = await sampler.sample(datum.model_input, 2, types.SamplingParams(max_tokens=3))
        return loss, out

    loss, out = asyncio.run(run())
    assert loss > 0 and len(out.sequences) == 2


def post(url, path, body) -> tuple[int, dict]:
    import json
    import urllib.error

    request = urllib.request.Request(
        f"{url}{path}",
        data=json.dumps(body).encode(),
        headers={"X-API-Key": "tml-local", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def health(url) -> dict:
    import json

    return json.loads(urllib.request.urlopen(f"{url}/api/v1/healthz", timeout=30).read())


def test_a_session_that_ends_gives_its_memory_back(tmp_path, monkeypatch):
    """Closed by its client, or silent past --session-timeout: a session's training clients
    and samplers are released, and the base model's weights once no session is on it; its
    saved checkpoints stay, and its models answer one line saying why they are gone."""
    import time

    # The timeout must outlast creating the model (the session has no heartbeat meanwhile):
    # 3 s did not, once, with two test processes and a training run on 2 cores.
    server, url = start(tmp_path, "--session-timeout", "10")
    try:
        # A client that never sends a heartbeat (the SDK sends one every 10 s): raw HTTP.
        session = post(url, "/api/v1/create_session", {})[1]["session_id"]
        future = post(
            url,
            "/api/v1/create_model",
            {"session_id": session, "model_seq_id": 0, "base_model": "rlkit-tiny"},
        )[1]
        model_id = post(url, "/api/v1/retrieve_future", future)[1]["model_id"]
        assert health(url)["base_models"] == ["rlkit-tiny"]
        deadline = time.monotonic() + 60
        while health(url)["training_clients"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert health(url) == {
            "status": "ok",
            "sessions": 0,
            "training_clients": 0,
            "samplers": 0,
            "base_models": [],
        }
        status, answer = post(url, "/api/v1/get_info", {"model_id": model_id})
        assert status == 400
        assert answer["detail"] == (
            f"model_id {model_id!r} is gone: its session ended (no heartbeat for 10 s)"
        )
        assert post(url, "/api/v1/session_heartbeat", {"session_id": session})[0] == 410

        # The SDK's close: released at once; the checkpoint it saved still loads.
        monkeypatch.setenv("TINKER_BASE_URL", url)
        monkeypatch.setenv("TINKER_API_KEY", "tml-local")
        monkeypatch.setenv("TINKER_TELEMETRY", "0")
        sdk = tinker.ServiceClient()
        trainer = sdk.create_lora_training_client(base_model="rlkit-tiny", rank=8).result()
        sampler = trainer.save_weights_and_get_sampling_client().result()
        sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2))
        path = trainer.save_state("kept").result().path
        assert health(url)["training_clients"] == 1
        sdk.close("success").result()
        assert health(url)["base_models"] == []
        sdk = tinker.ServiceClient()
        sdk.create_training_client_from_state(path).result()
        assert health(url)["base_models"] == ["rlkit-tiny"]
        sdk.close("success").result()
    finally:
        server.terminate()
        server.wait(30)


@requires_vllm
def test_the_vllm_engine_serves_behind_the_service(tmp_path, monkeypatch):
    """`python -m rlkit.service engine=vllm`: two clients' LoRAs on one vLLM engine, each
    sampler serving its own trainer's policy; closing the session gives it all back."""
    server, url = start(tmp_path, "engine=vllm")
    try:
        monkeypatch.setenv("TINKER_BASE_URL", url)
        monkeypatch.setenv("TINKER_API_KEY", "tml-local")
        monkeypatch.setenv("TINKER_TELEMETRY", "0")
        sdk = tinker.ServiceClient()
        prompt = [5, 6, 7, 8]
        for seed in (1, 2):
            trainer = sdk.create_lora_training_client(
                base_model="rlkit-small", rank=8, seed=seed
            ).result()
            datum = types.Datum(
                model_input=types.ModelInput.from_ints(prompt + [9, 10]),
                loss_fn_inputs={"target_tokens": [6, 7, 8, 9, 10, 11], "weights": [1.0] * 6},
            )
            trainer.forward_backward([datum], "cross_entropy")
            trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            sampler = trainer.save_weights_and_get_sampling_client().result()
            params = types.SamplingParams(max_tokens=6, seed=seed)
            seq = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result()
            seq = seq.sequences[0]
            trained = trainer_logprobs(trainer, types, prompt, seq.tokens)
            assert max(abs(a - b) for a, b in zip(seq.logprobs, trained, strict=True)) < 1e-3
        assert health(url)["training_clients"] == 2
        sdk.close("success").result()
        assert health(url)["base_models"] == []
    finally:
        server.terminate()
        server.wait(60)


def test_the_sdks_custom_loss_trains_as_the_builtin_one(sdk):
    """`create_custom_loss` + `forward_backward_custom` (the loss computed in the SDK's process
    from the service's logprobs, its gradient sent back): a custom negative log-likelihood moves
    the adapter as `cross_entropy` does."""

    def neg_ll(logprobs, weights):
        loss = -(logprobs * weights).sum()
        return loss, {"custom/neg_ll:sum": loss}

    handle = sdk.create_custom_loss(neg_ll, input_ranks={"logprobs": 1, "weights": 1}).result()
    builtin, custom = (
        sdk.create_lora_training_client(base_model="rlkit-tiny", rank=8, seed=4).result()
        for _ in range(2)
    )
    datum = foo_datum(builtin.get_tokenizer())
    a = builtin.forward_backward([datum], "cross_entropy").result()
    b = custom.forward_backward_custom([datum], handle).result()
    assert b.metrics["custom/neg_ll:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-5)
    for client in (builtin, custom):
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = [
        c.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
        for c in (builtin, custom)
    ]
    assert after[0] == pytest.approx(after[1], abs=1e-4)
    assert after[0] != pytest.approx(
        a.loss_fn_outputs[0]["logprobs"].tolist(), abs=1e-3
    )  # and it moved


def test_top_k_logprobs_reach_the_sdk(sdk):
    """`topk_sample_logprobs` / `topk_prompt_logprobs` through the wire: what rlkit's own
    client returns for the same request (its SDK form: lists of (token, logprob) pairs)."""
    import rlkit

    local = rlkit.ServiceClient(device="cpu", dtype="float32")
    mine = local.create_lora_training_client("rlkit-tiny", rank=8, seed=6)
    theirs = sdk.create_lora_training_client(base_model="rlkit-tiny", rank=8, seed=6).result()
    prompt = types.ModelInput.from_ints([5, 6, 7, 8])
    params = types.SamplingParams(max_tokens=5, seed=3)
    out = []
    for client in (mine, theirs):
        sampler = client.save_weights_and_get_sampling_client()
        sampler = sampler.result() if hasattr(sampler, "result") else sampler
        response = sampler.sample(
            prompt, 2, params, topk_sample_logprobs=3, topk_prompt_logprobs=4
        ).result()
        out.append(response)
    a, b = out
    assert b.topk_prompt_logprobs[0] is None and len(b.topk_prompt_logprobs) == 4
    for x, y in zip(a.topk_prompt_logprobs[1:], b.topk_prompt_logprobs[1:], strict=True):
        assert [t for t, _ in x] == [t for t, _ in y] and len(y) == 4
        assert [v for _, v in y] == pytest.approx([v for _, v in x], abs=1e-6)
    for x, y in zip(a.sequences, b.sequences, strict=True):
        assert list(y.tokens) == x.tokens and len(y.topk_logprobs) == len(x.tokens)
        for p, q in zip(x.topk_logprobs, y.topk_logprobs, strict=True):
            assert [t for t, _ in q] == [t for t, _ in p] and len(q) == 3


def test_the_same_requests_give_the_same_bits_on_a_restarted_service(tmp_path, monkeypatch):
    """Seeds come from the requests or from the order of the calls: a new service run answers
    the same sequence of requests, unseeded sampling included, with the same bits."""
    monkeypatch.setenv("TINKER_API_KEY", "tml-local")
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    runs = []
    for run in range(2):
        server, url = start(tmp_path / str(run))
        try:
            monkeypatch.setenv("TINKER_BASE_URL", url)
            sdk = tinker.ServiceClient()
            trainer = sdk.create_lora_training_client(base_model="rlkit-tiny", rank=8).result()
            datum = foo_datum(trainer.get_tokenizer())
            trainer.forward_backward([datum], "cross_entropy")
            trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            sampler = trainer.save_weights_and_get_sampling_client().result()
            out = sampler.sample(datum.model_input, 3, types.SamplingParams(max_tokens=6)).result()
            lp = trainer.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
            runs.append(([(list(s.tokens), list(s.logprobs)) for s in out.sequences], lp.tolist()))
            sdk.close("success").result()
        finally:
            server.terminate()
            server.wait(30)
    assert runs[0] == runs[1]


def test_soft_targets_reach_the_sdk_in_their_shape(sdk):
    """(N, K) target_tokens and weights through the wire (a distillation datum): the SDK gets
    (N, K) logprobs, and a hard datum beside it its (N,) ones."""
    trainer = sdk.create_lora_training_client(base_model="rlkit-tiny", rank=8).result()
    soft = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array([[6, 9], [7, 9], [8, 9]])),
            "weights": types.TensorData.from_numpy(np.full((3, 2), 0.5, np.float32)),
        },
    )
    hard = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [1.0, 1.0, 1.0]},
    )
    out = trainer.forward_backward([hard, soft, hard], "cross_entropy").result()
    shapes = [o["logprobs"].shape for o in out.loss_fn_outputs]
    assert shapes == [[3], [3, 2], [3]]
    both = out.loss_fn_outputs[1]["logprobs"].to_numpy()
    assert both[:, 0].tolist() == pytest.approx(out.loss_fn_outputs[0]["logprobs"].tolist())
