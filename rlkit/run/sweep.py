"""Sweep summary: after `python -m rlkit -m ...`, a table and a plot comparing every run.

Hydra calls `SweepSummary.on_multirun_end` once all jobs are done; it reads each job's
`summary.json`, `metrics.jsonl` and overrides, and writes `sweep_summary.md` (best run first,
by final eval accuracy then reward) and `sweep_curves.png` in the sweep directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from rlkit.run.outputs import console, finite, read_jsonl  # noqa: E402


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    runs = []
    for summary_file in sorted(sweep_dir.glob("*/summary.json")):
        job_dir = summary_file.parent
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        runs.append(
            {
                "dir": job_dir,
                "name": " ".join(o for o in overrides if not o.startswith("recipe="))
                or job_dir.name,
                "summary": json.loads(summary_file.read_text()),
                "metrics": read_jsonl(job_dir / "metrics.jsonl"),
            }
        )

    def key(run):
        s = run["summary"]
        return (-_num(s.get("eval/accuracy_final")), -_num(s.get("reward/mean_last5")))

    return sorted(runs, key=key)


def _num(value) -> float:
    return value if finite(value) else -math.inf


def _fmt(value) -> str:
    return f"{value:.3f}" if finite(value) else "n/a"


def write_table(runs: list[dict], path: Path) -> None:
    lines = [
        "| rank | run | eval acc start | eval acc final | mean reward (last 5 steps) | dir |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for i, run in enumerate(runs, start=1):
        s = run["summary"]
        lines.append(
            f"| {i} | {run['name']} | {_fmt(s.get('eval/accuracy_start'))} | "
            f"{_fmt(s.get('eval/accuracy_final'))} | "
            f"{_fmt(s.get('reward/mean_last5'))} | {run['dir'].name} |"
        )
    path.write_text("\n".join(lines) + "\n")


def write_plot(runs: list[dict], path: Path) -> None:
    fig, (ax_reward, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        m = run["metrics"]
        reward = [
            (r["step"], r["reward/mean"]) for r in m if _num(r.get("reward/mean")) > -math.inf
        ]
        evals = [(r["step"], r["eval/accuracy"]) for r in m if "eval/accuracy" in r]
        if reward:
            ax_reward.plot(*zip(*reward, strict=True), label=run["name"])
        if evals:
            ax_eval.plot(*zip(*evals, strict=True), marker="o", label=run["name"])
    ax_reward.set(title="mean reward", xlabel="step")
    ax_eval.set(title="held-out greedy accuracy", xlabel="step")
    for ax in (ax_reward, ax_eval):
        ax.grid(alpha=0.3)
    ax_eval.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = collect(sweep_dir)
        if not runs:
            console.print(f"sweep: no finished runs under {sweep_dir}")
            return
        write_table(runs, sweep_dir / "sweep_summary.md")
        write_plot(runs, sweep_dir / "sweep_curves.png")
        console.print((sweep_dir / "sweep_summary.md").read_text())
        console.print(
            f"sweep summary: {sweep_dir / 'sweep_summary.md'}, {sweep_dir / 'sweep_curves.png'}"
        )
