"""A sweep's arms trained together, as adapters on one base model (`hydra/launcher=adapters`).

    python -m rlkit -m recipe=pair_sum optim.lr=1e-4,3e-4 seed=0,1 hydra/launcher=adapters

Hydra expands the sweep into jobs as usual (one run dir each, `.hydra/` included); this launcher
then runs `hydra.launcher.arms` of them at a time in one process: one copy of the base model,
each arm's run its own adapter, optimizer, seed, outputs and checkpoints, in a thread of its
own. The arms' calls take turns on the model, each with its own adapter, so every arm gets the
bits it gets when run alone (`python -m rlkit.repro compare` on the two run dirs).

`hydra.launcher.batch=true`: the arms' forward / forward_backward calls run as one pass instead,
and their samples as one decode (hf: per-row adapters, rlkit.backend.adapters.per_row; vLLM:
one `generate` with each arm's LoRA), once every arm waits on one. Each arm then equals its run alone to float rounding, and every rerun of the sweep gets the
same bits (which calls meet in a pass depends on the arms' own sequences of calls, not on
timing). A resumed batched sweep goes on from each arm's checkpoint; where the arms stopped at
different steps, its passes pair other steps than the uninterrupted sweep's: to rounding, not
bitwise, the same.

Arms may differ in anything an adapter can: optimizer, loss, rewards, seed, adapter rank and
alpha, steps, ... They may not differ in what the shared model and engine are (`model.*`,
`engine.*`, `determinism.*`): such a sweep is refused before anything runs, naming the key.

Ctrl-C / SIGTERM: every arm finishes its step and writes a checkpoint; rerunning the command
with `resume=auto` (and the same `hydra.sweep.dir`) resumes each arm from its own.
"""

from __future__ import annotations

import shlex
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlkit.run.outputs import console, progress_bar

# Config groups the arms share: one base model, one engine, one set of determinism switches.
SHARED = ("model", "engine", "determinism")


class SweepError(Exception):
    """A sweep the adapters launcher cannot run; the message is one line naming why."""


def check_arms(arms: int) -> int:
    if isinstance(arms, bool) or not isinstance(arms, int) or arms < 1:
        raise SweepError(
            f"hydra.launcher.arms must be a whole number >= 1 (arms trained at once), got {arms!r}"
        )
    return arms


def check_batch(batch: bool) -> bool:
    if not isinstance(batch, bool):
        raise SweepError(f"hydra.launcher.batch must be true or false, got {batch!r}")
    return batch


def check_shared(configs: list[DictConfig], names: list[str]) -> None:
    """Refuse arms that cannot share one model: the first key they differ in, named."""
    for cfg, name in zip(configs, names, strict=True):
        if cfg.get("max_steps_off_policy", 0):
            raise SweepError(
                f"hydra/launcher=adapters runs its arms' steps synchronously, but arm {name!r} "
                f"has max_steps_off_policy={cfg.max_steps_off_policy} (its background sampling "
                "would wait for the arms' turns); set it to 0, or use hydra/launcher=basic"
            )
    first = _leaves(configs[0])
    for cfg, name in zip(configs[1:], names[1:], strict=True):
        other = _leaves(cfg)
        for key in sorted(first.keys() | other.keys()):
            if first.get(key) != other.get(key):
                raise SweepError(
                    f"hydra/launcher=adapters trains the arms on one base model and engine, but "
                    f"arm {names[0]!r} and arm {name!r} differ in {key} "
                    f"({first.get(key)!r} vs {other.get(key)!r}); sweep that key with the "
                    "basic launcher (hydra/launcher=basic)"
                )


def _leaves(cfg: DictConfig) -> dict[str, Any]:
    out = {}
    for group in SHARED:
        node = OmegaConf.to_container(cfg[group], resolve=True) if group in cfg else None
        for key, value in (node or {}).items():
            out[f"{group}.{key}"] = value
    return out


@dataclass
class Job:
    """One arm: its config (without Hydra's node), run dir and name (its overrides)."""

    cfg: DictConfig
    run_dir: Path
    name: str
    outcome: str = "not run"  # "done", "stopped", or the error's one line
    summary: Any = None


def train_arms(jobs: list[Job], arms: int, train: Callable, batch: bool = False) -> None:
    """Run the jobs `arms` at a time, each group as adapters on one base, each job as
    `train(cfg, run_dir, arm)` (rlkit.rl.loop.train); every job's `outcome` says how it ended.
    `batch`: the group's forward_backward and sample calls run batched (else they take turns).
    Ctrl-C / SIGTERM: every running arm checkpoints and stops, and no further group starts."""
    from rlkit.run.checkpoint import STOP, stop_on_signals

    @stop_on_signals
    def run_all() -> None:
        for start in range(0, len(jobs), arms):
            if STOP.requested:
                return
            _train_group(jobs[start : start + arms], arms, train, batch)

    run_all()


def _train_group(group: list[Job], arms: int, train: Callable, batch: bool) -> None:
    import rlkit
    from rlkit.run.session import Arm

    # The client whose base models the arms share (each arm's Session makes its own client,
    # with its own settings and checkpoint dir, sharing this one's bases).
    service = rlkit.ServiceClient()
    display = progress_bar()
    threads = []
    for job in group:
        index = int(job.run_dir.name) if job.run_dir.name.isdigit() else len(threads)
        arm = Arm(index, arms, service, display, batch)
        threads.append(
            threading.Thread(
                target=service.in_turn,
                args=(_run_arm, job, arm, train),
                name=f"arm-{index}",
                daemon=True,
            )
        )
    with display:
        # The arms' model work runs here, in the main thread (faster than in any other, and
        # one at a time); the main thread stays free for Ctrl-C / SIGTERM between calls.
        service.serve_calls_here(
            until=lambda: not any(t.is_alive() for t in threads),
            start=lambda: [t.start() for t in threads],
            parties=threads if batch else None,
        )


def print_resume(sweep_dir: str) -> None:
    """How to go on after Ctrl-C / SIGTERM: the same command, resuming every arm."""
    kept = [a for a in sys.argv[1:] if not a.startswith(("resume=", "hydra.sweep.dir="))]
    command = ["python", "-m", "rlkit", *kept, f"hydra.sweep.dir={sweep_dir}", "resume=auto"]
    console.print(
        f"sweep stopped: every arm wrote a checkpoint. Continue with:\n  {shlex.join(command)}"
    )


def _run_arm(job: Job, arm, train: Callable) -> None:
    from rlkit.api.errors import RlkitError
    from rlkit.run.schema import ConfigError

    try:
        job.summary = train(job.cfg, job.run_dir, arm)
        job.outcome = "done"
    except SystemExit as exc:  # a stopped run: its checkpoint is written
        job.outcome = "stopped" if exc.code in (0, None) else f"error: {exc.code}"
    except ConfigError as exc:
        job.outcome = f"config error: {exc}"
    except RlkitError as exc:
        job.outcome = f"error: {exc}"
    except Exception as exc:  # a bug: the arm's traceback, the other arms go on
        console.print_exception()
        job.outcome = f"error: {type(exc).__name__}: {exc}"
