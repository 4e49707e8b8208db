"""Data parallelism across processes: all of it lives here, in the machine half.

Processes are started by a launcher (`accelerate launch`, torchrun) and joined here through
torch.distributed, from the environment the launcher sets (RANK, WORLD_SIZE, MASTER_ADDR, ...);
rlkit starts no process itself. `join()` makes the group once per process (and leaves it when
the process exits).

The model is global-view SPMD: every process runs the same program on the same full batch, and
the learner splits each call's work. `split` cuts a list into one contiguous block per process
(balanced by a cost per item, the same cut in every process); each process works on its block and
`all_gather` puts the results back together, in order, on every process. The learner sums the
adapter's gradients over the group before each optimizer step, so every process takes the
identical step. `map_items` does the same for plain Python work (rewards, env steps, grading).

In one process (no launcher), `join()` makes no group and every method here is a local no-op,
so a single-process run computes exactly what it always did.

CPU tensors go over gloo; on GPUs the gradients go over NCCL ("cpu:gloo,cuda:nccl"). A peer
that dies makes the next collective fail (its connection drops) or, where nothing notices,
time out after `timeout_s`; either way a `PeerLostError` names this rank and the operation.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlkit.api.errors import PeerLostError

# Environment variables of the launcher recorded in the manifest (what decides the layout).
LAUNCHER_ENV = (
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
    "ACCELERATE_MIXED_PRECISION",
    "ACCELERATE_USE_CPU",
)


@dataclass
class Processes:
    """This process's place in a data-parallel run: rank `rank` of `world_size`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # The torch.distributed group the run's collectives use; None: the default group (looked up
    # at each call, so no reference to it outlives its owner's destroy_process_group).
    group: Any = None
    # A second group over the same processes, for collectives made outside the main thread
    # (asynchronous RL samples in a background thread while the main one trains): each
    # thread's collectives come in the same order in every process, the two threads' do not.
    side_group: Any = None
    # Collectives fail after this many seconds; None: torch's default (30 min).
    timeout_s: float | None = None

    @property
    def is_main(self) -> bool:
        """The process that writes outputs, the manifest and checkpoints."""
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        return dist.get_backend(self.group) if self.world_size > 1 else None

    def split(self, costs: Sequence[float]) -> tuple[int, int]:
        """This process's block `[start, stop)` of items with these costs: contiguous blocks,
        one per process in rank order, cut where the running cost best passes k/N of the total
        (equal counts when every cost is equal). Neighbours stay together: the completions of
        one prompt share its prefix pass in the learner."""
        n, world = len(costs), self.world_size
        if world == 1:
            return 0, n
        total = float(sum(costs))
        cuts, running, i = [0], 0.0, 0
        for k in range(1, world):
            target = total * k / world
            while i < n and running + costs[i] / 2 <= target:
                running += costs[i]
                i += 1
            cuts.append(max(i, cuts[-1]))
        cuts.append(n)
        return cuts[self.rank], cuts[self.rank + 1]

    def all_gather(self, obj: Any, what: str = "gather") -> list[Any]:
        """Every process's `obj`, in rank order, on every process."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._run(what, dist.all_gather_object, out, obj, group=self._group())
        return out

    def map_items(self, fn: Callable[[Any], Any], items: Sequence, what: str) -> list[Any]:
        """`[fn(x) for x in items]` on every process, each item computed by one process only.
        An exception in `fn` is raised where it happened; the others then fail in the gather,
        naming the operation (PeerLostError)."""
        start, stop = self.split([1.0] * len(items))
        mine = [fn(x) for x in items[start:stop]]
        return self.concat(mine, what)

    def concat(self, block: list, what: str = "gather") -> list:
        """Every process's `block`, joined in rank order, on every process (the whole list,
        when each process computed its `split` block of it)."""
        return [item for part in self.all_gather(block, what) for item in part]

    def broadcast(self, obj: Any = None, what: str = "broadcast") -> Any:
        """The main process's `obj`, on every process."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        self._run(what, dist.broadcast_object_list, box, src=0, group=self._group())
        return box[0]

    def sum(self, value: float, what: str = "sum") -> float:
        """`value` summed over the processes, in float64 (exact for counts)."""
        if self.world_size == 1:
            return value
        total = torch.tensor([float(value)], dtype=torch.float64)
        self._run(what, dist.all_reduce, total, group=self._group())
        return float(total)

    def any(self, flag: bool, what: str = "any") -> bool:
        """True on every process when any process passes True."""
        return self.sum(float(bool(flag)), what) > 0

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Every parameter's gradient becomes, in place, its sum over the processes; a process
        with no gradient (all its groups skipped) contributes zeros. One flat all-reduce per
        step: one message, and the same summation order every time."""
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._run("gradient sum", dist.all_reduce, flat, group=self.group)
        offset = 0
        for param, grad in zip(params, grads, strict=True):
            param.grad = flat[offset : offset + grad.numel()].view_as(grad)
            offset += grad.numel()

    def _group(self):
        if threading.current_thread() is threading.main_thread() or self.side_group is None:
            return self.group
        return self.side_group

    def _run(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except (RuntimeError, pickle.UnpicklingError, ConnectionError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PeerLostError(
                f"rank {self.rank} of {self.world_size}: the {what} across processes failed "
                f"({first[:200]}). Another process died or stopped responding; the launcher's "
                "report names which rank failed first"
            ) from exc


# The process's group, once joined; one process (no group) until then.
_CURRENT = Processes()


def launched() -> bool:
    """Whether a launcher started this process as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(timeout_s: float | None = None) -> Processes:
    """This process's place in the run: joins the launcher's process group on the first call
    (WORLD_SIZE > 1), with collectives that fail after `timeout_s` (torch's default: 30 min);
    a later call with a timeout makes the run's group with it. One process: rank 0 of 1."""
    global _CURRENT
    if not launched():
        return current()  # one process, or a group the caller made itself
    timeout = timedelta(seconds=timeout_s) if timeout_s else None
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        options = {"timeout": timeout} if timeout else {}
        dist.init_process_group(backend, **options)
        atexit.register(leave)
        _CURRENT = Processes(
            dist.get_rank(),
            dist.get_world_size(),
            int(os.environ.get("LOCAL_RANK", "0")),
            None,
            dist.new_group(**options),
            timeout_s,
        )
    elif timeout is not None:
        _CURRENT = replace(
            current(),
            group=dist.new_group(timeout=timeout),
            side_group=dist.new_group(timeout=timeout),
            timeout_s=timeout_s,
        )
    return _CURRENT


