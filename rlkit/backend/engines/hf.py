"""Rollout engine on transformers `generate`.

Sampling runs on a copy of the adapted model whose adapter is merged into its weights: as fast
as the bare base model (a peft adapter on every layer costs several times that on small
models), and the training model is never touched. The copy doubles the model's memory; the
vLLM engine is the choice for models where that matters.

Logprobs are the model's raw log-probabilities of each sampled token (temperature 1, before
top-k/top-p), the same quantity the trainer computes, so the two can be compared directly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from rlkit.api.types import SampledSequence, SamplingParams
from rlkit.backend.engines.base import Request, repeat_greedy, stop_criteria


class SamplingModel:
    """A frozen copy of a peft model that serves one adapter snapshot at a time, merged."""

    def __init__(self, peft_model) -> None:
        self.model = copy.deepcopy(peft_model).eval()
        self.model.requires_grad_(False)
        # The training model's base weights are frozen: the pristine source for every re-merge.
        self._originals = {
            name: m.get_base_layer().weight
            for name, m in peft_model.named_modules()
            if isinstance(m, LoraLayer)
        }
        self._layers = {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLayer)}
        self._params = dict(self.model.named_parameters())
        self.loaded_key: int | None = None

    @torch.no_grad()
    def load(self, key: int, snapshot: dict[str, torch.Tensor]) -> None:
        """Serve `snapshot` (adapter tensors by parameter name); a no-op if it already does."""
        if key == self.loaded_key:
            return
        self.loaded_key = None  # stays unset if anything below fails
        for name, layer in self._layers.items():
            layer.get_base_layer().weight.copy_(self._originals[name])
            layer.merged_adapters = []
        for name, tensor in snapshot.items():
            self._params[name].copy_(tensor)
        for layer in self._layers.values():
            layer.merge()
        self.loaded_key = key


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
    """The `hf` engine: transformers `generate` on a merged copy of the adapted model."""

    name = "hf"

    @dataclass(frozen=True)
    class Options:
        """No settings of its own."""

    @classmethod
    def build(cls, learner, options: Options | None = None) -> HFEngine:
        return cls(learner.model, learner.tokenizer)

    def __init__(self, peft_model, tokenizer) -> None:
        self._sampler = SamplingModel(peft_model)
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
