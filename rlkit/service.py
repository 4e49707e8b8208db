"""`python -m rlkit.service`: rlkit as a local Tinker service, for the official `tinker` SDK.

    python -m rlkit.service [--host 127.0.0.1] [--port 8000] [--dir DIR] [--api-key KEY]
                            [--session-timeout 120] [key=value ...]
    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-local python your_tinker_code.py

Code written with `import tinker` (the SDK, tinker-cookbook, your own) runs unchanged against
it: the SDK's REST calls are answered by rlkit's own clients (`rlkit.client`), so the learner,
engines, adapters and chat templates are the ones `python -m rlkit` trains with. The wire format
is the SDK's own: its pydantic types for the JSON bodies, its protobuf module for
`forward_backward` and for the results of forward/backward and sampling.

- The key=value overrides are the run config's machine keys: `model.device`, `model.dtype`,
  `engine=hf|vllm|vllm_server` (and `engine.*`), `model.share_prefix`; the base model is
  whatever the SDK asks for (a built-in, `smollm2-135m-instruct`, a local directory, a hub id).
- Every SDK session's training clients share the base models they name: one copy of the base
  weights for all clients on it, an adapter each; each client gets the bits it would alone.
- Calls return futures at once; `retrieve_future` holds the poll until the result is ready
  (or answers "try again" after POLL_S, which the SDK retries at once).
- Saved weights live under `DIR/checkpoints`, named by their `tinker://` paths in
  `DIR/checkpoints.json`: they stay loadable after a restart. Session numbers carry on
  across restarts, so paths never collide. A future the service did not finish before a
  restart fails with an error the SDK shows.
- A session ends when its client closes it (`ServiceClient.close`) or sends no heartbeat for
  `--session-timeout` seconds: its training clients and samplers are released (adapters,
  optimizer states, engines; a base model's weights once no session uses it). Its saved
  checkpoints stay; a later call on its models fails in one line saying why.
- Safe by default: it binds 127.0.0.1 and accepts any `tml-` key there; another host needs
  `--api-key` and refuses requests without it.
- What rlkit does not do (images, another optimizer, the `stable_reinforce` loss, ...) fails
  with one line the SDK shows, naming it; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import math
import os
import secrets
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from rlkit import client as rlkit_client
from rlkit.api import types
from rlkit.api.errors import RlkitError

# A poll waits this long for its result before the SDK is told to try again (its read timeout
# is 45 s).
POLL_S = 20.0
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROTO = "application/x-protobuf"


def one_line(exc: BaseException) -> str:
    """An exception as the one line the SDK shows its user."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = str(text).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def failure(exc: BaseException) -> dict:
    """A future's result for a failed request: the SDK raises RequestFailedError with it.
    The caller's mistakes (rlkit's checks) are category `user`, anything else `server`."""
    user = isinstance(exc, RlkitError | ValueError | TypeError | NotImplementedError | KeyError)
    return {"error": one_line(exc), "category": "user" if user else "server"}


# ---- the wire: protobuf <-> rlkit types ------------------------------------------------------
def _pb():
    from tinker.proto import tinker_public_pb2

    return tinker_public_pb2


def _array(tensor) -> np.ndarray:
    """A `tinker_public.Tensor` (dense or sparse CSR) as a numpy array."""
    pb = _pb()
    dtypes = {pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_INT64: "<i8", pb.DTYPE_INT32: "<i4"}
    shape = list(tensor.shape)

    def decode(data: bytes) -> np.ndarray:
        if tensor.dtype == pb.DTYPE_BFLOAT16:
            bits = np.frombuffer(data, "<u2").astype(np.uint32) << 16
            return bits.view(np.float32)
        if tensor.dtype not in dtypes:
            raise ValueError(f"tensor dtype {pb.DType.Name(tensor.dtype)} is not supported")
        return np.frombuffer(data, dtypes[tensor.dtype])

    if tensor.WhichOneof("encoding") == "sparse_csr":
        csr = tensor.sparse_csr
        values = decode(csr.values)
        rows = np.frombuffer(csr.crow_indices, "<i8")
        cols = np.frombuffer(csr.col_indices, "<i8")
        if len(shape) != 2 or len(rows) != shape[0] + 1:
            raise ValueError(f"a sparse tensor of shape {shape} is not a 2-D CSR matrix")
        dense = np.zeros(shape, values.dtype)
        for r in range(shape[0]):
            dense[r, cols[rows[r] : rows[r + 1]]] = values[rows[r] : rows[r + 1]]
        return dense
    flat = decode(tensor.dense)
    if math.prod(shape) != flat.size:
        raise ValueError(f"a tensor of shape {shape} holds {flat.size} values")
    return flat.reshape(shape)


