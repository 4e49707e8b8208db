"""The local, Tinker-style client API: ServiceClient -> TrainingClient -> SamplingClient.

Names, arguments and return types follow the hosted Tinker SDK, so `import rlkit as tinker`
runs code written for it. Calls on one model are serialized and complete in the order they
were submitted (a forward_backward submitted before an optim_step is applied before it); each
returns a future, as the hosted calls do.

Differences from the hosted service, on purpose:
- paths are local directories (under `ServiceClient(checkpoint_dir=...)`), not `tinker://` URIs;
- `load_state` restores the optimizer too (`load_state(path, with_optimizer=False)` does not);
- a request with no `seed` gets one derived from the client's seed and a call counter, so a
  whole run is reproducible.

Several processes: under a launcher (`accelerate launch --num_processes N`, torchrun) every
process runs the same program and makes the same calls with the same data; the client splits
each call's work between them and hands every process the whole result (global-view SPMD, see
docs/distributed.md). The caller never sees a rank: `forward_backward`'s datums,
`compute_reference_logprobs` and the sample requests that run together are divided between the
processes, `optim_step` sums their gradients, and `map_items` spreads plain Python work (rewards,
environment steps) the same way. `Launch` tells the run plumbing above the client which process
writes the outputs and lets the processes agree on a value.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import itertools
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from rlkit.api.adapter import AdapterSpec
from rlkit.api.errors import RlkitError
from rlkit.api.quant import QuantSpec
from rlkit.api.types import (
    DTYPES,
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadWeightsResponse,
    ModelInput,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    TensorData,
    to_token_list,
)
from rlkit.backend import distributed, models
from rlkit.backend.engines.base import Request
from rlkit.backend.engines.probe import Snapshot
from rlkit.backend.engines.registry import EngineSettings
from rlkit.backend.learner import (
    BasePool,
    Learner,
    MainThread,
    forward_together,
    read_state,
    sample_together,
)

__all__ = [
    "APIFuture",
    "Launch",
    "SamplingClient",
    "ServiceClient",
    "TrainingClient",
    "check_engine",
    "map_items",
    "resolve_model",
    "vllm_max_lora_rank",
]

T = TypeVar("T")
R = TypeVar("R")


def map_items(fn: Callable[[T], R], items: list[T], what: str = "map_items") -> list[R]:
    """`[fn(x) for x in items]`, with each item computed by one of the run's processes and every
    process getting the whole list (one process: exactly that list comprehension). For work
    that is Python, not model, and costs per item: rewards, environment steps, grading. Every
    process must call it with the same items; an exception is raised in the process whose item
    raised it, and the others fail naming `what` (PeerLostError)."""
    return distributed.current().map_items(fn, list(items), what)


@dataclasses.dataclass(frozen=True)
class Launch:
    """The processes a launcher started, as the run plumbing above the client sees them: which
    one writes outputs (`is_main`), how many there are, and agreeing on a value. One process
    without a launcher. `Launch.join(timeout_s)` joins the launcher's group (the first call);
    collectives then fail after `timeout_s` seconds with a PeerLostError."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def join(cls, timeout_s: float | None = None) -> Launch:
        procs = distributed.join(timeout_s)
        return cls(procs.rank, procs.world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any = None, what: str = "broadcast") -> Any:
        """The main process's `obj`, on every process."""
        return distributed.current().broadcast(obj, what)

    def any(self, flag: bool, what: str = "any") -> bool:
        """True on every process when any process passes True."""
        return distributed.current().any(flag, what)

    def barrier(self, what: str = "barrier") -> None:
        """Wait until every process gets here."""
        distributed.current().sum(0, what)

    def info(self) -> dict[str, Any]:
        """World size, backend and the launcher's settings, for a run's manifest."""
        return distributed.launcher_info()

    @staticmethod
    def lost_processes() -> str | None:
        """A warning when a launcher asked for N processes but started one (accelerate --cpu)."""
        return distributed.lost_processes()


