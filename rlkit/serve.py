"""`python -m rlkit.serve model=NAME [key=value ...] [-- VLLM_FLAGS ...]`: vLLM's OpenAI server for
a run's model, ready for `engine=vllm_server`.

The overrides are the run's (`model=`, `adapter.rank=`, `model.dtype=`, ...): the server loads
the same base model and accepts adapters of that rank. It listens on 127.0.0.1:8000 unless
`--host`/`--port` come after `--`; anything after `--` goes to vLLM as is (e.g.
`--tensor-parallel-size 4`, `--data-parallel-size 2`, `--max-loras 8` for 8 trainer processes).

What it sets: LoRA on with runtime loading (VLLM_ALLOW_RUNTIME_LORA_UPDATING), raw logprobs
(the quantity the trainer computes), and on a CPU machine what the in-process engine uses there (a 0.5 GiB KV cache, eager mode, no chunked
prefill: vLLM-CPU crashes on seeded requests whose prompt is split).
"""

from __future__ import annotations

import os
import sys

import torch

from rlkit import client
from rlkit.api.errors import RlkitError
from rlkit.run import config
from rlkit.run.schema import ConfigError


def vllm_command(overrides: list[str], vllm_flags: list[str]) -> list[str]:
    cfg = config.checked(overrides)  # checked as a run checks it: an error names the key
    dtype = str(cfg.model.dtype)
    gpu = torch.cuda.is_available() and cfg.model.device != "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if gpu else "float32"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        client.resolve_model(cfg.model.base_model),
        "--dtype",
        dtype,
        "--enable-lora",
        "--max-lora-rank",
        str(client.vllm_max_lora_rank(cfg.adapter.rank)),
        "--logprobs-mode",
        "raw_logprobs",
        "--seed",
        "0",  # every request carries its own seed
    ]
    if not gpu:
        command += ["--kv-cache-memory-bytes", str(2**29), "--enforce-eager"]
        command += ["--no-enable-chunked-prefill"]
    if "--host" not in vllm_flags:
        command += ["--host", "127.0.0.1"]
    if "--port" not in vllm_flags:
        command += ["--port", "8000"]
    return command + vllm_flags


USAGE = """usage: python -m rlkit.serve model=NAME [key=value ...] [-- VLLM_FLAGS ...]

Starts vLLM's OpenAI-compatible server for a run's base model, with LoRA adapters of the run's
rank loaded at runtime; train against it with engine=vllm_server engine.url=http://HOST:PORT.
The key=value overrides are the run's (model=, adapter.rank=, model.dtype=, ...). It listens on
127.0.0.1:8000 unless --host / --port come after `--`; everything after `--` goes to vLLM.

  python -m rlkit.serve model=rlkit_small adapter.rank=16
  python -m rlkit.serve model=qwen3_4b -- --port 8001 --tensor-parallel-size 2"""


def main(argv: list[str]) -> None:
    overrides, vllm_flags = argv, []
    if "--" in argv:
        cut = argv.index("--")
        overrides, vllm_flags = argv[:cut], argv[cut + 1 :]
    if {"-h", "--help"} & set(overrides):
        print(USAGE)
        return
    try:
        command = vllm_command(overrides, vllm_flags)
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None
    except RlkitError as exc:  # a model that cannot be found, a rank vLLM cannot serve
        raise SystemExit(f"error: {exc}") from None
    host = command[command.index("--host") + 1]
    port = command[command.index("--port") + 1]
    print(
        f"rlkit.serve: starting vLLM; once it is up, train with "
        f"engine=vllm_server engine.url=http://{host}:{port}",
        flush=True,
    )
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