def datums_from_proto(request) -> list[types.Datum]:
    """A `ForwardBackwardRequest`'s datums as rlkit's."""
    out = []
    for i, datum in enumerate(request.data):
        tokens: list[int] = []
        for chunk in datum.model_input:
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise ValueError(
                    f"datum {i}: model_input chunks of type {kind!r} are not supported "
                    "(rlkit serves text models: encoded_text chunks only)"
                )
            tokens += np.frombuffer(chunk.encoded_text.tokens, "<i4").tolist()
        inputs = {}
        for name, tensor in datum.loss_fn_inputs.items():
            try:
                inputs[name] = types.TensorData.from_numpy(_array(tensor))
            except ValueError as exc:
                raise ValueError(f"datum {i}: loss_fn_inputs[{name!r}]: {exc}") from None
        out.append(types.Datum(types.ModelInput.from_ints(tokens), inputs))
    return out


def loss_config_from_proto(request) -> dict | None:
    """`loss_fn_config` (the v2 map keeps strings too; the SDK fills both)."""
    config: dict[str, Any] = {}
    for key, value in request.loss_fn_config_v2.items():
        config[key] = getattr(value, value.WhichOneof("value"))
    for key, value in request.loss_fn_config.items():
        config.setdefault(key, value)
    return config or None


def forward_to_proto(output: types.ForwardBackwardOutput) -> bytes:
    """rlkit's forward(-backward) output as a `ForwardBackwardOutput` message: the datums'
    tensors (float32, byte offsets per datum) in records of consecutive datums whose tensors
    have the same trailing shape (one record, unless some datums had (N, K) targets), and the
    metrics."""
    pb = _pb()
    message = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    arrays = [
        {k: np.asarray(v.to_numpy(), "<f4") for k, v in o.items()} for o in output.loss_fn_outputs
    ]

    def trailing(datum: dict) -> tuple:
        return tuple((k, a.shape[1:]) for k, a in sorted(datum.items()))

    for _, run in itertools.groupby(arrays, key=trailing):
        run = list(run)
        record = message.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(run))
        for key in run[0]:
            flat = [d[key].reshape(-1) for d in run]
            batched = record.fields[key]
            batched.dtype = pb.DTYPE_FLOAT32
            batched.trailing_shape.extend(run[0][key].shape[1:])
            batched.data = b"".join(a.tobytes() for a in flat)
            batched.offsets = np.cumsum([0, *(a.nbytes for a in flat)]).astype("<i8").tobytes()
    if not arrays:
        message.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=0)
    for key, value in output.metrics.items():
        message.metrics[key] = float(value)
    return message.SerializeToString()


def sample_to_proto(response: types.SampleResponse) -> bytes:
    pb = _pb()
    message = pb.SampleResponse()
    for seq in response.sequences:
        reason = pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        out = message.sequences.add(stop_reason=reason)
        out.tokens = np.asarray(seq.tokens, "<i4").tobytes()
        if seq.logprobs is not None:
            out.logprobs = np.asarray(seq.logprobs, "<f4").tobytes()
        if seq.topk_logprobs is not None:
            _topk_to_proto(seq.topk_logprobs, out.topk_sampled_logprobs)
    if response.prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in response.prompt_logprobs]
        message.prompt_logprobs = np.asarray(values, "<f4").tobytes()
    if response.topk_prompt_logprobs is not None:
        _topk_to_proto(response.topk_prompt_logprobs, message.topk_prompt_logprobs)
    return message.SerializeToString()


