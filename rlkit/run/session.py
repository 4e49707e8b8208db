"""A run's plumbing, opened from its config, so the RL loop holds none of it.

`Session.open` checks the run dir, seeds the RNGs and sets the determinism switches, makes the
training client through the client API, restores a checkpoint (`resume=auto`), and writes the
manifest and config; `steps()` hands out the RL steps still to run, checkpointing when due;
`log` writes one step's metrics everywhere they go; `finish` saves the adapter, the plot and the
summary. Used as a context manager, it closes every output on the way out, crash or not.

With several processes (a launcher's), every process opens a session and runs the same loop;
only the main one writes outputs, the manifest and checkpoints, and shows progress. The others
log nothing. The loop never asks which process it is in: that is this file's business.

A run can also be one arm of a sweep trained beside the others as adapters on one base model
(`hydra/launcher=adapters`, rlkit.run.arms): its `Arm` says whose base models to share and where
to show progress; everything else is the run's own.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress, TaskID

import rlkit
import rlkit.client
from rlkit.api.errors import RlkitError
from rlkit.run import seeds
from rlkit.run.build import adapter_args, as_callable, plain, quant_args, service_args
from rlkit.run.checkpoint import Checkpointer, Resumed, take
from rlkit.run.manifest import write_manifest
from rlkit.run.outputs import (
    MetricsWriter,
    NullWriter,
    console,
    finite,
    plot_curves,
    progress_bar,
)
from rlkit.run.rundir import RunLock


@dataclass(frozen=True)
class Arm:
    """This run is arm `index` of `arms` trained together as adapters on one base."""

    index: int
    arms: int
    # The client whose base models every arm's client shares.
    service: rlkit.ServiceClient
    # The sweep's one progress display (one task per arm and phase).
    display: Progress
    # The arms' forward_backward calls run as one pass (their bits depend on each other's).
    batch: bool = False

    def manifest(self) -> dict:
        return {"launcher": "adapters", "arms": self.arms, "arm": self.index, "batch": self.batch}


@dataclass
class Session:
    cfg: DictConfig
    run_dir: Path
    trainer: rlkit.TrainingClient
    checkpoints: Checkpointer
    metrics_out: MetricsWriter
    samples_out: MetricsWriter
    # Extra metric sinks (logger=wandb, ...).
    sinks: list[Any]
    # This process's rank among the run's processes (rank 0 of 1 without a launcher).
    processes: rlkit.client.Launch
    # Every RL step's metrics so far (a resumed run's included), for the plot and the summary.
    history: list[dict] = field(default_factory=list)
    _progress: Progress | None = None
    _task: TaskID | None = None
    _lock: RunLock | None = None
    _closing: list[Any] = field(default_factory=list)
    arm: Arm | None = None

    @classmethod
    def open(cls, cfg: DictConfig, run_dir: Path, arm: Arm | None = None) -> Session:
        run_dir = Path(run_dir)
        processes = rlkit.client.Launch.join(cfg.distributed.timeout_s)
        main = processes.is_main
        run_dir.mkdir(parents=True, exist_ok=True)
        # One run at a time in a run dir: held until the session closes.
        lock = RunLock(run_dir) if main else None
        try:
            return cls._open(cfg, run_dir, processes, lock, arm)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    @classmethod
    def _open(cls, cfg, run_dir: Path, processes, lock: RunLock | None, arm) -> Session:
        main = processes.is_main
        console.quiet = not main  # every process runs the loop: one of them speaks
        # Refuses a used run dir unless resume=auto.
        checkpoints = Checkpointer(run_dir, cfg, processes)
        seeds.apply_determinism(cfg)  # before any model or engine starts
        sinks = []
        if cfg.logger and main:
            runtime = {"run_dir": str(run_dir), "run_config": plain(cfg)}
            sinks.append(as_callable(cfg.logger, "logger", runtime=runtime))
        service = rlkit.ServiceClient(
            checkpoint_dir=run_dir / "checkpoints",
            shares_with=arm.service if arm else None,
            **service_args(cfg),
        )
        trainer = service.create_lora_training_client(
            cfg.model.base_model,
            seed=cfg.seed,
            **adapter_args(cfg.adapter),
            **quant_args(cfg.model),
        )
        resumed = checkpoints.resume(trainer)  # weights, optimizer, RNGs, outputs so far
        if main:
            write_manifest(
                run_dir,
                cfg,
                service.device,
                service.dtype,
                service.engine.name,
                checkpoints.resumed_from,
                segment_start=resumed.step,
                processes=processes.info(),
                sweep=arm.manifest() if arm else None,
            )
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        return cls(
            cfg,
            run_dir,
            trainer,
            checkpoints,
            MetricsWriter(run_dir / "metrics.jsonl", timings=run_dir / "timings.jsonl")
            if main
            else NullWriter(),
            MetricsWriter(run_dir / "samples.jsonl") if main else NullWriter(),
            sinks,
            processes,
            history=resumed.history,
            _lock=lock,
            arm=arm,
        )

    @property
    def resumed(self) -> Resumed:
        return self.checkpoints.resumed

    @property
    def stopped(self) -> bool:
        """Ctrl-C / SIGTERM stopped the run (after writing a checkpoint)."""
        return self.checkpoints.stopped

    def steps(self) -> Iterator[int]:
        """The RL steps still to run, from the resumed one. Before each step, and after the
        last, a checkpoint is written when due; after Ctrl-C / SIGTERM the steps end there."""
        if self.processes.is_main:
            if self.arm is None:
                self._progress = progress_bar()
                self._progress.start()
            else:
                self._progress = self.arm.display
            self._task = self._progress.add_task(
                self._label("RL"), total=self.cfg.steps, completed=self.resumed.step, status=""
            )
        for step in range(self.resumed.step, self.cfg.steps):
            if self.checkpoints.reached(step):
                return
            yield step
        self.checkpoints.reached(self.cfg.steps)

    def log(self, metrics: dict[str, Any]) -> None:
        """One step's metrics: history, metrics.jsonl (+ timings.jsonl), sinks, progress bar
        (the main process's; the others' `log` does nothing)."""
        if not self.processes.is_main:
            return
        self.history.append(metrics)
        self.metrics_out.write(metrics)
        for sink in self.sinks:
            sink.log(metrics["step"], metrics)
        if self._progress is not None:
            done = min(metrics["step"] + 1, self.cfg.steps)
            self._progress.update(self._task, completed=done, status=self._status())

    def progress(self) -> Progress:
        """A progress bar, shown by the main process (a silent one elsewhere); a sweep arm's
        tasks go to the sweep's display."""
        if self.arm is not None:
            return _Tasks(self.arm.display, self._label(""))
        return progress_bar(show=self.processes.is_main)

    def _label(self, what: str) -> str:
        return f"arm {self.arm.index} {what}".strip() if self.arm else what

    def keep_adapter(self, name: str, dest: Path) -> None:
        """The adapter as it is now, written to `dest` (by the main process); every process
        returns once it is there."""
        if self.processes.is_main:
            self._write_adapter(name, dest)
        self.processes.barrier(f"{name} saved")

    def keep_policy(self, version: int, needed: range) -> None:
        """Asynchronous RL: the adapter as it is now is policy `version`; keep it (with the
        other policies in `needed`, the ones later steps are still sampled by) where the next
        checkpoint copies it from. Older ones are deleted."""
        if not self.processes.is_main:
            return
        live = self.checkpoints.policies_dir
        live.mkdir(parents=True, exist_ok=True)
        if not self.checkpoints.policy_dir(version).exists():
            self._write_adapter(f"policy_{version:06d}", self.checkpoints.policy_dir(version))
        for old in sorted(live.iterdir()):
            if old.name.isdigit() and int(old.name) not in needed:
                shutil.rmtree(old, ignore_errors=True)

    def policy_path(self, version: int) -> Path:
        """Where policy `version` is kept (restored there from the checkpoint on resume)."""
        path = self.checkpoints.policy_dir(version)
        if not path.is_dir():
            raise RlkitError(
                f"max_steps_off_policy: policy {version}, which samples a step still to run, is "
                f"missing from {path} (a checkpoint from a run with a smaller "
                "max_steps_off_policy?); resume with the run's own max_steps_off_policy"
            )
        return path

    def _write_adapter(self, name: str, dest: Path) -> None:
        """The trainer's adapter as it is now, saved for sampling and moved to `dest` (only
        `dest` is left: the client's own folders under checkpoints/ are removed)."""
        saved = self.trainer.save_weights_for_sampler(name).result().path
        take(saved, dest, self.checkpoints.dir)

    def write_samples(self, records: list[dict]) -> None:
        for record in records:
            self.samples_out.write(record)

    def finish(self) -> dict[str, float]:
        """After the last step: the adapter, the plot and summary.json; returns the summary (the
        main process's; an empty one on the others)."""
        self._stop_progress()
        if not self.processes.is_main:
            return {}
        self._write_adapter("final", self.run_dir / "adapter")
        plot_curves(self.history, self.run_dir / "curves.png", title=str(self.run_dir.name))
        return summarize(self.history, self.run_dir)

    def _stop_progress(self) -> None:
        if self._progress is not None and self.arm is None:  # an arm's is the sweep's
            self._progress.stop()
        self._progress = None

    def closing(self, thing):
        """`thing`, whose `close()` runs when the session closes (first), crash or not."""
        self._closing.append(thing)
        return thing

    def close(self) -> None:
        for thing in reversed(self._closing):
            thing.close()
        self._stop_progress()
        self.metrics_out.close()
        self.samples_out.close()
        for sink in self.sinks:
            sink.close()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _status(self) -> str:
        rewards = [h["reward/mean"] for h in self.history if finite(h.get("reward/mean"))]
        accs = [h["train/accuracy"] for h in self.history if finite(h.get("train/accuracy"))]
        evals = [h["eval/accuracy"] for h in self.history if "eval/accuracy" in h]
        parts = [
            f"reward {rewards[-1]:.3f}" if rewards else "",
            f"acc {accs[-1]:.2f}" if accs else "",
            f"eval acc {evals[-1]:.2f}" if evals else "",
        ]
        return "  ".join(p for p in parts if p)


