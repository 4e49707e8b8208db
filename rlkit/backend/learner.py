"""The machine half behind a training client: base model + adapter + optimizer on one device.

All methods here are synchronous; the client serializes calls to them, and nothing in this file
is thread-safe on its own.

Under a launcher every process holds a Learner and makes the same calls with the same data
(global-view SPMD, see distributed.py): `forward`, `reference_logprobs` and `sample` each work
on this process's block of the data and return everyone's results; `optim_step` sums the
gradients over the processes first. In one process the blocks are the whole data.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from rlkit.api.adapter import AdapterSpec
from rlkit.api.errors import NoGradientsError, RlkitError
from rlkit.api.losses import LossSpec, get_loss
from rlkit.api.quant import QuantizationUnavailable, QuantSpec, check_available
from rlkit.api.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    OptimStepResponse,
    SampledSequence,
    TensorData,
)
from rlkit.backend import adapters, distributed, models, prefixes
from rlkit.backend.batching import TokenRow, microbatches, pad, to_rows
from rlkit.backend.engines.base import Engine, Request
from rlkit.backend.engines.probe import Snapshot, check_probe, probe_tokens
from rlkit.backend.engines.registry import EngineSettings
from rlkit.backend.logprobs import target_logprobs

STATE_FILE = "rlkit_state.json"
OPTIMIZER_FILE = "optimizer.pt"
log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MainThread:
    """Runs submitted work in the thread that calls `serve` (a program's main thread), for
    programs that drive several clients from threads of their own: all of their torch work,
    building the models included, then happens in that one thread. Measured on 2 CPU cores (a
    4-arm sweep): with each client's work in its own thread, 1.4x the time of running the arms
    one after another; with the models built in one thread and trained in another, 1.5x; all
    in one thread, 1.03x.

    `parties` (the driving threads, in a fixed order) turns on batching across them: a call
    submitted with `call_together` waits until every party still running waits on one, then
    the waiting calls of one kind run as one (`many([item, ...])`, in the parties' order). A
    party waits on one call at a time, so which calls meet in a batch depends on each party's
    own sequence of calls alone, never on timing: the same batches in every run."""

    def __init__(self, parties: list[threading.Thread] | None = None) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._serving: threading.Thread | None = None
        # Threads that drive clients run their Python one at a time (`in_turn`); the one whose
        # turn it is gives it up while it waits for a call.
        self._turn = threading.Lock()
        self._holder: threading.Thread | None = None
        self.parties = list(parties or [])
        self._rank = {thread: i for i, thread in enumerate(self.parties)}
        self._finished: set[threading.Thread] = set()

    def in_turn(self, fn, *args):
        """`fn(*args)`, in the calling thread, taking turns with the other threads in `in_turn`."""
        with self._turn:
            self._holder = threading.current_thread()
            try:
                return fn(*args)
            finally:
                self._holder = None
                if threading.current_thread() in self._rank:  # one party fewer to wait for
                    self._finished.add(threading.current_thread())
                    self._queue.put(None)

    def call(self, fn, *args):
        """`fn(*args)` run by the serving thread; the caller's turn is free meanwhile."""
        return self._wait(self.submit(fn, *args))

    def call_together(self, key, many, item):
        """`many([item, ...])[0]` for this call's `item`, batched with the other parties'
        waiting calls of the same `key` (see the class docstring); `many` returns one result or
        exception per item. From a thread that is not a party: `many([item])` alone."""
        rank = self._rank.get(threading.current_thread())
        if rank is None or threading.current_thread() is self._serving:
            return _unpack(self.call(many, [item])[0])
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, (rank, key, many, item)))
        return _unpack(self._wait(future))

    def _wait(self, future: concurrent.futures.Future):
        if self._holder is not threading.current_thread():
            return future.result()
        self._holder = None
        self._turn.release()
        try:
            return future.result()
        finally:
            self._turn.acquire()
            self._holder = threading.current_thread()

    def submit(self, fn, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if threading.current_thread() is self._serving:  # the serving thread itself
            _settle(future, fn, args)
        else:
            self._queue.put((future, fn, args))
        return future

    def serve(self, until, poll_s: float = 0.2) -> None:
        """Run submitted work until `until()` is true (checked at least every `poll_s`, so
        signal handlers run in between)."""
        self._serving = threading.current_thread()
        waiting: list = []  # (future, (rank, key, many, item)): calls to batch
        try:
            while not until():
                try:
                    entry = self._queue.get(timeout=poll_s)
                except queue.Empty:
                    continue
                if entry is not None and len(entry) == 2:
                    waiting.append(entry)
                elif entry is not None:
                    future, fn, args = entry
                    with self._turn:  # no thread in `in_turn` runs Python meanwhile
                        _settle(future, fn, args)
                if waiting and len(waiting) >= self._running():
                    self._run_together(waiting)
                    waiting = []
        finally:
            self._serving = None

    def _running(self) -> int:
        """Parties not finished yet (or not started yet)."""
        return sum(
            thread not in self._finished and (thread.ident is None or thread.is_alive())
            for thread in self._rank
        )

    def _run_together(self, waiting: list) -> None:
        """The waiting calls, one batch per key, in the parties' order."""
        waiting.sort(key=lambda entry: entry[1][0])
        batches: dict = {}
        for future, (_, key, many, item) in waiting:
            batches.setdefault(key, (many, []))[1].append((future, item))
        for many, calls in batches.values():
            futures = [future for future, _ in calls]
            with self._turn:
                try:
                    results = many([item for _, item in calls])
                except BaseException as exc:  # the whole batch failed: each caller gets it
                    results = [exc] * len(calls)
            for future, result in zip(futures, results, strict=True):
                future.set_result(result)


def _unpack(result):
    if isinstance(result, BaseException):
        raise result
    return result


def _settle(future: concurrent.futures.Future, fn, args) -> None:
    try:
        future.set_result(fn(*args))
    except BaseException as exc:  # handed to the caller, whatever it is
        future.set_exception(exc)


class BasePool:
    """The base models a group of clients shares (by name, quantization, dtype and device),
    and where their work runs (`runner`: a MainThread; None: in each caller's thread)."""

    def __init__(self) -> None:
        self.bases: dict[tuple, SharedBase] = {}
        self.runner: MainThread | None = None

    def base(self, key: tuple) -> SharedBase:
        return self.bases.setdefault(key, SharedBase(self))

    def drop(self, shared: SharedBase) -> None:
        """Forget a base no learner uses any more (its weights go with the last reference)."""
        self.bases = {k: v for k, v in self.bases.items() if v is not shared}


class SharedBase:
    """One copy of a base model's weights with the adapters of every learner on it (each under
    its own name: the first "default", as a lone learner's), and the locks their clients share:
    one learner uses the model at a time, the one whose adapter is active."""

    def __init__(self, pool: BasePool | None = None) -> None:
        self.pool = pool
        self.model = None  # the peft model, once the first learner loads it
        self.tokenizer = None
        self.names = itertools.count(1)
        self.engines: dict[str, object] = {}  # what the learners' engines share (hf's copy)
        self.lock = threading.RLock()  # the model, its adapters and their optimizers
        self.engine_lock = threading.RLock()  # the learners' rollout engines

    def run(self, fn, *args):
        """`fn(*args)` where this base's work runs: in the thread serving the pool's calls
        (`MainThread`), or else in the caller's."""
        runner = self.pool.runner if self.pool is not None else None
        return fn(*args) if runner is None else runner.call(fn, *args)

    def batches(self) -> bool:
        """Whether calls on this base are batched across its clients (MainThread parties)."""
        runner = self.pool.runner if self.pool is not None else None
        return runner is not None and bool(runner.parties)

    def parties(self) -> int:
        """How many clients' calls on this base batch together (1: none batch)."""
        return len(self.pool.runner.parties) if self.batches() else 1

    def run_together(self, key, many, item):
        """`many([item])[0]` where this base's work runs, batched with other clients' calls of
        the same `key` on this base where the serving thread batches (`MainThread` parties)."""
        runner = self.pool.runner if self.pool is not None else None
        if runner is None:
            return _unpack(many([item])[0])
        return runner.call_together((id(self), key), many, item)


class Learner:
    def __init__(
        self,
        base_model: str,
        spec: AdapterSpec,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        tokens_per_microbatch: int = 8192,
        engine: EngineSettings | None = None,
        quant: QuantSpec | None = None,
        share_prefix: bool = True,
        processes: distributed.Processes | None = None,
        shared: SharedBase | None = None,
    ) -> None:
        self.base_model = base_model
        # The processes sharing this learner's calls (one: rank 0 of 1).
        self.processes = processes or distributed.Processes()
        # Rows with a common beginning share its forward pass (prefixes.py): same results up to
        # float rounding, so a switch of its own (recorded with the run).
        self.share_prefix = share_prefix
        self.spec = spec
        self.quant = quant or QuantSpec()
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype
        self.tokens_per_microbatch = tokens_per_microbatch
        try:
            check_available(self.quant, self.device.type, spec.use_dora)
        except QuantizationUnavailable as exc:
            raise RlkitError(f"quantize={self.quant.method!r} ({exc.key}): {exc}") from None
        # The base's weights, loaded by the first learner on it; the others add an adapter.
        self.shared = shared = shared or SharedBase()
        with shared.lock:
            if shared.tokenizer is None:  # cheap: fails fast on a bad name
                shared.tokenizer = models.load_tokenizer(base_model)
            self.tokenizer = shared.tokenizer
            self.engine = _engine_for(engine or EngineSettings.parse(), self.quant)
            self.engine.check(base_model, self.device, spec)  # before any weights load
            first = shared.model is None
            self.adapter_name = "default" if first else f"adapter_{next(shared.names)}"
            if first:
                base = models.load_model(
                    base_model, dtype=dtype, device=self.device, quant=self.quant
                )
                shared.model = adapters.attach(base, spec)
                base.name_or_path = base.config._name_or_path = base_model
            else:
                adapters.add(shared.model, spec, self.adapter_name)
            self.model = shared.model
            # The name the run gave, not the cache path it resolved to: a saved adapter's
            # config and model card (peft writes the base's name_or_path and its config's
            # there) must not depend on where this machine keeps its cache.
            self.model.peft_config[self.adapter_name].base_model_name_or_path = base_model
            self._activate()
            self.params = adapters.trainable_parameters(self.model)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        # lr and betas are set from AdamParams at every step.
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=0.0)
        self.step = 0
        self.pending_datums = 0  # datums whose gradients wait for the next optim_step
        # The work this process did itself: tokens it ran forward (for training or a reference)
        # and tokens it sampled. With several processes, each one's share of the calls.
        self.local_counts = {"forward_tokens": 0, "sampled_tokens": 0}
        self.probe_tolerance = self.engine.probe_tolerance or (
            1e-3 if dtype == torch.float32 else 5e-2
        )
        self.probe_tokens = probe_tokens(self.vocab_size)
        self._engine_instance: Engine | None = None  # built on first sync
        self._served: Snapshot | None = None  # what the engine served before the last sync
        # The KL reference's adapter weights; None: the base model (the adapter switched off).
        self._reference: dict[str, torch.Tensor] | None = None

    def close(self) -> None:
        """Give back what this learner holds: its engine, optimizer state and adapter, and the
        base model's weights too if no other learner is on it. The learner is unusable after."""
        shared = self.shared
        with shared.lock, shared.engine_lock:
            if self.model is None:
                return
            close_engine = getattr(self._engine_instance, "close", None)
            if close_engine is not None:
                close_engine()
            if list(shared.model.peft_config) == [self.adapter_name]:  # the last one on it
                shared.model = None
                shared.engines.clear()
                if shared.pool is not None:
                    shared.pool.drop(shared)
            else:
                with warnings.catch_warnings():  # the learner whose turn is next activates its own
                    warnings.filterwarnings("ignore", message=".*which is now deleted")
                    shared.model.delete_adapter(self.adapter_name)
            self.model = self._engine_instance = self._reference = self._served = None
            self.optimizer = None
            self.params = {}

    def _activate(self) -> None:
        """Make this learner's adapter the one the shared model runs (and trains)."""
        if self.model.active_adapter != self.adapter_name:
            self.model.set_adapter(self.adapter_name)

    # ---- forward / backward -------------------------------------------------------------
    def _logprobs(
        self, seqs: list[TokenRow], entropy: list | None = None, row_adapters=None
    ) -> list[torch.Tensor]:
        """Each row's logprob of its targets; with a list as `entropy`, each row's per-position
        entropy of the predicted distribution is appended to it. Rows that begin alike share
        the forward pass over their common beginning (see prefixes.py). `row_adapters`: each
        row's adapter, rows of one adapter neighbours (see adapters.per_row); None: the
        active one."""
        soft = any(s.targets.dim() == 2 for s in seqs)  # K targets per position somewhere
        # Rows of one adapter never share a prefix; owners numbered in the rows' order (not by
        # adapter name, which depends on which client came first).
        order: dict[str, int] = {}
        owners = (
            None
            if row_adapters is None
            else [order.setdefault(a, len(order)) for a in row_adapters]
        )
        plan = prefixes.plan(seqs, owners) if self.share_prefix and not soft else None
        if plan is not None:
            pad_id = self.tokenizer.pad_token_id
            logits = prefixes.forward(self.model, seqs, plan, pad_id, self.device, row_adapters)
            return prefixes.row_logprobs(seqs, plan, logits, entropy)
        tokens, targets, mask = (t.to(self.device) for t in pad(seqs, self.tokenizer.pad_token_id))
        with adapters.per_row(self.model, row_adapters):
            logits = self.model(input_ids=tokens, attention_mask=mask).logits
        per_token = target_logprobs(logits, targets, torch.tensor([s.length for s in seqs]))
        if entropy is not None:
            h = prefixes.token_entropy(torch.log_softmax(logits.float(), dim=-1))
            entropy += [h[row, : s.length] for row, s in enumerate(seqs)]
        if soft:  # (B, T, K): each row its own K (one target: K = 1, dropped)
            return [
                per_token[row, : s.length, : s.targets.shape[1]]
                if s.targets.dim() == 2
                else per_token[row, : s.length, 0]
                for row, s in enumerate(seqs)
            ]
        return [per_token[row, : s.length] for row, s in enumerate(seqs)]

    @torch.no_grad()
    def reference_logprobs(self, datums) -> list[TensorData]:
        """Each datum's target-token logprobs under the KL reference (see `set_reference`): this
        model with its adapter switched off or swapped for the reference's, so the reference
        costs one forward pass and no second copy of the base."""
        plain = [
            Datum(d.model_input, {"target_tokens": d.loss_fn_inputs["target_tokens"]})
            for d in datums
        ]
        seqs = to_rows(
            plain, LossSpec(fn=None, inputs=()), "reference", self.vocab_size, None, self.context
        )
        start, stop = self.processes.split([s.length for s in seqs])
        seqs = seqs[start:stop]
        self._activate()
        training = self.model.training
        self.model.eval()
        out: list[TensorData] = [None] * len(seqs)  # type: ignore[list-item]
        try:
            with self._as_reference():
                for group in microbatches(seqs, self.tokens_per_microbatch) if seqs else []:
                    lps = self._logprobs([seqs[i] for i in group])
                    for i, lp in zip(group, lps, strict=True):
                        out[i] = TensorData.from_torch(lp.float().cpu())
        finally:
            self.model.train(training)
        return self.processes.concat(out, "reference logprobs")

    @torch.no_grad()
    def snapshot_of(self, path: Path) -> Snapshot:
        """The adapter saved at `path` (same base and rank as this one) as a snapshot for a
        sampler; the policy being trained is left untouched."""
        current = self._weights()
        try:
            self._load_weights(path, read_state(path))
            return self.snapshot()
        finally:
            self._put(current)

    @torch.no_grad()
    def set_reference(self, path: Path | None) -> None:
        """The KL reference: the base model (None), or the base plus the adapter saved at
        `path` (by save_state or save_weights_for_sampler; same base and rank as this one)."""
        if path is None:
            self._reference = None
            return
        current = self._weights()
        try:
            self._load_weights(path, read_state(path))
            self._reference = self._weights()
        finally:
            self._put(current)

    @contextlib.contextmanager
    def _as_reference(self):
        if self._reference is None:
            with self.model.disable_adapter():
                yield
            return
        current = self._weights()
        self._put(self._reference)
        try:
            yield
        finally:
            self._put(current)  # bitwise: copies, no arithmetic

    def _weights(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def _put(self, weights: dict[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            p.copy_(weights[name])

    def forward(self, datums, loss_fn: str, loss_fn_config: dict | None, backward: bool):
        """The loss of every datum (and its gradients, with `backward`), each process working
        on its block of the datums (every datum is checked by every process, so a bad one is
        the same error everywhere); the outputs are everyone's, in order, the loss their sum."""
        return _unpack(forward_together([(self, datums, loss_fn, loss_fn_config, backward)])[0])

    def optim_step(self, adam: AdamParams) -> OptimStepResponse:
        if self.pending_datums == 0:  # the whole batch's count: the same in every process
            raise NoGradientsError(
                "optim_step called with no gradients accumulated: call forward_backward first"
            )
        params = list(self.params.values())
        # Each process's gradients are those of its block: the step uses their sum.
        self.processes.sum_gradients(params)
        max_norm = adam.grad_clip_norm if adam.grad_clip_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not torch.isfinite(torch.tensor(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.pending_datums = 0
            raise RlkitError(f"gradient norm is {grad_norm}; step skipped and gradients cleared")
        for group in self.optimizer.param_groups:
            group.update(
                lr=adam.learning_rate,
                betas=(adam.beta1, adam.beta2),
                eps=adam.eps,
                weight_decay=adam.weight_decay,
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending_datums = 0
        self.step += 1
        return OptimStepResponse(
            metrics={"grad_norm": grad_norm, "learning_rate": adam.learning_rate}
        )

    # ---- weights for sampling -----------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The adapter as it is now, plus the trainer's logprobs on the probe tokens under it."""
        return Snapshot(self._weights(), self._probe_logprobs())

    @torch.no_grad()
    def _probe_logprobs(self) -> torch.Tensor:
        self._activate()
        training = self.model.training
        self.model.eval()  # no dropout: the engine's forward pass has none
        try:
            tokens = torch.tensor(self.probe_tokens)
            return self._logprobs([TokenRow(tokens[:-1], tokens[1:], {})])[0].cpu()
        finally:
            self.model.train(training)

    def _engine(self) -> Engine:
        if self._engine_instance is None:
            with self.shared.lock:  # the engine starts from the model with this adapter on
                self._activate()
                self._engine_instance = self.engine.build(self)
        return self._engine_instance

    def sync(self, key: int, snapshot: Snapshot) -> dict[str, float]:
        """Make the engine serve `snapshot` and check that it does (see `check_probe`)."""
        engine = self._engine()
        if engine.loaded_key == key:
            return {}
        t = time.perf_counter()
        engine.load(key, snapshot.tensors)
        served = torch.tensor(engine.prompt_logprobs(self.probe_tokens)[1:])
        mismatch = check_probe(served, snapshot, self._served, self.probe_tolerance, engine.name)
        self._served = snapshot
        return {"sync/seconds": time.perf_counter() - t, "sync/probe_mismatch": mismatch}

    @property
    def context(self) -> int:
        """The longest sequence the model takes (prompt and completion), in tokens."""
        return self.model.config.max_position_embeddings

    def check_context(self, prompt: list[int], max_tokens: int | None) -> int:
        context = self.context
        limit = context - len(prompt)
        max_tokens = max_tokens or limit
        if max_tokens > limit:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                f"context of {context} tokens"
            )
        return max_tokens

    def sample(
        self, batch: list[tuple[int, Snapshot, Request]], lock=None
    ) -> list[list[SampledSequence]]:
        """Serve queued requests, in order, one engine call per run of the same snapshot; each
        process serves its block of the requests (a request's completions depend on its seed,
        not on the batch it is served in) and gets everyone's results. `lock` is held while
        this process's engine works, not while the processes exchange results (a thread that
        waits for the exchange must not keep another thread's exchange from starting)."""
        start, stop = self.processes.split(
            [r.num_samples * (len(r.prompt) + r.max_tokens) for _, _, r in batch]
        )
        results: list[list[SampledSequence]] = []
        with lock or contextlib.nullcontext():
            for (key, snapshot), run in itertools.groupby(
                batch[start:stop], key=lambda item: item[:2]
            ):
                self.sync(key, snapshot)
                results += self._engine().sample([request for _, _, request in run])
        self.local_counts["sampled_tokens"] += sum(len(s.tokens) for r in results for s in r)
        return self.processes.concat(results, "sampled results")

    def prompt_logprobs(self, key: int, snapshot: Snapshot, prompt: list[int]):
        if len(prompt) < 2:
            return [None] * len(prompt)
        self.sync(key, snapshot)
        return self._engine().prompt_logprobs(prompt)

    def prompt_topk_logprobs(self, key: int, snapshot: Snapshot, prompt: list[int], k: int):
        if len(prompt) < 2:
            return [None] * len(prompt)
        self.sync(key, snapshot)
        return self._engine().prompt_topk_logprobs(prompt, k)

    def check_topk(self, what: str, k: int) -> None:
        """Top-k logprobs (`what`=k) are asked for: one line if this engine cannot serve them."""
        if int(k) != k or k < 0:
            raise ValueError(f"{what} must be a whole number >= 0, got {k!r}")
        if k and not getattr(self.engine.engine, "serves_topk", False):
            raise NotImplementedError(
                f"{what} is not served by engine={self.engine.name} yet (engine=hf serves it)"
            )

    # ---- checkpoints --------------------------------------------------------------------
    def save(self, path: Path, with_optimizer: bool) -> Path:
        """Write adapter (peft format, safetensors) [+ optimizer] to `path`, atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            # The base output layer is frozen: an adapter on it needs no copy of its weights.
            self.model.save_pretrained(
                staging, save_embedding_layers=False, selected_adapters=[self.adapter_name]
            )
            if self.adapter_name != "default":  # peft writes the others in a folder each
                for file in (staging / self.adapter_name).iterdir():
                    os.replace(file, staging / file.name)
                (staging / self.adapter_name).rmdir()
            if with_optimizer:
                torch.save(self.optimizer.state_dict(), staging / OPTIMIZER_FILE)
            state = {
                "base_model": self.base_model,
                "adapter": self.spec.to_dict(),
                # The base the adapter was trained on; the adapter itself loads on any of them.
                "quant": self.quant.to_dict(),
                "step": self.step,
            }
            (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
            if path.exists():
                shutil.rmtree(path)
            os.replace(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    def load(self, path: Path, with_optimizer: bool) -> None:
        state = read_state(path)
        optimizer_state = None
        if with_optimizer:  # read first: a file that is refused leaves the model untouched
            opt_file = path / OPTIMIZER_FILE
            if not opt_file.exists():
                raise RlkitError(f"checkpoint {path} has no optimizer state (saved for sampler?)")
            # weights_only: tensors and plain containers; any other pickled object is refused.
            optimizer_state = torch.load(opt_file, map_location=self.device, weights_only=True)
        self._load_weights(path, state)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        self.step = state["step"]
        self.optimizer.zero_grad(set_to_none=True)
        self.pending_datums = 0

    def _load_weights(self, path: Path, state: dict) -> None:
        if state["base_model"] != self.base_model or state["adapter"]["rank"] != self.spec.rank:
            raise RlkitError(
                f"checkpoint {path} is for base_model={state['base_model']!r} "
                f"rank={state['adapter']['rank']}, but this client has "
                f"base_model={self.base_model!r} rank={self.spec.rank}"
            )
        file = path / "adapter_model.safetensors"
        if not file.is_file():  # missing, a folder, a link to a device or to nothing
            what = f"a link to {file.resolve()}" if file.is_symlink() else "missing"
            raise RlkitError(f"checkpoint {path}: {file.name} is {what}, not a weights file")
        try:
            weights = load_file(file, device=str(self.device))
        except Exception as exc:  # safetensors' own: "header too large", "invalid JSON", ...
            first = (str(exc).strip().splitlines() or [""])[0]
            raise RlkitError(
                f"checkpoint {path}: cannot read {file} as safetensors ({type(exc).__name__}: "
                f"{first}); the file is truncated or not an adapter"
            ) from None
        result = set_peft_model_state_dict(self.model, weights, adapter_name=self.adapter_name)
        if result.unexpected_keys:
            raise RlkitError(f"checkpoint {path} has unexpected tensors {result.unexpected_keys}")


def forward_together(calls: list[tuple]) -> list:
    """`Learner.forward` for each of `calls` (learner, datums, loss_fn, loss_fn_config,
    backward), learners on one base: one result or exception per call. Where the adapters
    allow (`adapters.can_batch`, one process, one target per position), the calls' rows run
    as one pass (microbatches of their budgets' sum), each row through its own learner's
    adapter, each call's loss its own; else the calls run one after another. Batched, a
    call's results equal its own pass's to float rounding (other shapes, other sums)."""
    results: list = [None] * len(calls)
    ready = []  # (call index, learner, loss spec, its config, its rows)
    for i, (learner, datums, loss_fn, loss_fn_config, backward) in enumerate(calls):
        try:
            spec = get_loss(loss_fn)
            config = spec.resolve_config(loss_fn, loss_fn_config)
            seqs = to_rows(datums, spec, loss_fn, learner.vocab_size, config, learner.context)
        except Exception as exc:
            if len(calls) == 1:
                raise
            results[i] = exc
            continue
        if backward:
            learner.pending_datums += len(seqs)
        start, stop = learner.processes.split([s.length for s in seqs])
        seqs = seqs[start:stop]
        learner.local_counts["forward_tokens"] += sum(s.length for s in seqs)
        ready.append((i, learner, spec, config, seqs))
    if not ready:
        return results
    learners = [learner for _, learner, *_ in ready]
    model = learners[0].model
    together = (
        len(ready) > 1
        and all(learner.processes.world_size == 1 for learner in learners)
        and not any(s.targets.dim() == 2 for *_, seqs in ready for s in seqs)
        and adapters.can_batch(model, [learner.adapter_name for learner in learners])
    )
    backward = calls[ready[0][0]][4]
    for part in [ready] if together else [[one] for one in ready]:
        for (i, learner, _, _, _), (outputs, total) in zip(
            part, _forward_rows(part, backward, together), strict=True
        ):
            if learner.processes.world_size > 1:
                blocks = learner.processes.all_gather((outputs, total), "forward results")
                outputs = [o for block, _ in blocks for o in block]
                total = blocks[0][1]
                for _, other in blocks[1:]:
                    total += other
            results[i] = ForwardBackwardOutput(
                loss_fn_output_type=calls[i][2],
                loss_fn_outputs=outputs,
                metrics={"loss:sum": total},
            )
    return results


def sample_together(items: list[tuple]) -> list:
    """`Learner.sample(batch, lock)` for each of `items` (learner, batch, lock), learners on
    one base: one result or exception per item. Where their engines decode together
    (`batches_with`: the hf engine's per-row adapters) and each batch is of one snapshot, the
    learners' requests run as one engine call, each row through its learner's adapter; else
    one learner after another."""
    if len(items) == 1:
        learner, batch, lock = items[0]
        return [learner.sample(batch, lock)]
    learners = [learner for learner, _, _ in items]
    engines = [learner._engine() for learner in learners]
    together = all(
        learner.processes.world_size == 1
        and getattr(engines[0], "batches_with", lambda _: False)(engine)
        and len({key for key, _, _ in batch}) == 1
        for learner, engine, (_, batch, _) in zip(learners, engines, items, strict=True)
    )
    if not together:
        return [_attempt(learner.sample, batch, lock) for learner, batch, lock in items]
    results: list = [None] * len(items)
    parts, ready = [], []
    with items[0][2] or contextlib.nullcontext():  # the base's engine lock, shared by all
        for i, (learner, batch, _) in enumerate(items):
            key, snapshot, _ = batch[0]
            try:
                learner.sync(key, snapshot)
            except Exception as exc:
                results[i] = exc
                continue
            parts.append((engines[i], [request for _, _, request in batch]))
            ready.append(i)
        if parts:
            out = engines[ready[0]].sample_together(parts)
            for i, sequences in zip(ready, out, strict=True):
                results[i] = sequences
                learners[i].local_counts["sampled_tokens"] += sum(
                    len(s.tokens) for r in sequences for s in r
                )
    return results


def _attempt(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        return exc


def _forward_rows(part: list[tuple], backward: bool, per_row: bool) -> list[tuple]:
    """The passes of `part`'s rows (one learner's, or several learners' with `per_row`
    adapters), microbatch by microbatch: each learner's (outputs, loss sum)."""
    learners = [learner for _, learner, *_ in part]
    first = learners[0]
    rows = [(j, seq) for j, (*_, seqs) in enumerate(part) for seq in seqs]
    seqs = [seq for _, seq in rows]
    names = [learners[j].adapter_name for j, _ in rows] if per_row else None
    outputs: list[list[dict[str, TensorData]]] = [[{} for _ in p[4]] for p in part]
    totals = [0.0] * len(part)
    offsets = list(itertools.accumulate([0, *(len(p[4]) for p in part)]))
    budget = sum(learner.tokens_per_microbatch for learner in learners)
    first._activate()
    first.model.train(backward)
    params = [p for learner in learners[1:] for p in learner.params.values()]
    trains = [p.requires_grad for p in params]
    for p in params:  # every learner's adapter trains in this pass
        p.requires_grad_(True)
    try:
        for group in microbatches(seqs, budget) if seqs else []:
            with torch.set_grad_enabled(backward):
                needs = any(spec.needs_entropy(config) for _, _, spec, config, _ in part)
                entropy = [] if needs else None
                logprobs = first._logprobs(
                    [seqs[r] for r in group], entropy, names and [names[r] for r in group]
                )
                losses: list[list[torch.Tensor]] = [[] for _ in part]
                for k, (r, lp) in enumerate(zip(group, logprobs, strict=True)):
                    j, seq = rows[r]
                    _, learner, spec, config, _ = part[j]
                    inputs = {key: v.to(learner.device) for key, v in seq.inputs.items()}
                    if entropy is not None:
                        inputs["entropy"] = entropy[k]
                    elementwise = spec.fn(lp, inputs, **config)
                    losses[j].append(elementwise.sum())
                    outputs[j][r - offsets[j]] = {
                        "logprobs": TensorData.from_torch(lp.float()),
                        "elementwise_loss": TensorData.from_torch(elementwise.float()),
                    }
                sums = {j: torch.stack(ls).sum() for j, ls in enumerate(losses) if ls}
                loss = (
                    next(iter(sums.values()))
                    if len(sums) == 1
                    else torch.stack([*sums.values()]).sum()
                )
            if backward:
                loss.backward()
            for j, value in sums.items():
                totals[j] += float(value.detach())
    finally:
        for p, flag in zip(params, trains, strict=True):
            p.requires_grad_(flag)
    return list(zip(outputs, totals, strict=True))


def _engine_for(settings: EngineSettings, quant: QuantSpec) -> EngineSettings:
    """`settings`, or the hf engine for a quantized base when the engine cannot serve one.

    Serving the policy being trained means the quantized base plus the unmerged adapter. An
    engine says it can with `serves_quantized = True`; vLLM cannot here (its CPU build has no
    bitsandbytes path, and on GPU it quantizes the base itself, with its own settings, and
    cannot serve DoRA), nor can a vLLM server, which serves its own base."""
    if not quant.enabled or getattr(settings.engine, "serves_quantized", False):
        return settings
    from rlkit.backend.engines.hf import HFEngine

    log.warning(
        "engine=%s cannot serve a quantized base (quantize=%s) exactly: sampling with engine=hf "
        "(the quantized base and the unmerged adapter, as trained) instead",
        settings.name,
        quant.method,
    )
    return EngineSettings(HFEngine, HFEngine.Options(), settings.probe_tolerance)


def read_state(path: Path) -> dict:
    """The rlkit metadata of a saved checkpoint directory; a clear error if it is not one."""
    state_file = Path(path) / STATE_FILE
    if not state_file.exists():
        raise RlkitError(f"{path} is not an rlkit checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise RlkitError(f"cannot read {state_file}: {exc}") from None
    if not isinstance(state, dict):
        raise RlkitError(f"{state_file} holds {type(state).__name__}, not a JSON object")
    if missing := [k for k in ("base_model", "adapter", "step") if k not in state]:
        raise RlkitError(f"{state_file} has no {', '.join(missing)}: not an rlkit checkpoint")
    if not isinstance(state["adapter"], dict) or "rank" not in state["adapter"]:
        raise RlkitError(f"{state_file}: 'adapter' is {state['adapter']!r:.60}, not its settings")
    return state