def _topk_to_proto(positions: list, out) -> None:
    """Per-position top-k lists into a `TopkLogprobs` message: (length, k) matrices of ids and
    logprobs, a position without any (None, e.g. the prompt's first) and the slots past a short
    list filled with the SDK's sentinel (token 0, MASK_LOGPROB)."""
    from tinker.types.topk_logprobs import MASK_LOGPROB

    k = max((len(p) for p in positions if p), default=0)
    ids = np.zeros((len(positions), k), "<i4")
    logprobs = np.full((len(positions), k), MASK_LOGPROB, "<f4")
    for i, top in enumerate(positions):
        for j, (token, logprob) in enumerate(top or ()):
            ids[i, j], logprobs[i, j] = token, logprob
    out.length, out.k = len(positions), k
    out.token_ids, out.logprobs = ids.tobytes(), logprobs.tobytes()


# ---- the state behind the endpoints ----------------------------------------------------------
class Checkpoints:
    """`tinker://MODEL/KIND/NAME` -> the local directory rlkit saved, kept in a JSON file that
    survives restarts."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.lock = threading.Lock()
        self.entries: dict[str, dict] = json.loads(file.read_text()) if file.exists() else {}

    def add(self, model_id: str, kind: str, name: str, local: str) -> str:
        path = f"tinker://{model_id}/{kind}/{name}"
        with self.lock:
            self.entries[path] = {"local": local, "time": datetime.now(UTC).isoformat()}
            staging = self.file.with_suffix(".tmp")
            staging.write_text(json.dumps(self.entries, indent=1))
            os.replace(staging, self.file)
        return path

    def local(self, path: str) -> str:
        """The directory behind a `tinker://` path; a one-line error naming it if there is none."""
        entry = self.entries.get(path)
        if entry is None:
            raise ValueError(f"no checkpoint at {path!r} on this service")
        return entry["local"]

    def of(self, model_id: str) -> list[dict]:
        out = []
        for path, entry in sorted(self.entries.items()):
            owner, kind, name = path.removeprefix("tinker://").split("/")
            if owner == model_id:
                out.append(
                    {
                        "checkpoint_id": f"{kind}/{name}",
                        "checkpoint_type": "training" if kind == "weights" else "sampler",
                        "time": entry["time"],
                        "tinker_path": path,
                    }
                )
        return out


class Service:
    """Sessions, models, samplers and futures, over one rlkit ServiceClient (so every client
    shares the base models it names)."""

    def __init__(
        self,
        root: Path,
        client_args: dict,
        sample_window_s: float = 0.02,
        session_timeout_s: float = 120.0,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.client = rlkit_client.ServiceClient(checkpoint_dir=root / "checkpoints", **client_args)
        self.checkpoints = Checkpoints(root / "checkpoints.json")
        self.models: dict[str, rlkit_client.TrainingClient] = {}
        # sampling session id -> its sampler and the tinker:// path it serves (None: no file)
        self.samplers: dict[str, tuple[rlkit_client.SamplingClient, str | None]] = {}
        self.futures: dict[str, concurrent.futures.Future] = {}
        self.boot = secrets.token_hex(4)  # request ids of an earlier run never match
        self.requests = itertools.count(1)
        self.lock = threading.Lock()
        self.pool = concurrent.futures.ThreadPoolExecutor(64, thread_name_prefix="rlkit-service")
        self.model_thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="rlkit-model"
        )
        self.sample_window_s = sample_window_s
        self.last_sample = 0.0
        # Sessions: when each last showed it is alive, and why an ended one ended.
        self.session_timeout_s = session_timeout_s
        self.alive: dict[str, float] = {}
        self.ended: dict[str, str] = {}
        threading.Thread(target=self._reap, name="rlkit-sessions", daemon=True).start()

    def new_session(self) -> str:
        counter = self.root / "sessions"
        with self.lock:
            n = int(counter.read_text()) + 1 if counter.exists() else 1
            counter.write_text(str(n))
            self.alive[f"session-{n}"] = time.monotonic()
        return f"session-{n}"

    def heartbeat(self, session_id: str) -> bool:
        """Note that a session is alive (one from before a restart too: its client goes on
        here); False if it has ended."""
        with self.lock:
            if session_id in self.ended:
                return False
            self.alive[session_id] = time.monotonic()
            return True

    def end_session(self, session_id: str, why: str) -> None:
        """Release what a session holds: its training clients' adapters and optimizer
        states, its samplers, and a base model's weights once no session uses it. Its saved
        checkpoints stay. Runs after the calls already queued for the model thread."""
        with self.lock:
            if self.alive.pop(session_id, None) is None:
                return
            self.ended[session_id] = why
        prefix = f"{session_id}:"
        models = [m for m in list(self.models) if m.startswith(prefix)]
        samplers = [m for m in list(self.samplers) if m.startswith(prefix)]

        def release():
            for model_id in models:
                self.models.pop(model_id).close()
            for sampler_id in samplers:
                self.samplers.pop(sampler_id)[0].close()

        self.on_model(release)
        print(
            f"{session_id} ended ({why}): released {len(models)} training client(s) and "
            f"{len(samplers)} sampler(s)",
            flush=True,
        )

    def _reap(self) -> None:
        """End the sessions whose heartbeats stopped (the SDK sends one every 10 s)."""
        while True:
            time.sleep(min(5.0, self.session_timeout_s / 4))
            now = time.monotonic()
            with self.lock:
                late = [s for s, t in self.alive.items() if now - t > self.session_timeout_s]
            for session_id in late:
                self.end_session(session_id, f"no heartbeat for {self.session_timeout_s:g} s")

    def keep(self, table: dict, name: str, client) -> None:
        """`table[name] = client` (a training client, or a sampler and its path), unless its
        session has ended meanwhile: then it is closed."""
        with self.lock:
            session = name.split(":")[0]
            if session not in self.ended:
                table[name] = client
                self.alive.setdefault(session, time.monotonic())  # e.g. from before a restart
                return
        closing = (client[0] if isinstance(client, tuple) else client).close
        closing() if self.on_model_thread() else self.on_model(closing)
        raise self._gone("session", session)

    def on_model_thread(self) -> bool:
        return threading.current_thread().name.startswith("rlkit-model")

    def _gone(self, what: str, name: str) -> ValueError:
        session = name.split(":")[0]
        if session in self.ended:
            return ValueError(f"{what} {name!r} is gone: its session ended ({self.ended[session]})")
        return ValueError(f"unknown {what} {name!r} (not created on this service run)")

    def submit(self, work, *args) -> dict:
        """Run `work(*args)` (its value: a JSON-ready dict or protobuf bytes) in a thread, as a
        future the SDK polls; an exception becomes the failure the SDK shows. Calls into a
        training client are made before this, in the order the requests came (`after`): the
        thread only waits for them."""
        request_id = f"req-{self.boot}-{next(self.requests)}"

        def run():
            try:
                return work(*args)
            except Exception as exc:  # handed to the SDK as one line
                return failure(exc)

        self.futures[request_id] = self.pool.submit(run)
        return {"request_id": request_id}

    def after(self, call, convert=lambda x: x, first=None) -> dict:
        """A future for `call()`, an rlkit call queued now on the model thread (so a model's
        calls keep the order of the requests), its result converted by `convert` once it is
        ready (`first()`, if given, runs before the result is asked for)."""
        queued = self.model_thread.submit(call)

        def result():
            future = queued.result()  # a refusal raises here, as one line
            if first is not None:
                first()
            return convert(self.on_model(future.result))

        return self.submit(result)

    def on_model(self, fn, *args):
        """`fn(*args)` on the model thread, waited for (from any other thread). All of rlkit's
        work runs in that one thread: measured at pair_sum's shapes, training in the event loop
        and sampling in the request threads made each phase 1.45x slower (several threads'
        OpenMP workers spinning on the same 2 cores)."""
        return self.model_thread.submit(fn, *args).result()

    def burst_over(self) -> None:
        """Wait until no sampling request has come for `sample_window_s`: rlkit serves the
        requests queued when a result is first asked for as one batch, and the SDK sends a
        step's requests at once (measured at pair_sum's shapes: 16 requests one at a time took
        1.9x the in-process step). The SDK's 16 requests arrive over 8-24 ms on 2 busy cores:
        with a 5 ms window 2 steps in 7 were split into two batches (+100 ms each), and the
        HTTP path cost 7-9% of the step; with 20 ms, -2% to +4% (scripts/bench_service.py)."""
        while (idle := time.monotonic() - self.last_sample) < self.sample_window_s:
            time.sleep(self.sample_window_s - idle)

    def model(self, model_id: str) -> rlkit_client.TrainingClient:
        if model_id not in self.models:
            raise self._gone("model_id", model_id)
        return self.models[model_id]

    def sampler(self, sampler_id: str) -> tuple[rlkit_client.SamplingClient, str | None]:
        if sampler_id not in self.samplers:
            raise self._gone("sampling session", sampler_id)
        return self.samplers[sampler_id]


def _create_model(service: Service, body: dict) -> dict:
    lora = body.get("lora_config") or {}
    optimizer = (body.get("optimizer_config") or {}).get("type", "adamw")
    if optimizer != "adamw":
        raise NotImplementedError(f"optimizer {optimizer!r} is not supported (rlkit: adamw)")
    trainer = service.client.create_lora_training_client(
        body["base_model"],
        rank=lora.get("rank", 32),
        seed=lora.get("seed") or 0,
        train_attn=lora.get("train_attn", True),
        train_mlp=lora.get("train_mlp", True),
        train_unembed=lora.get("train_unembed", True),
    )
    model_id = f"{body['session_id']}:train:{body['model_seq_id']}"
    service.keep(service.models, model_id, trainer)
    return {"model_id": model_id, "type": "create_model"}


def _saved(service: Service, model_id: str, kind: str, name: str, out) -> dict:
    """The `tinker://` path of weights rlkit saved (`out.path`), recorded in the index."""
    tinker_path = service.checkpoints.add(model_id, kind, name, out.path)
    return {
        "path": tinker_path,
        "type": "save_weights" if kind == "weights" else "save_weights_for_sampler",
    }


def build_app(service: Service, api_key: str | None = None):
    """The FastAPI application: the endpoints SDK 0.38 calls."""
    app = FastAPI(title="rlkit Tinker service")

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        key = request.headers.get("x-api-key", "")
        if request.url.path != "/api/v1/healthz":
            if api_key is not None and key != api_key:
                why = "no X-API-Key" if not key else "a wrong API key"
                return JSONResponse({"detail": f"this service needs its --api-key: {why}"}, 401)
            if api_key is None and not key.startswith("tml-"):
                return JSONResponse({"detail": "the API key must start with 'tml-'"}, 401)
        return await call_next(request)

    _session_routes(app, service)
    _training_routes(app, service)
    _weights_routes(app, service)
    _sampling_routes(app, service)
    _future_routes(app, service)
    return app


async def json_body(request: Request) -> dict:
    body = await request.body()
    return json.loads(body) if body else {}


def answer(work, *args):
    """Run a direct (non-future) call; its error is a 400 with one line."""
    try:
        return work(*args)
    except Exception as exc:
        return JSONResponse({"detail": one_line(exc)}, 400)


def _session_routes(app: FastAPI, service: Service) -> None:
    """Start-up, sessions, heartbeats, telemetry, health."""

    @app.post("/api/v1/client/config")
    async def client_config():
        # Chunks of one forward_backward arrive in order; no pyqwest, no JWT.
        return {"pjwt_auth_enabled": False, "parallel_fwdbwd_chunks": False}

    @app.post("/api/v1/client/dynamic_config")
    async def dynamic_config():
        return {}

    @app.post("/api/v1/create_session")
    async def create_session():
        return {"session_id": service.new_session(), "type": "create_session"}

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(request: Request):
        session_id = (await json_body(request)).get("session_id", "")
        if not service.heartbeat(session_id):  # 410: the SDK stops its heartbeats
            return JSONResponse({"detail": f"session {session_id!r} has ended"}, 410)
        return {"type": "session_heartbeat"}

    @app.post("/api/v1/telemetry")
    async def telemetry():
        return {"status": "accepted"}

    @app.post("/api/v1/sessions/{session_id}/finish")
    async def finish(session_id: str, request: Request):
        reason = ((await json_body(request)).get("reason") or {}).get("type", "finished")
        await asyncio.to_thread(service.end_session, session_id, f"closed by its client: {reason}")
        return {}

    @app.get("/api/v1/healthz")
    async def healthz():  # and what the service holds now
        return {
            "status": "ok",
            "sessions": len(service.alive),
            "training_clients": len(service.models),
            "samplers": len(service.samplers),
            "base_models": service.client.loaded_base_models(),
        }

    @app.get("/api/v1/get_server_capabilities")
    async def capabilities():
        return service.client.get_server_capabilities()


def _training_routes(app: FastAPI, service: Service) -> None:
    """Training clients: create, get_info, forward(-backward), optim_step."""

    @app.post("/api/v1/create_model")
    async def create_model(request: Request):  # loads the base (once): in a thread
        body = await json_body(request)
        return service.submit(service.on_model, _create_model, service, body)

    @app.post("/api/v1/get_info")
    async def get_info(request: Request):
        body = await json_body(request)

        def info():
            trainer = service.model(body["model_id"])
            mine = trainer.get_info()
            name = mine.base_model
            tokenizer = rlkit_client.resolve_model(name)  # a local directory: no hub
            data = {"model_name": name, "tokenizer_id": tokenizer, "arch": "rlkit"}
            return {
                "type": "get_info",
                "model_id": body["model_id"],
                "model_data": data,
                "is_lora": True,
                "lora_rank": mine.lora_rank,
                "model_name": name,
            }

        return await asyncio.to_thread(answer, service.on_model, info)

    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request):
        message = _pb().ForwardBackwardRequest()
        message.ParseFromString(await request.body())

        def call():
            trainer = service.model(message.model_id)
            datums = datums_from_proto(message)
            config = loss_config_from_proto(message)
            run = trainer.forward if message.forward_only else trainer.forward_backward
            return run(datums, message.loss_fn, config)

        return service.after(call, forward_to_proto)

    @app.post("/api/v1/optim_step")
    async def optim_step(request: Request):
        body = await json_body(request)

        def call():
            if body.get("optimizer_params") is not None:
                kind = body["optimizer_params"].get("type")
                raise NotImplementedError(f"optimizer {kind!r} is not supported (rlkit: adam)")
            return service.model(body["model_id"]).optim_step(
                types.AdamParams(**body["adam_params"])
            )

        return service.after(
            call, lambda out: {"metrics": {f"{k}:mean": v for k, v in out.metrics.items()}}
        )


def _weights_routes(app: FastAPI, service: Service) -> None:
    """Saved weights: save_state, save_weights_for_sampler, load_weights, their listing."""

    @app.post("/api/v1/save_weights")
    async def save_weights(request: Request):
        body = await json_body(request)
        model_id, name = body["model_id"], body.get("path") or f"state-{body.get('seq_id')}"

        return service.after(
            lambda: service.model(model_id).save_state(name),
            lambda out: _saved(service, model_id, "weights", name, out),
        )

    @app.post("/api/v1/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request):
        body = await json_body(request)
        model_id = body["model_id"]

        if body.get("path"):
            name = body["path"]
            return service.after(
                lambda: service.model(model_id).save_weights_for_sampler(name),
                lambda out: _saved(service, model_id, "sampler_weights", name, out),
            )
        session = model_id.split(":train:")[0]
        sampler_id = f"{session}:sample:{body.get('sampling_session_seq_id', 0)}"

        def run():  # blocks until the weights are taken: the SDK waits for it before going on
            make = service.model(model_id).save_weights_and_get_sampling_client
            service.keep(service.samplers, sampler_id, (service.on_model(make), None))
            return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

        return service.submit(run)

    @app.post("/api/v1/load_weights")
    async def load_weights(request: Request):
        body = await json_body(request)

        with_optimizer = bool(body.get("optimizer"))
        if "model_id" in body:  # into an existing model, in its order of calls
            model_id = body["model_id"]
            return service.after(
                lambda: service.model(model_id).load_state(
                    service.checkpoints.local(body["path"]), with_optimizer
                ),
                lambda _: {"path": body["path"], "model_id": model_id, "type": "load_weights"},
            )
        model_id = f"{body['session_id']}:train:{body['model_seq_id']}"  # the id the SDK assumes

        def run():  # a new model from the state
            local = service.checkpoints.local(body["path"])
            trainer = service.on_model(
                lambda: service.client.create_training_client_from_state(
                    local, body.get("base_model"), with_optimizer=with_optimizer
                )
            )
            service.keep(service.models, model_id, trainer)
            return {"path": body["path"], "model_id": model_id, "type": "load_weights"}

        return service.submit(run)

    @app.get("/api/v1/training_runs/{model_id}/checkpoints")
    async def list_checkpoints(model_id: str):
        return {"checkpoints": service.checkpoints.of(model_id), "cursor": None}


def _sampling_routes(app: FastAPI, service: Service) -> None:
    """Sampling sessions and sampling."""

    @app.post("/api/v1/create_sampling_session")
    async def create_sampling_session(request: Request):
        body = await json_body(request)
        sampler_id = f"{body['session_id']}:sample:{body.get('sampling_session_seq_id', 0)}"

        def make():
            path = body.get("model_path")
            if path:
                local = service.checkpoints.local(path)
                sampler = service.client.create_sampling_client(model_path=local)
            else:
                sampler = service.client.create_sampling_client(base_model=body["base_model"])
            service.keep(service.samplers, sampler_id, (sampler, path))
            return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}

        return await asyncio.to_thread(answer, service.on_model, make)

    @app.get("/api/v1/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str):
        def get():
            sampler, path = service.sampler(sampler_id)
            base = sampler.get_base_model()
            return {"sampler_id": sampler_id, "base_model": base, "model_path": path}

        return answer(get)

    @app.post("/api/v1/asample")
    async def asample(request: Request):
        body = await json_body(request)
        sampler_id, n = body["sampling_session_id"], int(body.get("num_samples", 1))

        def call():
            sampler, _ = service.sampler(sampler_id)
            tokens = [t for c in body["prompt"]["chunks"] for t in _chunk_tokens(c)]
            params = types.SamplingParams(**body.get("sampling_params", {}))
            options = (  # rlkit's sampler serves the top-k ones, and refuses the others
                "topk_prompt_logprobs",
                "topk_sample_logprobs",
                "prompt_alt_tokens_k",
                "target_prompt_logprobs",
                "prompt_logprobs_last_n",
            )
            extra = {k: body[k] for k in options if body.get(k)}
            return sampler.sample(
                types.ModelInput.from_ints(tokens),
                n,
                params,
                include_prompt_logprobs=bool(body.get("prompt_logprobs")),
                **extra,
            )

        service.last_sample = time.monotonic()
        future = service.after(call, sample_to_proto, first=service.burst_over)
        seq = body.get("seq_id", 0)
        return {**future, "sample_sequence_ids": [f"{sampler_id}:{seq}:{i}" for i in range(n)]}


def _future_routes(app: FastAPI, service: Service) -> None:
    """Polling for results, and the answer to anything else."""

    @app.post("/api/v1/retrieve_future")
    async def retrieve_future(request: Request):
        body = await json_body(request)
        future = service.futures.get(body.get("request_id", ""))
        if future is None:
            return failure(
                RuntimeError(
                    f"request {body.get('request_id')!r} is unknown to this service (it was "
                    "made before a restart, or never): send it again"
                )
            )
        try:
            result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), POLL_S)
        except TimeoutError:  # 408: the SDK asks again at once, without a console line
            return JSONResponse({"type": "try_again", "request_id": body["request_id"]}, 408)
        if isinstance(result, bytes):
            return Response(result, media_type=PROTO)
        return result

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def unsupported(path: str, request: Request):
        return JSONResponse(
            {"detail": f"{request.method} /{path} is not supported by rlkit's Tinker service"}, 404
        )


def _chunk_tokens(chunk: dict) -> list[int]:
    if chunk.get("type", "encoded_text") != "encoded_text":
        raise ValueError(f"prompt chunks of type {chunk.get('type')!r} are not supported")
    return list(chunk["tokens"])


USAGE = """usage: python -m rlkit.service [--host 127.0.0.1] [--port 8000] [--dir DIR] [--api-key KEY]
                             [--session-timeout 120] [key=value ...]

