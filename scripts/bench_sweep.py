"""A sweep's arms as adapters on one base (`hydra/launcher=adapters`) against Hydra's basic
launcher (one arm after another), side by side in one run of this script.

Runs `python -m rlkit -m recipe=pair_sum optim.lr=A,B seed=0,1` (4 arms) four ways, one after
another on the same machine:
- adapters: `hydra/launcher=adapters hydra.launcher.arms=4 hydra.launcher.batch=true`, one
  process, the 4 arms together, their forward_backward calls and samples batched;
- turns: the same without `batch=true` (the launcher's default: the arms' calls take turns);
- basic: Hydra's basic launcher, one process, the arms one after another;
- separate: one arm alone in its own process, the memory each of 4 separate processes holds
  (the arms have the same shapes; 4 of them at once hold 4x this).
It prints each one's wall time and peak resident memory (the process's ru_maxrss, from wait4),
the ratios (adapters / basic wall time, adapters / 4 separate processes' memory), and every
arm's final held-out accuracy each way (and whether its metrics and adapter with batch=false are
bitwise those of the basic launcher's run, `python -m rlkit.repro compare`).

    python scripts/bench_sweep.py                      # the recipe as it is (~15 min, 2 cores)
    python scripts/bench_sweep.py -- steps=20 eval_every=10   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: list[str], log: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of `python -m rlkit ARGS`."""
    t = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rlkit", *args], stdout=out, stderr=out)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"python -m rlkit {' '.join(args)} failed:\n{log.read_text()[-3000:]}")
    return wall, usage.ru_maxrss / 2**20  # KiB on Linux


def final_accuracy(run_dir: Path) -> float | None:
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary.get("eval/accuracy_final")


def bitwise(a: Path, b: Path) -> bool:
    """metrics.jsonl and adapter/ identical (`python -m rlkit.repro compare`)."""
    from rlkit.run import compare

    return compare.compare(a, b).equal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pair_sum")
    parser.add_argument("--lrs", default="3e-4,1e-3")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", type=Path, default=None, help="keep the run dirs here")
    parser.add_argument("overrides", nargs="*", help="more key=value for every run")
    opts = parser.parse_args()
    root = opts.out or Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    root.mkdir(parents=True, exist_ok=True)
    sweep = [f"recipe={opts.recipe}", f"optim.lr={opts.lrs}", f"seed={opts.seeds}"]
    sweep += opts.overrides
    arms = len(opts.lrs.split(",")) * len(opts.seeds.split(","))

    results = {}
    adapters = ["hydra/launcher=adapters", f"hydra.launcher.arms={arms}"]
    for name, extra in [
        ("adapters", [*adapters, "hydra.launcher.batch=true"]),
        ("turns", adapters),
        ("basic", []),
    ]:
        sweep_dir = root / name
        wall, rss = run(
            ["-m", *sweep, *extra, f"hydra.sweep.dir={sweep_dir}"], root / f"{name}.log"
        )
        results[name] = (wall, rss, sweep_dir)
        print(f"{name:9s} {arms} arms: wall {wall:7.1f} s, peak RSS {rss:.2f} GiB", flush=True)
    first = [f"recipe={opts.recipe}", f"optim.lr={opts.lrs.split(',')[0]}"]
    first += [f"seed={opts.seeds.split(',')[0]}", *opts.overrides]
    wall, rss = run([*first, f"hydra.run.dir={root / 'separate'}"], root / "separate.log")
    print(
        f"separate  1 arm:  wall {wall:7.1f} s, peak RSS {rss:.2f} GiB (4 processes: {4 * rss:.2f})"
    )

    (a_wall, a_rss, a_dir), (b_wall, _, b_dir) = results["adapters"], results["basic"]
    t_wall, t_rss, t_dir = results["turns"]
    print(
        f"\nwall time, adapters / basic: {a_wall / b_wall:.2f}x (batch=false: {t_wall / b_wall:.2f}x)"
    )
    print(
        f"peak memory, adapters / {arms} separate processes: {a_rss / (arms * rss):.2f}x "
        f"(batch=false: {t_rss / (arms * rss):.2f}x)"
    )
    print(
        "\n| arm | overrides | final eval acc, adapters | batch=false | basic | batch=false "
        "bitwise basic |"
    )
    print("|---:|---|---:|---:|---:|---|")
    for arm_dir in sorted(a_dir.iterdir()):
        if not arm_dir.name.isdigit():
            continue
        overrides = (arm_dir / ".hydra" / "overrides.yaml").read_text().split("\n")
        swept = " ".join(o.lstrip("- ") for o in overrides if o.startswith(("- optim", "- seed")))
        other = b_dir / arm_dir.name
        turns = t_dir / arm_dir.name
        print(
            f"| {arm_dir.name} | {swept} | {final_accuracy(arm_dir):.3f} | "
            f"{final_accuracy(turns):.3f} | {final_accuracy(other):.3f} | "
            f"{bitwise(turns, other)} |"
        )
    print(f"\nrun dirs under {root}")


if __name__ == "__main__":
    main()
