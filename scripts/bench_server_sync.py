"""Weight-sync time of engine=vllm_server (over HTTP) vs engine=vllm (in-process), side by side.

Starts a server with `python -m rlkit.serve` on a free local port, then alternates rounds between
two training clients on the same model and rank: an optimizer step, then a sync (the new adapter
written and loaded, plus the post-sync probe), timed. The first sync of each (engine start-up,
first adapter load) is reported apart.

    python scripts/bench_server_sync.py [--model rlkit-small] [--rank 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import rlkit
from rlkit.api import types


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(overrides: list[str], log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m rlkit.serve OVERRIDES` on a free local port, its output to `log` (or nowhere);
    returns once it answers, with its URL."""
    port = free_port()
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - the server owns it
    process = subprocess.Popen(
        [sys.executable, "-m", "rlkit.serve", *overrides, "--", "--port", str(port)],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=5).read()
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                tail = log.read_text()[-3000:] if log else ""
                sys.exit(f"the vLLM server did not start\n{tail}")
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rlkit-small")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("RLKIT_CACHE_DIR", tempfile.mkdtemp())
    server, url = start_server(
        [f"model={args.model.replace('-', '_')}", f"adapter.rank={args.rank}"]
    )
    try:
        engines = {"vllm": {}, "vllm_server": {"url": url}}
        trainers = {
            name: rlkit.ServiceClient(
                device="cpu", engine=name, engine_options=options
            ).create_lora_training_client(args.model, rank=args.rank, seed=0)
            for name, options in engines.items()
        }
        tokens = trainers["vllm"].get_tokenizer().encode("sync 1 2 3", add_special_tokens=False)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        )
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(args.rounds + 1):
            for name, trainer in trainers.items():
                trainer.forward_backward([datum], "cross_entropy").result()
                trainer.optim_step(types.AdamParams(learning_rate=1e-3)).result()
                start = time.perf_counter()
                trainer.save_weights_and_get_sampling_client()
                times[name].append(time.perf_counter() - start)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
    print(f"\n{args.model}, LoRA rank {args.rank}, {args.rounds} rounds after the first\n")
    print("| engine | first sync s | sync s (median) |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {values[0]:.2f} | {statistics.median(values[1:]):.3f} |")


if __name__ == "__main__":
    main()