rlkit as a local Tinker service: code written for the official `tinker` SDK runs against it with
  TINKER_BASE_URL=http://HOST:PORT TINKER_API_KEY=tml-local
The key=value overrides are the run config's machine keys (model.device=, model.dtype=,
engine=, engine.*=, model.share_prefix=). Saved weights live under --dir (default
./tinker_service) and stay loadable across restarts. A session's training clients and samplers
are released (their adapters, optimizer states, and a base model no one else uses) when its
client closes it, or when it sends no heartbeat for --session-timeout seconds."""


def client_args(overrides: list[str]) -> dict:
    """The ServiceClient's settings from run-config overrides, checked as a run checks them."""
    from rlkit.run import config
    from rlkit.run.build import service_args

    return service_args(config.checked(["model=rlkit_tiny", *overrides]))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlkit.service", usage=USAGE, add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dir", type=Path, default=Path("tinker_service"))
    parser.add_argument("--api-key")
    parser.add_argument("--session-timeout", type=float, default=120.0)
    args, overrides = parser.parse_known_args(argv)
    if args.help:
        print(USAGE)
        return
    if bad := [o for o in overrides if "=" not in o]:
        raise SystemExit(f"error: unknown argument {bad[0]!r}\n{USAGE}")
    if args.host not in LOOPBACK and not args.api_key:
        raise SystemExit(
            f"error: --host {args.host} exposes the service beyond this machine: give it "
            "--api-key KEY (clients then set TINKER_API_KEY=KEY)"
        )
    from rlkit.run.schema import ConfigError

    try:
        settings = client_args(overrides)
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None
    import uvicorn

    if not args.session_timeout > 0:
        raise SystemExit(
            f"error: --session-timeout must be > 0 seconds, got {args.session_timeout}"
        )
    service = Service(args.dir.resolve(), settings, session_timeout_s=args.session_timeout)
    manifest = {
        "host": args.host,
        "port": args.port,
        "session_timeout_s": args.session_timeout,
        "overrides": overrides,
        **settings,
    }
    (service.root / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    print(
        f"rlkit Tinker service on http://{args.host}:{args.port} (saved weights: {service.root})\n"
        f"clients: TINKER_BASE_URL=http://{args.host}:{args.port} "
        f"TINKER_API_KEY={args.api_key or 'tml-local'}",
        flush=True,
    )
    uvicorn.run(
        build_app(service, args.api_key), host=args.host, port=args.port, log_level="warning"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
