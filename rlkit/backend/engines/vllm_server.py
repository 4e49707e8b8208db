"""Rollout engine on a vLLM OpenAI-compatible server: trainers on some GPUs (or nodes) share an
inference pool on others, which scales with vLLM's own tensor and data parallelism.

Start one for a run's model with `python -m rlkit.serve model=...` (rlkit/serve.py), or point
`engine.url` at any `vllm serve` started with `--enable-lora`, `--max-lora-rank` >= the adapter's
rank, `--logprobs-mode raw_logprobs` and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True.

Weight sync: the adapter is written in peft format to `adapter_dir` (a path the server reads: the
same machine, or a filesystem both see), then unloaded and loaded again under this client's
stable name (POST /v1/unload_lora_adapter, /v1/load_lora_adapter). Not `load_inplace`: vLLM 0.32's
server keeps that flag on the adapter it registers, and its worker then reloads the adapter from
disk at every engine step (lora/worker_manager.py `add_adapter`): every request would pay for a
reload, and a server that always reads the file cannot be caught serving a stale adapter. (On
rlkit-small at rank 8 the cost is small: 2.5-2.9 s per sampling round in place, 2.1-2.7 s with
unload + load, on a noisy machine.) Loading again also gives the adapter a new internal id, so no
prefix-cache entry computed with the old weights is reused.

Sampling: one POST /v1/completions per request, all in flight at once (the server batches them),
each with its prompt token ids, its seed, and `return_token_ids` + `logprobs=0` to get back the
sampled tokens and their logprobs. The probe uses `prompt_logprobs`, as the in-process engine.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlkit.api.errors import RlkitError
from rlkit.api.types import SampledSequence
from rlkit.backend import models
from rlkit.backend.engines.base import Request, repeat_greedy, stop_criteria
from rlkit.backend.engines.vllm import peft_tensors

DEFAULT_URL = "http://127.0.0.1:8000"


class ServerError(RlkitError):
    """The rollout server is down, died, or is not serving what this run needs."""


class VLLMServerEngine:
    name = "vllm_server"

    @dataclass(frozen=True)
    class Options:
        """Where the server is and how long to wait for it."""

        # Base URL of the server (python -m rlkit.serve prints it).
        url: str = DEFAULT_URL
        # Seconds one HTTP request may take (a whole group's completions) before it fails.
        timeout_s: float = 600.0
        # Where adapters are written for the server to load; None: /dev/shm (same machine).
        adapter_dir: str | None = None
        # Requests in flight at once.
        max_concurrency: int = 64

        def __post_init__(self) -> None:
            if not self.url.startswith(("http://", "https://")):
                raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
            if not self.timeout_s > 0:
                raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
            if self.max_concurrency < 1:
                raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")

    @classmethod
    def build(cls, learner, options: Options | None = None) -> VLLMServerEngine:
        if learner.spec.use_dora:
            raise ServerError(
                "engine=vllm_server cannot serve DoRA adapters (vLLM's LoRA path has no "
                "magnitude vector); use engine=hf or engine=vllm (which falls back to hf)"
            )
        return cls(learner.model, learner.base_model, learner.tokenizer, options)

    def __init__(self, peft_model, base_model: str, tokenizer, options: Options | None = None):
        self.options = options or self.Options()
        self.url = self.options.url.rstrip("/")
        self._eos = tokenizer.eos_token_id
        self._check_base_model(base_model)
        self.lora_name = f"rlkit-{uuid.uuid4().hex[:12]}"
        root = self.options.adapter_dir or ("/dev/shm" if Path("/dev/shm").is_dir() else None)
        if root:
            Path(root).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.lora_name}-", dir=root))
        atexit.register(shutil.rmtree, self.dir, True)
        self.adapter = peft_model.active_adapter  # the learner's, among those on its base
        peft_model.peft_config[self.adapter].save_pretrained(str(self.dir))
        self._pool = ThreadPoolExecutor(self.options.max_concurrency)
        self._registered = False  # the server has an adapter under our name
        self.loaded_key: int | None = None

    # ---- HTTP ----------------------------------------------------------------------------------
    def _json(self, path: str, body: dict | None, what: str, read):
        """`read(reply)` of a call whose reply must be vLLM's JSON: anything else (an HTML
        page, another server on the port, a changed API) is a ServerError naming the URL."""
        reply = self._call(path, body, what)
        try:
            if not isinstance(reply, dict):
                raise TypeError("not a JSON object")
            return read(reply)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise ServerError(
                f"engine=vllm_server: {self.url}{path} did not answer as vLLM's OpenAI server "
                f"while {what} ({type(exc).__name__}: {exc}); it answered {str(reply)[:200]!r}. "
                "Is engine.url a server started by `python -m rlkit.serve`?"
            ) from None

    def _call(self, path: str, body: dict | None, what: str) -> dict | str:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            headers={"Content-Type": "application/json"},
            method="GET" if body is None else "POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.options.timeout_s) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise ServerError(
                f"engine=vllm_server: {self.url}{path} answered HTTP {exc.code} while {what}: "
                f"{detail}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerError(
                f"engine=vllm_server: cannot reach the rollout server at {self.url} while "
                f"{what} ({reason}). Start one with `python -m rlkit.serve model=...`, or set "
                "engine.url to a running one; the last checkpoint is intact (resume=auto)"
            ) from None
        try:
            return json.loads(text)
        except ValueError:
            return text

    def _check_base_model(self, base_model: str) -> None:
        served = self._json(
            "/v1/models",
            None,
            "listing its models",
            lambda reply: [m for m in reply["data"] if not m.get("parent")],
        )
        path = models.resolve(base_model)
        if not any({m.get("id"), m.get("root")} & {base_model, path} for m in served):
            found = ", ".join(str(m.get("root") or m.get("id")) for m in served) or "nothing"
            raise ServerError(
                f"engine=vllm_server: the server at {self.url} serves {found}, not this run's "
                f"base model {base_model!r} ({path}): start it with "
                "`python -m rlkit.serve` and the run's model=..."
            )

    # ---- the engine protocol -------------------------------------------------------------------
    def load(self, key: int, snapshot: dict[str, torch.Tensor]) -> None:
        if key == self.loaded_key:
            return
        self.loaded_key = None  # stays unset if anything below fails
        save_file(peft_tensors(snapshot, self.adapter), str(self.dir / "adapter_model.safetensors"))
        name = {"lora_name": self.lora_name}
        if self._registered:
            self._call("/v1/unload_lora_adapter", name, "unloading the previous adapter")
            self._registered = False
        body = {**name, "lora_path": str(self.dir)}
        self._call("/v1/load_lora_adapter", body, "loading the new adapter")
        self._registered = True
        self.loaded_key = key

    def _body(self, request: Request) -> dict:
        p = request.params
        stop_ids, stop_strings = stop_criteria(p, self._eos)
        greedy = p.temperature == 0
        return {
            "model": self.lora_name,
            "prompt": list(request.prompt),
            "n": 1 if greedy else request.num_samples,
            "temperature": p.temperature,
            "top_p": 1.0 if greedy else p.top_p,
            "top_k": 0 if greedy or p.top_k == -1 else p.top_k,
            "max_tokens": request.max_tokens,
            "stop": stop_strings or None,
            "stop_token_ids": sorted(stop_ids),
            "seed": request.seed,
            "logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": False,
        }

    def _complete(self, request: Request) -> list[SampledSequence]:
        sequences = self._json("/v1/completions", self._body(request), "sampling", _sequences)
        if request.params.temperature == 0:
            return repeat_greedy(sequences[0], request.num_samples)
        return sequences

    def sample(self, requests: list[Request]) -> list[list[SampledSequence]]:
        return list(self._pool.map(self._complete, requests))

    def prompt_logprobs(self, prompt: list[int]) -> list[float | None]:
        body = {
            "model": self.lora_name,
            "prompt": list(prompt),
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
        }

        def read(reply: dict) -> list[float | None]:
            (choice,) = reply["choices"]
            entries = choice["prompt_logprobs"]
            return [None] + [
                float(entry[str(token)]["logprob"])
                for entry, token in zip(entries[1:], prompt[1:], strict=True)
            ]

        return self._json("/v1/completions", body, "scoring the probe", read)


def _sequences(reply: dict) -> list[SampledSequence]:
    """The completions of a /v1/completions reply, in order."""
    return [
        SampledSequence(
            "stop" if c["finish_reason"] == "stop" else "length",
            list(c["token_ids"]),
            [float(lp) for lp in c["logprobs"]["token_logprobs"]],
        )
        for c in sorted(reply["choices"], key=lambda c: c["index"])
    ]