def check_engine(
    engine: str = "hf", options: dict | None = None, where: str = "engine_options "
) -> None:
    """Raise ValueError naming the bad key when `engine` (a short name or an engine class's
    dotted path) or its `options` are not what `ServiceClient(engine=..., engine_options=...)`
    takes; for callers that check a config before making a client."""
    EngineSettings.parse(engine, options, where=where)


def resolve_model(name: str) -> str:
    """A base model's local directory: a built-in model (built into the cache when missing), a
    local directory, or a hub id from the local hub cache (for servers started beside a run)."""
    return str(models.resolve(name))


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that fits an adapter of rank `rank` (for a
    vLLM server the trainers' samplers share)."""
    from rlkit.backend.engines.vllm import lora_rank_limit  # imports vLLM only when asked

    return lora_rank_limit(rank)


class APIFuture(Generic[T]):
    """A result that will exist: `.result()`, `await fut.result_async()` or `await fut`."""

    def __init__(self, future: concurrent.futures.Future, flush: Callable[[], None] | None = None):
        self._future = future
        self._flush = flush  # runs queued work this result waits for

    def result(self, timeout: float | None = None) -> T:
        if self._flush is not None and not self._future.done():
            self._flush()
        return self._future.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        if self._flush is not None and not self._future.done():
            self._flush()  # in this thread, like every other call (see _Worker)
        return await asyncio.wait_for(asyncio.wrap_future(self._future), timeout)

    def done(self) -> bool:
        return self._future.done()

    def __await__(self):
        return self.result_async().__await__()


class _Worker:
    """Owns a Learner and runs its work in the calling thread, one call at a time.

    Most calls run at once and return a resolved future (errors are raised by `.result()`, as
    from a remote call). Sample requests are queued instead and run together, as one engine
    batch, when a result is asked for or any other call is submitted from the same thread, so
    a thread's submission order is still its execution order. Not a background thread on
    purpose: measured on 2 CPU cores, torch ops in a second thread ran 2-3x slower than in the
    main one (its OpenMP team competes with the main thread's spinning one).

    Threads: a caller may sample from one thread while it trains in another (asynchronous RL,
    rlkit.rl.schedule). Each thread has its own queue, so an engine batch holds one thread's
    requests only, the same batch whatever the timing; engine work (sampling, loading weights
    into the engine) holds one lock and model work (forward, backward, optimizer, snapshots)
    another, so the two overlap. The engine serves its own copy of the weights. Clients whose
    learners share a base model share its two locks: their calls take turns.
    """

    def __init__(self, learner: Learner) -> None:
        self._learner = learner
        self._lock = learner.shared.lock  # the training model and optimizer
        self._engine_lock = learner.shared.engine_lock  # the rollout engine
        self._queues_lock = threading.Lock()
        self._queues: dict[int, list[tuple[int, Snapshot, Request, bool, Any]]] = {}

    @property
    def learner(self) -> Learner:
        if self._learner.model is None:
            raise RlkitError(
                "this training client was closed (its adapter, optimizer state and samplers "
                "are gone): make a new one, e.g. from a saved state"
            )
        return self._learner

    def close(self) -> None:
        self._learner.shared.run(self._learner.close)

    def submit(self, fn: Callable[..., T], *args, engine: bool = False, **kwargs) -> APIFuture[T]:
        """Run `fn` now (after this thread's queued samples), under the engine's lock when
        `engine`, else the model's."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.flush()
        try:
            future.set_result(
                self._run(fn, *args, lock=self._engine_lock if engine else None, **kwargs)
            )
        except Exception as exc:
            future.set_exception(exc)
        return APIFuture(future)

    def forward(self, data, loss_fn, loss_fn_config, backward: bool) -> APIFuture:
        """`Learner.forward`, batched with other clients' on this base where their calls are
        served together (`ServiceClient.serve_calls_here(parties=...)`)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.flush()
        learner = self.learner
        try:
            future.set_result(
                learner.shared.run_together(
                    ("forward", backward),
                    functools.partial(_locked, self._lock, forward_together),
                    (learner, data, loss_fn, loss_fn_config, backward),
                )
            )
        except Exception as exc:
            future.set_exception(exc)
        return APIFuture(future)

    def _run(self, fn: Callable[..., T], *args, lock=None, **kwargs) -> T:
        """`fn(...)` under `lock` (default: the model's), in this thread, or in the thread that
        serves the base's calls (`ServiceClient.serve_calls_here`)."""
        lock = lock or self._lock

        def run() -> T:
            with lock:
                return fn(*args, **kwargs)

        return self.learner.shared.run(run)

    def queue_sample(
        self, key: int, snapshot: Snapshot, request: Request, prompt_logprobs: tuple[bool, int]
    ) -> APIFuture[SampleResponse]:
        """`prompt_logprobs`: (the prompt's logprobs?, k of its top-k logprobs or 0)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        thread = threading.get_ident()
        with self._queues_lock:
            self._queues.setdefault(thread, []).append(
                (key, snapshot, request, prompt_logprobs, future)
            )
        return APIFuture(future, flush=functools.partial(self.flush, thread))

    def flush(self, thread: int | None = None) -> None:
        """Run every request queued by `thread` (default: the calling one) in one batch; each
        future gets its own result."""
        with self._queues_lock:
            queued = self._queues.pop(threading.get_ident() if thread is None else thread, [])
        if not queued:
            return
        try:
            batch = [(key, snap, req) for key, snap, req, _, _ in queued]
            # The engine lock is the sampler's to take: not held while processes exchange.
            learner = self.learner
            results = learner.shared.run_together(
                ("sample",), sample_together, (learner, batch, self._engine_lock)
            )
        except Exception as exc:
            for *_, future in queued:
                future.set_exception(exc)
            return
        for (key, snapshot, request, (with_prompt_lp, topk), future), sequences in zip(
            queued, results, strict=True
        ):
            try:
                prompt = (key, snapshot, request.prompt)
                lock = self._engine_lock
                response = SampleResponse(
                    sequences=sequences,
                    prompt_logprobs=(
                        self._run(self.learner.prompt_logprobs, *prompt, lock=lock)
                        if with_prompt_lp
                        else None
                    ),
                    topk_prompt_logprobs=(
                        self._run(self.learner.prompt_topk_logprobs, *prompt, topk, lock=lock)
                        if topk
                        else None
                    ),
                )
                future.set_result(response)
            except Exception as exc:
                future.set_exception(exc)


def _locked(lock, fn, *args):
    with lock:
        return fn(*args)


def _dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


class ServiceClient:
    """Entry point: makes training and sampling clients for local models.

    `device` defaults to CUDA when available, else CPU; `dtype` to bfloat16 on GPU and float32
    on CPU. Checkpoints go under `checkpoint_dir` (default `$RLKIT_CACHE_DIR/checkpoints`).
    `engine` picks the rollout engine of every sampler: `hf` (transformers), `vllm`, or the
    dotted path of an engine class, with `engine_options` (the engine's `Options` fields, e.g.
    `rlkit.backend.engines.vllm.VLLMEngine.Options`; `probe_tolerance` for any engine).
    `share_prefix`: datums that begin with the same tokens (the completions of one prompt) share
    the trainer's forward pass over that beginning; results equal to float rounding.
    Hosted-only arguments (`api_key`, `base_url`, ...) are accepted and ignored.

    Training clients on the same base model (same name, quantization, dtype and device) share
    one copy of its weights, each with its own adapter, optimizer and seed: their calls take
    turns on the one model, and each gets the bits it would get alone. `shares_with`: another
    ServiceClient whose base models this one shares too (its own checkpoint_dir and engine).
    """

    def __init__(
        self,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        engine: str = "hf",
        engine_options: dict | None = None,
        share_prefix: bool = True,
        *,
        shares_with: ServiceClient | None = None,
        **_hosted_only: Any,
    ) -> None:
        self.engine = EngineSettings.parse(engine, engine_options)
        # Loaded base models, by (name, quantization, dtype, device), with their adapters.
        self._pool = shares_with._pool if shares_with else BasePool()
        if not isinstance(share_prefix, bool):
            raise ValueError(f"share_prefix must be True or False, got {share_prefix!r}")
        self.share_prefix = share_prefix
        # The launcher's processes (joined on the first client), which share every call.
        self._processes = distributed.join()
        device = distributed.device(device)  # several processes on a node: one GPU each
        self.device = (
            torch.device(device)
            if device
            else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        )
        self.dtype = _dtype(dtype, self.device)
        self.checkpoint_dir = Path(checkpoint_dir or models.cache_dir() / "checkpoints")

    def serve_calls_here(
        self,
        until: Callable[[], bool],
        start: Callable[[], None] | None = None,
        parties: list[threading.Thread] | None = None,
    ) -> None:
        """Run the work of every training client on this client's base models (and those of
        clients made with `shares_with=` this one) in the calling thread, until `until()` is
        true; `start()` (the threads that drive the clients) runs first. For a program that
        drives several training clients from threads of its own (a sweep's arms), so torch
        runs in one thread, the main one (local extension).

        `parties`: those threads, in a fixed order, each driving its clients through `in_turn`;
        their `forward` / `forward_backward` calls on one base then run as one pass (each row
        through its client's adapter) once every party still running waits on one. The same
        batches in every run (each party waits on one call at a time); each client's results
        equal its own pass's to float rounding."""
        runner = self._pool.runner = MainThread(parties)
        try:
            if start is not None:
                start()
            runner.serve(until)
        finally:
            self._pool.runner = None

    def in_turn(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` in the calling thread (one that drives training clients whose work
        `serve_calls_here` runs), taking turns with the other such threads: one of them runs
        Python at a time, and gives its turn up while it waits for a call. Python threads share
        one interpreter lock: several at once slow the serving thread's calls down (measured on
        2 CPU cores, a 4-arm sweep: 1.4x the time of its arms one after another). Without a
        serving thread, just `fn(*args)` (local extension)."""
        runner = self._pool.runner
        return fn(*args) if runner is None else runner.in_turn(fn, *args)

    def _learner(self, base_model: str, spec: AdapterSpec, quant: QuantSpec | None = None):
        quant = quant or QuantSpec()
        shared = self._pool.base((base_model, quant, self.dtype, str(self.device)))
        make = functools.partial(
            Learner,
            base_model,
            spec,
            dtype=self.dtype,
            device=self.device,
            engine=self.engine,
            quant=quant,
            share_prefix=self.share_prefix,
            processes=self._processes,
            shared=shared,
        )
        # Built in the thread its work will run in. Measured on 2 CPU cores: a model built in
        # one thread and trained in another took 1.5x longer per step (cause not pinned down;
        # one NUMA node here).
        try:
            return shared.run(make)
        except BaseException:
            if shared.model is None:  # nothing loaded: forget the base (a wrong name, ...)
                self._pool.drop(shared)
            raise

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        *,
        lora_alpha: float = 32.0,
        use_dora: bool = False,
        quantize: str = "none",
        quant_compute_dtype: str = "auto",
        double_quant: bool = True,
        **_hosted_only: Any,
    ) -> TrainingClient:
        """A LoRA (`use_dora`: DoRA) adapter on `base_model`. `quantize` (`nf4`, `fp4`, `int8`)
        stores the frozen base in 4 or 8 bits with bitsandbytes (QLoRA, QDoRA); samplers then
        serve the quantized base plus the unmerged adapter, the policy being trained.
        `quant_compute_dtype` and `double_quant`: see rlkit.api.quant.QuantSpec."""
        quant = QuantSpec(quantize, quant_compute_dtype, double_quant)
        spec = AdapterSpec(
            rank=rank,
            alpha=lora_alpha,
            train_attn=train_attn,
            train_mlp=train_mlp,
            train_unembed=train_unembed,
            use_dora=use_dora,
            seed=0 if seed is None else seed,
        )
        return TrainingClient(self, self._learner(base_model, spec, quant))

    async def create_lora_training_client_async(self, *args, **kwargs) -> TrainingClient:
        return await asyncio.to_thread(self.create_lora_training_client, *args, **kwargs)

    def create_training_client_from_state(
        self,
        path: str,
        base_model: str | None = None,
        *,
        with_optimizer: bool = False,
        **_hosted_only: Any,
    ) -> TrainingClient:
        state = read_state(Path(path))
        if base_model is not None and base_model != state["base_model"]:
            raise ValueError(
                f"checkpoint {path} is for base_model {state['base_model']!r}, not {base_model!r}"
            )
        # The base the adapter was trained on (checkpoints from before quantization: none).
        quant = QuantSpec(**state.get("quant", {}))
        client = TrainingClient(
            self, self._learner(state["base_model"], AdapterSpec(**state["adapter"]), quant)
        )
        client.load_state(path, with_optimizer=with_optimizer).result()
        return client

    def create_training_client_from_state_with_optimizer(self, path: str, **kw) -> TrainingClient:
        return self.create_training_client_from_state(path, with_optimizer=True, **kw)

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None, **_hosted_only: Any
    ) -> SamplingClient:
        """Sample from saved weights (`model_path`) or from an untouched base model."""
        if model_path is not None:
            trainer = self.create_training_client_from_state(model_path)
        elif base_model is None:
            raise ValueError("create_sampling_client needs model_path or base_model")
        else:  # a fresh adapter starts with B = 0, so it samples exactly the base model
            trainer = TrainingClient(self, self._learner(base_model, AdapterSpec(rank=1)))
        sampler = trainer.save_weights_and_get_sampling_client()
        sampler._owns_learner = True
        return sampler

    def loaded_base_models(self) -> list[str]:
        """The base models whose weights this client (and those sharing its bases) holds now
        (local extension)."""
        return sorted({key[0] for key, shared in self._pool.bases.items() if shared.model})

    def get_server_capabilities(self) -> dict:
        return {"supported_models": [{"model_name": n} for n in sorted(models.BUILTIN_MODELS)]}

    async def get_server_capabilities_async(self) -> dict:
        return self.get_server_capabilities()

    async def create_sampling_client_async(self, *args, **kwargs) -> SamplingClient:
        return await asyncio.to_thread(self.create_sampling_client, *args, **kwargs)

    async def create_training_client_from_state_async(self, *args, **kwargs) -> TrainingClient:
        return await asyncio.to_thread(self.create_training_client_from_state, *args, **kwargs)

    async def create_training_client_from_state_with_optimizer_async(
        self, *args, **kwargs
    ) -> TrainingClient:
        return await asyncio.to_thread(
            self.create_training_client_from_state_with_optimizer, *args, **kwargs
        )


class TrainingClient:
    """A LoRA adapter being trained on a base model. Methods return futures at once."""

    _ids = itertools.count()

    def __init__(self, service: ServiceClient, learner: Learner) -> None:
        self.service = service
        self.model_id = f"{uuid.uuid4().hex[:8]}-{next(self._ids)}"
        self._worker = _Worker(learner)
        self._sampler_seeds = itertools.count()

    @property
    def _learner(self) -> Learner:
        return self._worker.learner

    def get_tokenizer(self):
        return self._learner.tokenizer

    def get_info(self) -> GetInfoResponse:
        learner = self._learner
        return GetInfoResponse(
            base_model=learner.base_model,
            lora_rank=learner.spec.rank,
            model_id=self.model_id,
            vocab_size=learner.vocab_size,
            trainable_params=sum(p.numel() for p in learner.params.values()),
            max_context_length=learner.context,
        )

    async def get_info_async(self) -> GetInfoResponse:
        return self.get_info()

    def close(self) -> None:
        """Release this client's adapter, optimizer state and rollout engine, and its base
        model's weights once no other client is on that base; its samplers stop working too
        (local extension: how rlkit's Tinker service frees a finished session)."""
        self._worker.close()

    def work_counts(self) -> dict[str, int]:
        """The tokens this process ran forward (training, references) and sampled itself
        (local extension): under a launcher, its share of every call; in one process, all."""
        return dict(self._learner.local_counts)

    # ---- training -----------------------------------------------------------------------
    def forward(
        self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        return self._worker.forward(data, loss_fn, loss_fn_config, False)

    def forward_backward(
        self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        return self._worker.forward(data, loss_fn, loss_fn_config, True)

    def compute_reference_logprobs(self, data: list[Datum]) -> APIFuture[list[TensorData]]:
        """Each datum's `target_tokens` logprobs under the KL reference (local extension, for a
        KL penalty): by default the base model, i.e. the trainer's own model with the adapter
        switched off, so the reference costs one forward pass and no second copy of the
        weights; see `set_reference`. Other loss_fn_inputs are ignored."""
        return self._worker.submit(self._learner.reference_logprobs, data)

    def set_reference(self, path: str | None = None) -> APIFuture[None]:
        """Make the KL reference the base plus the adapter saved at `path` (a save_state or
        save_weights_for_sampler path, e.g. the supervised warm start RL begins from), or the
        base model again with None (local extension). Costs one copy of the adapter."""
        return self._worker.submit(
            self._learner.set_reference, None if path is None else Path(path)
        )

    def forward_backward_custom(
        self, data: list[Datum], loss_fn: Callable, **_hosted_only: Any
    ) -> APIFuture[ForwardBackwardOutput]:
        """Any differentiable `loss_fn(data, logprobs_list) -> (loss, metrics)` on logprobs.

        Costs one extra forward pass: the gradient of `loss` with respect to each token's
        logprob becomes that token's weight in a cross_entropy backward pass.
        """
        return self._worker.submit(self._custom, data, loss_fn)

    def _custom(self, data, loss_fn) -> ForwardBackwardOutput:
        learner = self._learner
        plain = [
            Datum(d.model_input, {"target_tokens": d.loss_fn_inputs["target_tokens"]}) for d in data
        ]
        with_weights = [
            Datum(d.model_input, {**p.loss_fn_inputs, "weights": [0.0] * d.model_input.length})
            for d, p in zip(data, plain, strict=True)
        ]
        first = learner.forward(with_weights, "cross_entropy", None, backward=False)
        logprobs = [o["logprobs"].to_torch().requires_grad_() for o in first.loss_fn_outputs]
        loss, metrics = loss_fn(data, logprobs)
        loss.backward()
        weighted = [
            Datum(d.model_input, {**d.loss_fn_inputs, "weights": -lp.grad})
            for d, lp in zip(with_weights, logprobs, strict=True)
        ]
        out = learner.forward(weighted, "cross_entropy", None, backward=True)
        out.metrics = {**out.metrics, **metrics, "loss:sum": float(loss.detach())}
        return out

    def optim_step(
        self, optim_params: AdamParams | None = None, *, adam_params: AdamParams | None = None
    ) -> APIFuture[OptimStepResponse]:
        params = _coerce(AdamParams, optim_params or adam_params)
        return self._worker.submit(self._learner.optim_step, params)

    # ---- checkpoints --------------------------------------------------------------------
    def _path(self, kind: str, name: str) -> Path:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"checkpoint name must be a plain file name, got {name!r}")
        return self.service.checkpoint_dir / self.model_id / kind / name

    def save_state(self, name: str, **_hosted_only: Any) -> APIFuture[SaveWeightsResponse]:
        path = self._path("weights", name)
        return self._worker.submit(
            lambda: SaveWeightsResponse(str(self._learner.save(path, with_optimizer=True)))
        )

    def load_state(
        self, path: str, with_optimizer: bool = True, **_hosted_only: Any
    ) -> APIFuture[LoadWeightsResponse]:
        def load() -> LoadWeightsResponse:
            self._learner.load(Path(path), with_optimizer=with_optimizer)
            return LoadWeightsResponse(str(path))

        return self._worker.submit(load)

    def load_state_with_optimizer(
        self, path: str, **_hosted_only: Any
    ) -> APIFuture[LoadWeightsResponse]:
        return self.load_state(path, with_optimizer=True)

    def save_weights_for_sampler(
        self, name: str, **_hosted_only: Any
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        path = self._path("sampler_weights", name)
        return self._worker.submit(
            lambda: SaveWeightsForSamplerResponse(
                str(self._learner.save(path, with_optimizer=False))
            )
        )

    def create_sampling_client(self, model_path: str, **_hosted_only: Any) -> SamplingClient:
        """A sampler over the adapter saved at `model_path` (by save_state or
        save_weights_for_sampler, for this client's base and rank), served by this client's
        engine: no second copy of the model. The trainer's own weights are left as they are."""
        snapshot = self._worker.submit(self._learner.snapshot_of, Path(model_path)).result()
        return self._sampler(snapshot)

    def save_weights_and_get_sampling_client(
        self, name: str | None = None, **_hosted_only: Any
    ) -> SamplingClient:
        """A sampler over the weights as they are once every call queued before this has run.
        The engine is loaded with them before this returns (`sampler.sync_metrics` says how
        long that took and how closely the engine matches the trainer)."""
        snapshot = self._worker.submit(self._learner.snapshot).result()
        if name is not None:
            self.save_weights_for_sampler(name).result()
        return self._sampler(snapshot)

    def _sampler(self, snapshot: Snapshot) -> SamplingClient:
        key = next(self._sampler_seeds)
        sampler = SamplingClient(self._worker, snapshot, key, (self._learner.spec.seed, key))
        sampler.sync_metrics = self._worker.submit(
            self._learner.sync, key, snapshot, engine=True
        ).result()
        return sampler

    # ---- async twins (each returns the same future as its sync twin) ----------------------
    async def forward_async(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    async def forward_backward_async(self, *args, **kwargs):
        return self.forward_backward(*args, **kwargs)

    async def forward_backward_custom_async(self, *args, **kwargs):
        return self.forward_backward_custom(*args, **kwargs)

    async def compute_reference_logprobs_async(self, *args, **kwargs):
        return self.compute_reference_logprobs(*args, **kwargs)

    async def set_reference_async(self, *args, **kwargs):
        return self.set_reference(*args, **kwargs)

    async def optim_step_async(self, *args, **kwargs):
        return self.optim_step(*args, **kwargs)

    async def save_state_async(self, *args, **kwargs):
        return self.save_state(*args, **kwargs)

    async def load_state_async(self, *args, **kwargs):
        return self.load_state(*args, **kwargs)

    async def load_state_with_optimizer_async(self, *args, **kwargs):
        return self.load_state_with_optimizer(*args, **kwargs)

    async def save_weights_for_sampler_async(self, *args, **kwargs):
        return self.save_weights_for_sampler(*args, **kwargs)

    async def save_weights_and_get_sampling_client_async(self, *args, **kwargs):
        return await asyncio.to_thread(self.save_weights_and_get_sampling_client, *args, **kwargs)

    async def create_sampling_client_async(self, *args, **kwargs):
        return await asyncio.to_thread(self.create_sampling_client, *args, **kwargs)


class SamplingClient:
    """Samples from a frozen copy of the adapter weights, taken when it was created."""

    def __init__(
        self, worker: _Worker, snapshot: Snapshot, key: int, seed: tuple[int, int]
    ) -> None:
        self._worker = worker
        self.sync_metrics: dict[str, float] = {}
        self._snapshot = snapshot
        self._key = key  # identifies the snapshot, so the engine loads it once
        self._base_seed = seed
        self._calls = itertools.count()
        self._owns_learner = False  # made by ServiceClient.create_sampling_client

    def close(self) -> None:
        """Release what this sampler holds of its own (local extension): one made by
        `ServiceClient.create_sampling_client` has an adapter on the base model (and the base
        itself, if no other client is on it). One made by a training client shares that
        client's, which `TrainingClient.close` releases."""
        if self._owns_learner:
            self._worker.close()

    def get_tokenizer(self):
        return self._worker.learner.tokenizer

    def get_base_model(self) -> str:
        return self._worker.learner.base_model

    async def get_base_model_async(self) -> str:
        return self.get_base_model()

    def _request_seed(self, seed: int | None) -> int:
        if seed is not None:
            return seed
        # Deterministic but distinct for every call of every sampler of this run.
        a, b = self._base_seed
        return hash((a, b, next(self._calls))) & 0x7FFF_FFFF

    def sample(
        self,
        prompt: ModelInput,
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        **unsupported: Any,
    ) -> APIFuture[SampleResponse]:
        """`num_samples` completions of `prompt`. `topk_sample_logprobs=k`: each sampled
        token's position's k most likely tokens (`SampledSequence.topk_logprobs`);
        `topk_prompt_logprobs=k`: each prompt position's (`SampleResponse.topk_prompt_logprobs`);
        raw policy logprobs, as `logprobs` (engine=hf)."""
        _refuse_unsupported("sample", unsupported)
        tokens = to_token_list(prompt)
        if not tokens:
            raise ValueError("sample() got an empty prompt")
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        params = _coerce(SamplingParams, sampling_params)
        vocab = self._worker.learner.vocab_size
        if bad := [t for t in tokens if not 0 <= t < vocab]:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        learner = self._worker.learner
        max_tokens = learner.check_context(tokens, params.max_tokens)
        learner.check_topk("topk_prompt_logprobs", topk_prompt_logprobs)
        learner.check_topk("topk_sample_logprobs", topk_sample_logprobs)
        request = Request(
            tokens,
            int(num_samples),
            params,
            self._request_seed(params.seed),
            max_tokens,
            int(topk_sample_logprobs),
        )
        return self._worker.queue_sample(
            self._key,
            self._snapshot,
            request,
            (include_prompt_logprobs, int(topk_prompt_logprobs)),
        )

    async def sample_async(self, *args, **kwargs) -> SampleResponse:
        return await self.sample(*args, **kwargs)

    def compute_logprobs(
        self, prompt: ModelInput, **unsupported: Any
    ) -> APIFuture[list[float | None]]:
        _refuse_unsupported("compute_logprobs", unsupported)
        tokens = to_token_list(prompt)
        return self._worker.submit(
            self._worker.learner.prompt_logprobs, self._key, self._snapshot, tokens, engine=True
        )

    async def compute_logprobs_async(self, *args, **kwargs) -> list[float | None]:
        return await self.compute_logprobs(*args, **kwargs)


# Hosted-only sampling options: accepted at their "off" value, refused otherwise.
_UNSUPPORTED_OFF = {
    "target_prompt_logprobs": None,
    "prompt_alt_tokens_k": 0,
    "prompt_logprobs_last_n": None,
}
# Hosted-only options about the connection: meaningless locally, ignored whatever their value.
_IGNORED = {"retry_config", "record_stability_info"}


def _refuse_unsupported(method: str, kwargs: dict) -> None:
    for key, value in kwargs.items():
        if key in _IGNORED:
            continue
        if key not in _UNSUPPORTED_OFF:
            raise TypeError(f"{method}() got an unexpected keyword argument {key!r}")
        if value != _UNSUPPORTED_OFF[key]:
            raise NotImplementedError(
                f"{method}({key}={value!r}) is not supported by rlkit's local sampler yet"
            )


P = TypeVar("P", AdamParams, SamplingParams)


def _coerce(cls: type[P], params: Any) -> P:
    """`cls` built from ours, the hosted SDK's twin (same field names), or None (defaults);
    validated either way."""
    if params is None:
        return cls()
    if isinstance(params, cls):
        return params
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{n: getattr(params, n) for n in names if hasattr(params, n)})
