"""Run outputs: metrics.jsonl (one line per step, flushed), sample completions, curve plots,
and the console progress bar. Extra metric sinks (logger=...) are their own files (`wandb_logger.py`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

console = Console(stderr=True)

# Curves drawn in curves.png, in this order, when present.
PLOT_KEYS = (
    "reward/mean",
    "train/accuracy",
    "eval/accuracy",
    "train/completion_tokens",
    "train/frac_skipped_groups",
    "train/entropy",
    "train/loss",
    "time/step",
)


class NullWriter:
    """A MetricsWriter that writes nothing (a process that is not the run's main one)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsWriter:
    """Appends one JSON line per record and flushes it, so a crash loses nothing written.

    With `timings`, wall-clock fields (`time/*`) go to that file instead, with the record's step:
    they differ from run to run, and keeping them apart lets two runs' metrics match byte for byte.
    """

    def __init__(self, path: Path, timings: Path | None = None) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._timings = MetricsWriter(timings) if timings else None

    def write(self, record: dict[str, Any]) -> None:
        if self._timings:
            times = {k: v for k, v in record.items() if k.startswith(TIME_PREFIX)}
            if times:
                self._timings.write({"step": record.get("step"), **times})
            record = {k: v for k, v in record.items() if k not in times}
        # NaN and inf are not JSON: a metric with no value this step is written as null.
        clean = {
            k: v if not isinstance(v, float) or math.isfinite(v) else None
            for k, v in record.items()
        }
        self._file.write(json.dumps(clean, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._timings:
            self._timings.close()


TIME_PREFIX = "time/"


def read_history(metrics: Path, timings: Path) -> list[dict]:
    """The RL steps' records (step >= 0) of metrics.jsonl, with their timings merged back in."""
    times = {r["step"]: r for r in read_jsonl(timings)}
    return [{**times.get(r["step"], {}), **r} for r in read_jsonl(metrics) if r["step"] >= 0]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict], path: Path, title: str = "") -> Path | None:
    """One panel per metric in PLOT_KEYS that has any finite value."""
    keys = [k for k in PLOT_KEYS if any(finite(r.get(k)) for r in records)]
    if not keys:
        return None
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        # A panel also shows its metric's breakdowns (eval/accuracy/n2, ... under eval/accuracy).
        parts = sorted({k for r in records for k in r if k.startswith(key + "/")})
        for name in (key, *parts):
            points = [(r["step"], r[name]) for r in records if finite(r.get(name))]
            if points:
                label = "all" if name == key else name[len(key) + 1 :]
                marker = "." if len(points) < 30 else None
                ax.plot(*zip(*points, strict=True), marker=marker, label=label)
        if parts:
            ax.legend(fontsize="small")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def finite(value: Any) -> bool:
    """A real number that is neither NaN nor infinite (None and strings are not)."""
    return isinstance(value, int | float) and math.isfinite(value)


def progress_bar(show: bool = True) -> Progress:
    """A progress display; `show=False` (a process other than a run's main one) shows nothing."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
        disable=not show,
    )


@contextlib.contextmanager
def timed(metrics: dict, key: str):
    """Adds the wall-clock seconds of the `with` block to `metrics[key]`."""
    start = time.time()
    try:
        yield
    finally:
        metrics[key] = time.time() - start