def leave() -> None:
    """Destroy the group this module made, at exit: a gloo group left to the interpreter's
    teardown can abort the process after its work is done (`terminate called without an active
    exception`), which the launcher reports as a failed rank."""
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # exiting anyway; a dead peer must not stop it
            dist.destroy_process_group()
    _CURRENT = Processes()


def current() -> Processes:
    """The run's processes; a group made by other code (a user's own init_process_group, e.g.
    through accelerate) counts too, so the learner sums gradients over it."""
    global _CURRENT
    if _CURRENT.world_size > 1 and not dist.is_initialized():  # its owner destroyed it
        _CURRENT = Processes()
    if _CURRENT.world_size == 1 and dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # No side group: the caller owns this group and destroys it; a group of ours alive past
        # that aborts the process at exit. Collectives off the main thread share the group.
        _CURRENT = Processes(dist.get_rank(), dist.get_world_size(), local_rank)
    return _CURRENT


def device(requested: str | None) -> str | None:
    """The device of this process: a requested `cuda` (or none, on a GPU machine) becomes this
    process's own GPU (LOCAL_RANK) when several processes run on one node."""
    if not launched() or not torch.cuda.is_available():
        return requested
    if requested in (None, "cuda"):
        return f"cuda:{current().local_rank}"
    return requested


def lost_processes() -> str | None:
    """A warning when a launcher was asked for several processes but started one:
    `accelerate launch --cpu --num_processes N` runs a single process (its CPU launcher), which
    sets no WORLD_SIZE; the parent's command line says what was asked for."""
    if launched() or os.environ.get("ACCELERATE_USE_CPU") != "True":
        return None
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    asked = next(
        (
            argv[i + 1]
            for i, a in enumerate(argv[:-1])
            if a in ("--num_processes", "--num-processes")
        ),
        "1",
    )
    if not asked.isdigit() or int(asked) < 2:
        return None
    return (
        f"warning: accelerate launch was asked for {asked} processes, but with --cpu it starts "
        f"one: this run is 1 process. For {asked} processes on CPU (gloo), launch with "
        f"--multi_gpu --num_processes {asked}"
    )


def launcher_info() -> dict[str, Any]:
    """For the manifest: world size, backend and the launcher's settings (one process: the
    world size alone)."""
    if current().world_size == 1:
        return {"world_size": 1}
    return {
        "world_size": _CURRENT.world_size,
        "backend": _CURRENT.backend,
        "timeout_s": _CURRENT.timeout_s,
        "launcher_env": {k: os.environ.get(k) for k in LAUNCHER_ENV},
    }