class _Tasks:
    """Tasks on a display someone else started and stops: `with` adds nothing, ends nothing."""

    def __init__(self, display: Progress, label: str) -> None:
        self.display, self.label = display, label

    def __enter__(self) -> _Tasks:
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def add_task(self, description: str, **kwargs) -> TaskID:
        return self.display.add_task(f"{self.label} {description}", **kwargs)

    def update(self, task: TaskID, **kwargs) -> None:
        self.display.update(task, **kwargs)


def summarize(history: list[dict], run_dir: Path) -> dict[str, float | None]:
    """summary.json: start and final eval accuracy, first and last rewards; null (never NaN,
    which is not JSON) for what the run has none of, e.g. rewards when every group was skipped."""
    evals = [h["eval/accuracy"] for h in history if finite(h.get("eval/accuracy"))]
    rewards = [h["reward/mean"] for h in history if finite(h.get("reward/mean"))]
    last5 = rewards[-5:]
    summary = {
        "eval/accuracy_start": evals[0] if evals else None,
        "eval/accuracy_final": evals[-1] if evals else None,
        "reward/mean_first": rewards[0] if rewards else None,
        "reward/mean_last5": sum(last5) / len(last5) if last5 else None,
        "steps": len(history) - 1,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    s = {k: "n/a" if v is None else f"{v:.3f}" for k, v in summary.items()}
    console.print(
        f"[bold]done[/bold]: eval accuracy {s['eval/accuracy_start']} -> "
        f"{s['eval/accuracy_final']}; mean reward {s['reward/mean_first']} -> "
        f"{s['reward/mean_last5']} (last 5 steps). Outputs in {run_dir}"
    )
    return summary
