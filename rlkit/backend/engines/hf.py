"""Rollout engine on transformers `generate`.

Sampling runs on a copy of the adapted model whose adapter is merged into its weights: as fast
as the bare base model (a peft adapter on every layer costs several times that on small
models), and the training model is never touched. The copy doubles the model's memory; the
vLLM engine is the choice for models where that matters.

A quantized base (QLoRA, QDoRA) is the exception: merging an adapter into 4-bit or 8-bit
weights rounds it away, and the sampler would serve another policy than the one trained. There
the copy shares the training model's frozen (quantized) weights, holds its own adapter tensors
and keeps them unmerged: the forward pass is the trainer's own, at the cost of the adapter's
extra matmuls in every layer. An unmerged DoRA layer's per-channel scale, magnitude over the
norm of the (dequantized) weight plus the update, is computed once per snapshot instead of at
every decoded token (peft recomputes it at each forward pass; the trainer needs that, the
frozen sampler does not). Same functions, same inputs: the same bits.

Logprobs are the model's raw log-probabilities of each sampled token (temperature 1, before
top-k/top-p), the same quantity the trainer computes, so the two can be compared directly.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.dora import DoraLinearLayer
from peft.utils.integrations import dequantize_module_weight
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from rlkit.api.types import SampledSequence, SamplingParams
from rlkit.backend.engines.base import Request, repeat_greedy, stop_criteria


class SamplingModel:
    """A frozen copy of a peft model that serves one adapter snapshot at a time, merged into
    its weights, or (`merge=False`) unmerged on the training model's own frozen weights."""

    def __init__(self, peft_model, merge: bool = True) -> None:
        self.merge = merge
        # Unmerged, the frozen weights are never written: share them (deepcopy's memo maps each
        # to itself) and copy only the adapter.
        shared = {} if merge else {id(p): p for p in peft_model.parameters() if not p.requires_grad}
        self.model = copy.deepcopy(peft_model, shared).eval()
        self.model.requires_grad_(False)
        # The training model's base weights are frozen: the pristine source for every re-merge.
        self._originals = {
            name: m.get_base_layer().weight
            for name, m in peft_model.named_modules()
            if isinstance(m, LoraLayer)
        }
        self._layers = {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLayer)}
        self._params = dict(self.model.named_parameters())
        self._dora = [] if merge else _cache_dora_scales(self.model)
        self.loaded_key: int | None = None

    @torch.no_grad()
    def load(self, key: int, snapshot: dict[str, torch.Tensor]) -> None:
        """Serve `snapshot` (adapter tensors by parameter name); a no-op if it already does."""
        if key == self.loaded_key:
            return
        self.loaded_key = None  # stays unset if anything below fails
        if self.merge:
            for name, layer in self._layers.items():
                layer.get_base_layer().weight.copy_(self._originals[name])
                layer.merged_adapters = []
        for layer in self._dora:
            layer.rlkit_scales.clear()
        for name, tensor in snapshot.items():
            self._params[name].copy_(tensor)
        if self.merge:
            for layer in self._layers.values():
                layer.merge()
        self.loaded_key = key


def _cache_dora_scales(model) -> list[DoraLinearLayer]:
    """Gives each DoRA layer of `model` (unmerged, frozen) a forward pass that computes its
    scale once per snapshot: `SamplingModel.load` clears `rlkit_scales`."""
    layers = [m for m in model.modules() if isinstance(m, DoraLinearLayer)]
    for layer in layers:
        layer.rlkit_scales = {}
        layer.forward = functools.partial(_dora_forward, layer)
    return layers


def _dora_forward(
    layer, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"
):
    """peft's DoraLinearLayer.forward in eval mode (where peft passes the base layer's output),
    with magnitude / ||W + scaling * B A|| cached per dtype."""
    if base_result is None:  # dropout in training mode: not the sampler's case
        return DoraLinearLayer.forward(
            layer,
            x,
            lora_A=lora_A,
            lora_B=lora_B,
            scaling=scaling,
            base_layer=base_layer,
            adapter_name=adapter_name,
        )
    scale = layer.rlkit_scales.get(x.dtype)
    if scale is None:
        lora_weight = layer.get_lora_weight(lora_A=lora_A, lora_B=lora_B, adapter_name=adapter_name)
        weight = dequantize_module_weight(base_layer).to(x.dtype)
        norm = layer.get_weight_norm(
            weight=weight,
            lora_weight=lora_weight.to(x.dtype).detach(),
            scaling=scaling,
            adapter_name=adapter_name,
        ).detach()
        scale = layer.rlkit_scales[x.dtype] = (layer.weight / norm).view(1, -1)
    if base_layer.bias is not None:
        base_result = base_result - base_layer.bias
    return (scale - 1) * base_result + scale * lora_B(lora_A(x)) * scaling


