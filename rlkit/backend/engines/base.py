"""What every rollout engine provides, and the request it serves.

An engine serves one adapter snapshot at a time: `load(key, snapshot)` makes it serve the
adapter tensors `snapshot` (a no-op when `key` is already loaded), then `sample` and
`prompt_logprobs` run on it. The learner decides when to load; engines never see the trainer.

An engine is a class with a `name`, an `Options` dataclass (its settings, declared once: the
engine's YAML in conf/engine/ sets the same fields) and `build(learner, options)`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from rlkit.api.types import SampledSequence, SamplingParams


@dataclass(frozen=True)
class Request:
    """One `sample` call: `num_samples` completions of `prompt`, reproducible for `seed`."""

    prompt: list[int]
    num_samples: int
    params: SamplingParams
    seed: int
    max_tokens: int
    topk: int = 0  # top-k logprobs of every sampled token's position (0: none)


class Engine(Protocol):
    name: str
    # The key of the snapshot being served; None before the first load or after a failed one.
    loaded_key: int | None
    # The engine's settings: a dataclass whose fields are the keys of its conf/engine/ YAML.
    Options: type

    @classmethod
    def build(cls, learner, options) -> Engine:
        """An engine serving `learner`'s model (`learner.model`, `.tokenizer`, `.spec`, ...)."""
        ...

    def load(self, key: int, snapshot: dict[str, torch.Tensor]) -> None: ...

    def sample(self, requests: list[Request]) -> list[list[SampledSequence]]: ...

    def prompt_logprobs(self, prompt: list[int]) -> list[float | None]:
        """Logprob of each token of `prompt` (at least 2 tokens) given the ones before; the
        first is None."""
        ...


def repeat_greedy(sequence: SampledSequence, num_samples: int) -> list[SampledSequence]:
    """One greedy pass serves every requested sample; each gets its own token list."""
    return [replace(sequence, tokens=list(sequence.tokens)) for _ in range(num_samples)]


def stop_criteria(params: SamplingParams, eos_token_id: int) -> tuple[set[int], list[str]]:
    """Token ids and strings that end a sequence; the end-of-turn token always does."""
    stop = params.stop
    if stop is None:
        return {eos_token_id}, []
    if isinstance(stop, str):
        return {eos_token_id}, [stop]
    stop = list(stop)
    if all(isinstance(s, str) for s in stop):
        return {eos_token_id}, stop
    if all(isinstance(s, int) for s in stop):
        return {eos_token_id, *stop}, []
    raise TypeError(f"SamplingParams.stop must be strings or token ids, not a mix: {stop!r}")
