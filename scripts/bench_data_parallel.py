"""RL step time with 1 process vs N processes (accelerate launch), side by side.

Runs the same short RL job (pair_sum recipe, no warm start, a few steps) as one process and under
`accelerate launch --num_processes N`, alternating, and reads each run's timings.jsonl. Start-up
(model load, engine start) and eval are left out: `time/step` is sample + score + train + sync.
The first RL step of each run is dropped as warm-up.

    python scripts/bench_data_parallel.py                       # CPU: rlkit-small, 2 processes
    python scripts/bench_data_parallel.py --processes 8 -- model=my_model engine=vllm   # a GPU node

Prints a markdown table: median step time and phases per layout, and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = ("sample", "score", "train", "sync", "step")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(processes: int, run_dir: Path, overrides: list[str]) -> list[str]:
    tail = ["-m", "rlkit", *overrides, f"hydra.run.dir={run_dir}"]
    if processes == 1:
        return [sys.executable, *tail]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launcher += ["--num_processes", str(processes), "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launcher, "--main_process_port", str(free_port()), *tail]


def step_times(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "timings.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("step", -1) >= 1 and "time/step" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each layout, alternating")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="extra config overrides (after --)")
    args = parser.parse_args()
    overrides = [
        "recipe=pair_sum",
        "warmup.steps=0",
        f"steps={args.steps}",
        "eval_every=1000",
        "checkpoint.every=0",
        # Without a warm start every completion fails format and correctness alike, every group
        # is skipped and nothing trains: a length reward gives each group a spread.
        "reward=[format,correct,concise]",
        "reward.concise.only_correct=false",
        *args.overrides,
    ]
    times: dict[int, list[dict]] = {1: [], args.processes: []}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "RLKIT_CACHE_DIR": os.environ.get("RLKIT_CACHE_DIR", f"{tmp}/c")}
        for round_ in range(args.rounds):
            for n in times:
                run_dir = Path(tmp) / f"n{n}-r{round_}"
                print(f"round {round_ + 1}/{args.rounds}: {n} process(es)...", flush=True)
                done = subprocess.run(
                    command(n, run_dir, overrides), env=env, capture_output=True, text=True
                )
                if done.returncode:
                    sys.exit(f"run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
                times[n] += step_times(run_dir)
    print(f"\n{' '.join(overrides)}; {args.rounds} runs each, median over steps 1..\n")
    print("| processes | " + " | ".join(f"{p} s" for p in PHASES) + " | speed-up |")
    print("|---" * (len(PHASES) + 2) + "|")
    base = statistics.median(r["time/step"] for r in times[1])
    for n, rows in times.items():
        medians = [statistics.median(r[f"time/{p}"] for r in rows) for p in PHASES]
        cells = " | ".join(f"{m:.2f}" for m in medians)
        print(f"| {n} | {cells} | {base / medians[-1]:.2f}x |")


if __name__ == "__main__":
    main()
