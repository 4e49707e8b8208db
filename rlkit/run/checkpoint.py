"""Atomic checkpoints, exact resume, and a graceful stop on Ctrl-C / SIGTERM.

A checkpoint is `RUN_DIR/checkpoints/step_NNNNNN/`: everything needed to go on from RL step N
(N steps done) exactly as if the run had never stopped.

    state/               the training client's `save_state`: adapter (peft, safetensors),
                         optimizer (tensors only; read back with torch.load(weights_only=True),
                         which refuses any pickled object), the learner's step
    rng.safetensors      torch RNG states (CPU, every CUDA device)
    trainer_state.json   the step, python and numpy RNG states, the resolved config
    outputs/             metrics.jsonl, timings.jsonl, samples.jsonl as they were at step N
    checksums.json       sha256 of every file above; written last: a checkpoint is complete when
                         it exists and every file matches

The supervised warm start (`warmup.steps`), when there is one, leaves its adapter in
`RUN_DIR/checkpoints/warm_start/` (save_weights_for_sampler's format): the policy RL starts
from, and the KL penalty's reference (`kl.reference=start`), also after a resume.

Problems and sampling seeds are derived from (seed, step, ...) (see rlkit.run.seeds), so there is no
data position to save: the step is the position.

Writing goes to `.tmp-step_NNNNNN-PID/`, every file and directory is fsynced, the directory is
renamed into place, and the `latest` pointer file is replaced last; then checkpoints beyond
`keep_last` are deleted. A crash at any point leaves the earlier checkpoints intact and at worst
a `.tmp-*` directory, which resume deletes.

Resume (`resume=auto`) takes the newest checkpoint that verifies; a corrupt or partial one, or
one holding a pickled object, is skipped with a warning for the one before it. The run's output
files are rewritten from the checkpoint's copies, so metrics.jsonl ends up byte-identical to an
uninterrupted run's.

Fault injection for tests: RLKIT_FAULT=kill-in-checkpoint:N makes the process SIGKILL itself
halfway through writing the checkpoint of step N; RLKIT_FAULT=kill-rank:R:step:N makes the
process of rank R SIGKILL itself before RL step N (a process of a data-parallel run dying);
RLKIT_FAULT=sigterm-in-warmup:N sends the process SIGTERM after N supervised steps of the warm
start; RLKIT_FAULT=disk-full-in-checkpoint:N fails the checkpoint of step N with ENOSPC, half
written.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import pickle
import random
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import DictConfig
from rich.markup import escape
from safetensors.torch import load_file, save_file

from rlkit.api.errors import RlkitError
from rlkit.client import Launch
from rlkit.run.build import plain
from rlkit.run.manifest import NOT_HASHED, flatten
from rlkit.run.outputs import console, read_history
from rlkit.run.schema import ConfigError

OUTPUT_FILES = ("metrics.jsonl", "timings.jsonl", "samples.jsonl")
CHECKSUMS = "checksums.json"
PREFIX = "step_"


@dataclass
class Resumed:
    """Where a run starts: step 0 of a fresh run, or the step of the checkpoint it restored."""

    step: int = 0
    # The checkpoint directory restored from; None for a fresh run.
    path: Path | None = None
    # The RL steps' metrics (with timings) before `step`, so plots and summaries continue.
    history: list[dict] = field(default_factory=list)
    # Set when the run stopped during the warm start: {"done": supervised steps done, "rng":
    # the warm start's problem RNG state before its next batch}.
    warmup: dict | None = None


class Checkpointer:
    """Saves and restores a run's checkpoints under `run_dir/checkpoints`."""

    def __init__(self, run_dir: Path, cfg: DictConfig, processes: Launch | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.cfg = cfg
        # With several processes, only the main one writes and chooses; the others follow it.
        self.processes = processes or Launch()
        self.trainer = None  # set by resume()
        self._saving: Path | None = None  # the client's copy of a state being checkpointed
        self.every = cfg.checkpoint.every
        self.keep_last = cfg.checkpoint.keep_last
        self.resumed = Resumed()
        self.stopped = False
        used = self.processes.is_main and (
            cfg.resume == "never"
            and (self.checkpoints() or (self.run_dir / OUTPUT_FILES[0]).exists())
        )
        if self.processes.broadcast(used, "run dir check"):
            raise ConfigError(
                f"{self.run_dir} already holds a run; continue it with resume=auto, "
                "or choose another hydra.run.dir"
            )

    # ---- the hook the training loop calls ------------------------------------------------------
    def reached(self, step: int) -> bool:
        """Call before RL step `step` (when `step` steps are done): writes a checkpoint when one
        is due, and returns True, after writing one, if Ctrl-C / SIGTERM asked the run to stop.
        With several processes they agree first: all stop after the same step when any was
        asked to, and the main process writes the one checkpoint."""
        _fault_point(f"kill-rank:{self.processes.rank}:step:{step}")
        stop = self.processes.any(STOP.requested is not None, "stop flag")
        due = step == self.cfg.steps or (self.every and step % self.every == 0) or stop
        # (A checkpoint taken during the warm start is not the one of RL step 0.)
        on_disk = self.resumed.path and step == self.resumed.step and not self.resumed.warmup
        if due and not on_disk and self.processes.is_main:
            self.save(step)
        if stop:
            self.stopped = True
            if self.processes.is_main:
                _say(
                    f"[bold]stopped[/bold] by {STOP.requested or 'another process'} with {step} "
                    f"of {self.cfg.steps} RL steps done; checkpoint in "
                    f"{escape(str(self.dir))}. Continue with:\n  "
                    + escape(resume_command(self.run_dir, self.processes.world_size))
                )
        return self.stopped

    def stop_in_warmup(self, done: int, rng_state) -> bool:
        """Call after each supervised step of the warm start (`done` of them so far): after
        Ctrl-C / SIGTERM, writes a checkpoint holding the warm start's progress (`done` and its
        problem RNG's state `rng_state`, before its next batch) and returns True; resume=auto
        continues the warm start from there."""
        _fault_point(f"sigterm-in-warmup:{done}", signal.SIGTERM)
        if not self.processes.any(STOP.requested is not None, "stop flag"):
            return False
        if self.processes.is_main:
            self.save(0, warmup={"done": done, "rng": rng_state})
            _say(
                f"[bold]stopped[/bold] by {STOP.requested or 'another process'} during the warm "
                f"start, with {done} of {self.cfg.warmup.steps} supervised steps done; "
                f"checkpoint in {escape(str(self.dir))}. Continue with:\n  "
                + escape(resume_command(self.run_dir, self.processes.world_size))
            )
        self.stopped = True
        return True

    # ---- saving --------------------------------------------------------------------------------
    def save(self, step: int, warmup: dict | None = None) -> Path:
        """Write the checkpoint of RL step `step` (`warmup`: the warm start's progress, when it
        is taken during the warm start). A full disk is one error naming the disk and the last
        good checkpoint, with nothing left behind."""
        name = f"{PREFIX}{step:06d}"
        tmp = self.dir / f".tmp-{name}-{os.getpid()}"
        try:
            return self._save(name, tmp, step, warmup)
        except Exception as exc:
            if not _disk_full(exc):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_leftovers(self.dir, self._saving)
            free = shutil.disk_usage(self.dir).free
            last = latest_checkpoint(self.run_dir)
            raise CheckpointError(
                f"disk full: checkpoint {name} could not be written to {self.dir} "
                f"({free / 2**20:.1f} MiB free on that disk); the last good checkpoint is "
                f"{last or 'none (no checkpoint yet)'}. Free some space, then continue with "
                "resume=auto"
            ) from None

    def _save(self, name: str, tmp: Path, step: int, warmup: dict | None) -> Path:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._saving = None
        saved = self._saving = Path(self.trainer.save_state(name).result().path)
        if os.environ.get("RLKIT_FAULT") == f"disk-full-in-checkpoint:{step}":
            raise OSError(errno.ENOSPC, "No space left on device (RLKIT_FAULT)", saved)
        take(saved, tmp / "state", self.dir)
        self._saving = None
        save_file(torch_rng_states(), tmp / "rng.safetensors")
        trainer_state = {
            "step": step,
            "world_size": self.processes.world_size,
            "python_rng": random.getstate(),
            "numpy_rng": _numpy_state(),
            "config": plain(self.cfg),
        }
        if warmup is not None:
            trainer_state["warmup"] = warmup
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
        k = self.cfg.get("max_steps_off_policy", 0)
        for version in range(max(0, step - k), step) if k and warmup is None else []:
            source = self.policy_dir(version)
            shutil.copytree(source, tmp / "policies" / source.name)
        (tmp / "outputs").mkdir()
        for file in OUTPUT_FILES:
            if (self.run_dir / file).exists():
                shutil.copy2(self.run_dir / file, tmp / "outputs" / file)
        _fault_point(f"kill-in-checkpoint:{step}")
        sums = {p.relative_to(tmp).as_posix(): sha256(p) for p in sorted(_files(tmp))}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1, sort_keys=True))
        for path in [*_files(tmp), *_dirs(tmp)]:
            _fsync(path)
        final = self.dir / name
        if final.exists():  # a step saved again (a run restarted from scratch): replace it
            trash = self.dir / f".tmp-old-{name}-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(tmp, final)
        _fsync(self.dir)
        pointer = self.dir / f".latest-{os.getpid()}"
        pointer.write_text(name + "\n")
        _fsync(pointer)
        os.replace(pointer, self.dir / "latest")
        _fsync(self.dir)
        # Only older ones: newer ones (left by a run that fell back past them) are overwritten.
        older = [p for p in self.checkpoints() if _step_of(p) < step]
        for old in older[self.keep_last - 1 :]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def checkpoints(self) -> list[Path]:
        """Checkpoint directories, newest first (complete or not: see `verify`)."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.glob(f"{PREFIX}*") if p.is_dir() and _step_of(p) >= 0]
        return sorted(found, key=_step_of, reverse=True)

    # ---- resuming ------------------------------------------------------------------------------
    def resume(self, trainer) -> Resumed:
        """Restore `trainer` and the run's outputs from the newest complete checkpoint when
        `cfg.resume` is auto; a fresh start (step 0) otherwise or when there is none. With
        several processes the main one chooses and restores the outputs; every other process
        restores the trainer from the checkpoint it chose."""
        self.trainer = trainer
        if self.processes.is_main:
            self._resume_main()
        chosen = self.processes.broadcast(self.resumed.path, "checkpoint choice")
        if not self.processes.is_main and chosen is not None:
            state = self._restore_trainer(Path(chosen))
            self.resumed = Resumed(state["step"], Path(chosen), warmup=state.get("warmup"))
        return self.resumed

    def _resume_main(self) -> None:
        for partial in self.dir.glob(".tmp-*") if self.dir.is_dir() else []:
            _say(f"[yellow]removing partial checkpoint {escape(str(partial))}")
            shutil.rmtree(partial, ignore_errors=True)
        for pointer in self.dir.glob(".latest-*") if self.dir.is_dir() else []:
            pointer.unlink(missing_ok=True)
        candidates = self.checkpoints() if self.cfg.resume == "auto" else []
        for path in candidates:
            problem = verify(path) or self._load(path)
            if problem is None:
                return
            _say(f"[yellow]warning: skipping checkpoint {escape(str(path))}: {escape(problem)}")
        if candidates:
            _say(
                f"[yellow]warning: no complete checkpoint in {escape(str(self.dir))}; starting over"
            )
        elif self.cfg.resume == "auto":
            _say(f"resume=auto: no checkpoint in {escape(str(self.dir))} yet; starting at step 0")
        self._fresh()

    @property
    def policies_dir(self) -> Path:
        """Asynchronous RL's policies that later steps are sampled by (`Session.keep_policy`):
        a checkpoint copies those its next steps need, and resume puts them back here."""
        return self.dir / "policies"

    def policy_dir(self, version: int) -> Path:
        return self.policies_dir / f"{version:06d}"

    def _fresh(self) -> Resumed:
        shutil.rmtree(self.policies_dir, ignore_errors=True)
        for file in OUTPUT_FILES:
            (self.run_dir / file).unlink(missing_ok=True)
        self.resumed = Resumed()
        return self.resumed

    def _load(self, path: Path) -> str | None:
        """Restore the checkpoint at `path` (already verified); a reason if it is refused."""
        state = json.loads((path / "trainer_state.json").read_text())
        check_fixed_keys(state["config"], plain(self.cfg), path)
        try:
            self._restore_trainer(path)
        except pickle.UnpicklingError:
            # Not torch's message: it suggests weights_only=False, the wrong advice for a
            # file nobody vouches for.
            return (
                "refused: it holds a pickled object, not plain tensors (torch.load with "
                "weights_only=True rejected it; it was not unpickled)"
            )
        except Exception as exc:  # garbage that still matched its checksum: as unreadable
            first = (str(exc).strip().splitlines() or [""])[0]
            return f"unreadable ({type(exc).__name__}: {first})"
        for file in OUTPUT_FILES:
            saved, live = path / "outputs" / file, self.run_dir / file
            if saved.exists():
                shutil.copyfile(saved, live)
            else:
                live.unlink(missing_ok=True)
        shutil.rmtree(self.policies_dir, ignore_errors=True)
        if (path / "policies").is_dir():
            shutil.copytree(path / "policies", self.policies_dir)
        warn_config_changes(state["config"], plain(self.cfg))
        saved_world = state.get("world_size", 1)
        if saved_world != self.processes.world_size:
            _say(
                f"resuming a {saved_world}-process run with {self.processes.world_size}: the "
                "problems and sampling seeds are the same; the gradient sums' order is not, so "
                "the numbers match an uninterrupted run within rounding, not bit for bit"
            )
        history = read_history(self.run_dir / OUTPUT_FILES[0], self.run_dir / OUTPUT_FILES[1])
        self.resumed = Resumed(state["step"], path, history, state.get("warmup"))
        if self.resumed.warmup:
            done = self.resumed.warmup["done"]
            _say(f"resuming from {escape(str(path))} in the warm start, after step {done}")
        else:
            _say(f"resuming from {escape(str(path))} at RL step {state['step']}")
        return None

    def _restore_trainer(self, path: Path) -> dict:
        """The trainer's weights and optimizer, and the RNG states, from checkpoint `path`;
        returns its trainer_state.json."""
        self.trainer.load_state(str(path / "state")).result()
        state = json.loads((path / "trainer_state.json").read_text())
        set_torch_rng_states(load_file(path / "rng.safetensors"))
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        return state

    @property
    def resumed_from(self) -> dict | None:
        """For the manifest: which checkpoint this process started from."""
        if self.resumed.path is None:
            return None
        return {"checkpoint": str(self.resumed.path), "step": self.resumed.step}


def take(saved: str | Path, dest: Path, root: Path) -> Path:
    """Move what the client saved at `saved` to `dest`, then remove the client's folders that
    this left empty under `root`: checkpoints/ holds only what the docs list."""
    saved = Path(saved)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.move(saved, dest)
    parent = saved.parent
    while parent != root and root in parent.parents:
        try:
            parent.rmdir()
        except OSError:  # not empty: another client's files
            break
        parent = parent.parent
    return dest


class CheckpointError(RlkitError):
    """A checkpoint could not be written (e.g. the disk is full)."""


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC, as an OSError or in the message of a library's own error (safetensors')."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(exc)


def _remove_leftovers(root: Path, saved: Path | None) -> None:
    """What a failed save left under checkpoints/: the client's copy of the state (`saved`, when
    it got that far), then the client's folders left without files."""
    if saved is not None:
        shutil.rmtree(saved, ignore_errors=True)
    for child in root.iterdir() if root.is_dir() else []:
        kept = child.name.startswith(PREFIX) or child.name == "warm_start"
        if child.is_dir() and not kept and not any(p.is_file() for p in child.rglob("*")):
            shutil.rmtree(child, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `RUN_DIR/checkpoints/latest` points at, when it is there."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    try:
        path = pointer.parent / pointer.read_text().strip()
    except OSError:
        return None
    return path if path.is_dir() else None


def _say(message: str) -> None:
    console.print(message, soft_wrap=True)  # unwrapped: paths and commands stay copy-pastable


def verify(path: Path) -> str | None:
    """None when every file listed in checksums.json is there and matches; else the problem."""
    try:
        sums = json.loads((path / CHECKSUMS).read_text())
    except FileNotFoundError:
        return f"incomplete (no {CHECKSUMS}: the write did not finish)"
    except (OSError, ValueError) as exc:
        return f"unreadable {CHECKSUMS} ({exc})"
    for rel in ("trainer_state.json", "rng.safetensors", "state/adapter_model.safetensors"):
        if rel not in sums:
            return f"{CHECKSUMS} does not list {rel}"
    for rel, digest in sums.items():
        if not (path / rel).is_file():
            return f"{rel} is missing"
        if sha256(path / rel) != digest:
            return f"{rel} does not match its checksum (truncated or corrupt)"
    return None


# Keys a resumed run cannot change: the checkpoint's adapter only fits the same base and shape,
# and was trained on that base's quantization.
FIXED_ON_RESUME = (
    "model.base_model",
    "model.quantize",
    "model.quant_compute_dtype",
    "model.double_quant",
    "adapter.",
)


def config_changes(saved: dict, current: dict, keep=lambda key: True) -> list[str]:
    """`key (saved -> current)` for every flattened key that differs and `keep` accepts."""
    flat_saved, flat_now = flatten(saved), flatten(current)
    return [
        f"{k} ({flat_saved.get(k, '<absent>')!r} -> {flat_now.get(k, '<absent>')!r})"
        for k in sorted(flat_saved.keys() | flat_now.keys())
        if keep(k) and flat_saved.get(k, "<absent>") != flat_now.get(k, "<absent>")
    ]


def check_fixed_keys(saved: dict, current: dict, path: Path) -> None:
    """A ConfigError naming every key in FIXED_ON_RESUME that differs from the checkpoint's."""
    changed = config_changes(saved, current, lambda key: key.startswith(FIXED_ON_RESUME))
    if changed:
        raise ConfigError(
            f"cannot resume from {path} with a different {', '.join(changed)}: the checkpoint's "
            "adapter fits only the model and adapter it was trained with. Resume with the "
            "checkpoint's values, or start a new run dir"
        )


# Keys that do not change what a run computes: where and how often it writes, and how long it
# waits. A resume that changes only these gives the bits of an uninterrupted run.
NO_BITS = ("checkpoint.", "logger", "distributed.", "samples_every")


def changes_bits(key: str, config: dict) -> bool:
    """Whether changing `key` on resume changes the run's numbers. `steps` does only through a
    schedule that depends on it (optim.schedule=linear); a longer or shorter run otherwise
    computes the same steps."""
    if key.split(".")[0] in NOT_HASHED or key.startswith(NO_BITS):
        return False
    if key == "steps":
        return config.get("optim", {}).get("schedule") == "linear"
    return True


def warn_config_changes(saved: dict, current: dict) -> list[str]:
    """Warn, naming the keys, when the config differs from the checkpoint's in a key that
    changes the run's numbers (`changes_bits`)."""
    changed = config_changes(saved, current, lambda key: changes_bits(key, current))
    if changed:
        details = ", ".join(changed)
        _say(
            "[yellow]warning: resuming with a config that differs from the checkpoint's: "
            f"{escape(details)}; the run will not match an uninterrupted one"
        )
    return changed


def resume_command(run_dir: Path, world_size: int = 1) -> str:
    """The command that continues the run in `run_dir` (from Hydra's record of the overrides);
    a run of several processes continues under the launcher (any number of processes)."""
    overrides_file = Path(run_dir) / ".hydra" / "overrides.yaml"
    tail = [f"hydra.run.dir={run_dir}", "resume=auto"]
    start = ["python", "-m", "rlkit"]
    if world_size > 1:
        start = ["accelerate", "launch", "--num_processes", str(world_size), "-m", "rlkit"]
    if not overrides_file.exists():
        return shlex.join(start) + " YOUR_OVERRIDES " + shlex.join(tail)
    overrides = yaml.safe_load(overrides_file.read_text()) or []
    kept = [o for o in overrides if not o.startswith(("resume=", "hydra.run.dir="))]
    command = shlex.join([*start, *kept, *tail])
    if world_size > 1:
        command += "  (with the launcher options you started it with)"
    return command


# ---- RNG states -----------------------------------------------------------------------------------
def torch_rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda:{i}"] = state
    return states


def set_torch_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda:")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _step_of(path: Path) -> int:
    digits = path.name[len(PREFIX) :]
    return int(digits) if digits.isdigit() else -1


def _numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


# ---- files ----------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _dirs(root: Path) -> list[Path]:
    return [*(p for p in root.rglob("*") if p.is_dir()), root]


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (directories: where the OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def _fault_point(name: str, signum: int = signal.SIGKILL) -> None:
    """Fire fault `name` if RLKIT_FAULT asks for it: once per process (the arms of a sweep in
    one process each pass the same points)."""
    if os.environ.get("RLKIT_FAULT") == name and name not in _FIRED:
        _FIRED.add(name)
        what = signal.Signals(signum).name
        print(f"RLKIT_FAULT {name}: {what} at {time.time():.3f}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signum)


_FIRED: set[str] = set()


# ---- graceful stop --------------------------------------------------------------------------------
class _StopRequest:
    """Set by the first Ctrl-C / SIGTERM; a second one aborts at once."""

    requested: str | None = None
    at: float = 0.0


STOP = _StopRequest()
# A repeat this soon after the first signal is the same request arriving twice: Ctrl-C reaches
# a launcher and its processes at once, and the launcher then forwards its own copy.
REPEAT_WINDOW_S = 5.0


def _on_signal(signum, _frame) -> None:
    name = signal.Signals(signum).name
    if STOP.requested:
        if time.monotonic() - STOP.at < REPEAT_WINDOW_S:
            return
        signal.signal(signum, signal.SIG_DFL)
        raise KeyboardInterrupt(f"second {name}: stopping now, without a checkpoint")
    STOP.requested, STOP.at = name, time.monotonic()
    _say(
        f"[bold]{name}[/bold]: finishing the current step, then writing a checkpoint "
        "(send it again to stop at once)"
    )


def stop_on_signals(fn):
    """While `fn` runs (in the main thread), Ctrl-C and SIGTERM only set `STOP.requested`; the
    loop sees it through `Checkpointer.reached`. The previous handlers come back afterwards."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)
        STOP.requested = None
        previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return fn(*args, **kwargs)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            STOP.requested = None

    return wrapper