def _text(tokenizer, tokens) -> str:
    # Special tokens are not text: a stop string never matches inside `<|im_end|>`.
    return tokenizer.decode(tokens, skip_special_tokens=True)


class _StopOnStrings(StoppingCriteria):
    """Ends a row once its generated text contains any stop string."""

    def __init__(self, tokenizer, strings: list[str], prompt_length: int) -> None:
        self.tokenizer, self.strings, self.start = tokenizer, strings, prompt_length

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        done = [
            any(s in _text(self.tokenizer, row[self.start :]) for s in self.strings)
            for row in input_ids.tolist()
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _truncate(tokens, logprobs, stop_ids, stop_strings, tokenizer) -> SampledSequence:
    """Cut after the first stop token or stop string; rows that finished early hold padding."""
    for end, token in enumerate(tokens, start=1):
        if token in stop_ids or (
            stop_strings and any(s in _text(tokenizer, tokens[:end]) for s in stop_strings)
        ):
            return SampledSequence("stop", tokens[:end], logprobs[:end])
    return SampledSequence("length", tokens, logprobs)


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompt: list[int],
    num_samples: int,
    params: SamplingParams,
    seed: int,
    max_tokens: int,
) -> list[SampledSequence]:
    """`num_samples` completions of `prompt`, reproducible for a given `seed`."""
    stop_ids, stop_strings = stop_criteria(params, tokenizer.eos_token_id)
    greedy = params.temperature == 0
    # Filters are only for sampling: top_k=0 turns transformers' default top-k (50) off.
    filters = (
        {}
        if greedy
        else {
            "temperature": params.temperature,
            "top_k": 0 if params.top_k == -1 else params.top_k,
            "top_p": params.top_p,
        }
    )
    config = GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=not greedy,
        **filters,
        num_return_sequences=1 if greedy else num_samples,
        eos_token_id=sorted(stop_ids),
        pad_token_id=tokenizer.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    device = next(model.parameters()).device
    stopping = StoppingCriteriaList(
        [_StopOnStrings(tokenizer, stop_strings, len(prompt))] if stop_strings else []
    )
    input_ids = torch.tensor([prompt], device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            stopping_criteria=stopping,
        )
    new_tokens = out.sequences[:, len(prompt) :]
    logits = torch.stack(out.logits, dim=1).float()  # (rows, steps, vocab)
    token_logprobs = logits.log_softmax(-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
    sequences = [
        _truncate(
            new_tokens[row].tolist(),
            token_logprobs[row].tolist(),
            stop_ids,
            stop_strings,
            tokenizer,
        )
        for row in range(new_tokens.shape[0])
    ]
    return repeat_greedy(sequences[0], num_samples) if greedy else sequences


class HFEngine:
    """The `hf` engine: transformers `generate` on a merged copy of the adapted model (on a
    quantized base: an unmerged one, see the module's docstring)."""

    name = "hf"
    # Serves a quantized base exactly (the learner falls back to this engine for those).
    serves_quantized = True

    @dataclass(frozen=True)
    class Options:
        """No settings of its own."""

    @classmethod
    def build(cls, learner, options: Options | None = None) -> HFEngine:
        return cls(learner.model, learner.tokenizer, merge=not learner.quant.enabled)

    def __init__(self, peft_model, tokenizer, merge: bool = True) -> None:
        self._sampler = SamplingModel(peft_model, merge)
        self.tokenizer = tokenizer

    @property
    def loaded_key(self) -> int | None:
        return self._sampler.loaded_key

    def load(self, key: int, snapshot: dict[str, torch.Tensor]) -> None:
        self._sampler.load(key, snapshot)

    def sample(self, requests: list[Request]) -> list[list[SampledSequence]]:
        # One generate call per request: each request's seed then decides its tokens alone.
        return [
            sample(
                self._sampler.model,
                self.tokenizer,
                r.prompt,
                r.num_samples,
                r.params,
                r.seed,
                r.max_tokens,
            )
            for r in requests
        ]

    @torch.no_grad()
    def prompt_logprobs(self, prompt: list[int]) -> list[float | None]:
        model = self._sampler.model
        device = next(model.parameters()).device
        logits = model(input_ids=torch.tensor([prompt[:-1]], device=device)).logits[0].float()
        targets = torch.tensor(prompt[1:], device=device)
        logprobs = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        return [None, *logprobs.tolist()]
