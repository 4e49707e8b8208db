"""Loss registry: small pure functions over one sequence's per-token tensors.

Semantics follow the hosted Tinker service: every loss is a *sum* over tokens (and over datums),
never a mean. Each function gets `logprobs`, the learner's log-probability of each target token
(shape (N,), differentiable), the datum's `loss_fn_inputs` as float tensors, and the resolved
`loss_fn_config`; it returns the per-token loss. Notation in the formulas below:
`ratio = exp(logprobs - inputs["logprobs"])`, the learner-to-sampler probability ratio.

Add a loss with `@register_loss("name", inputs=(...), **config_defaults)`; a name registered twice
is an error. loss_fn_config values are thresholds, caps and coefficients: finite numbers >= 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rlkit.api.errors import UnknownLossError

LossFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    # loss_fn_inputs the loss reads, besides target_tokens (always required).
    inputs: tuple[str, ...]
    # loss_fn_config keys the loss accepts, with their defaults.
    defaults: dict[str, float] = field(default_factory=dict)

    def resolve_config(self, name: str, config: dict | None) -> dict[str, float]:
        config = dict(config or {})
        unknown = sorted(set(config) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"loss {name!r} got unknown loss_fn_config keys {unknown}; "
                f"it accepts {sorted(self.defaults) or 'none'}"
            )
        resolved = {**self.defaults, **{k: float(v) for k, v in config.items()}}
        for key, value in resolved.items():
            if not 0 <= value < math.inf:
                raise ValueError(
                    f"loss {name!r}: loss_fn_config {key}={value} must be a finite number >= 0"
                )
        low, high = resolved.get("clip_low_threshold"), resolved.get("clip_high_threshold")
        if low is not None and high is not None and not low <= 1 <= high:
            raise ValueError(
                f"loss {name!r}: loss_fn_config needs clip_low_threshold <= 1 <= "
                f"clip_high_threshold (ratio bounds around 1), got {low} and {high}"
            )
        return resolved


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, inputs: tuple[str, ...], **defaults: float):
    def decorate(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = LossSpec(fn=fn, inputs=inputs, defaults=defaults)
        return fn

    return decorate


def get_loss(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise UnknownLossError(
            f"unknown loss_fn {name!r}; known losses: {', '.join(sorted(LOSSES))}"
        ) from None


def _ratio(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor) -> torch.Tensor:
    return torch.exp(logprobs - sampler_logprobs)


@register_loss("cross_entropy", inputs=("weights",))
def cross_entropy(logprobs, inputs):
    """Supervised learning: -weights * logprobs (weights 0 mask out the prompt)."""
    return -inputs["weights"] * logprobs


def tis_capped(logprob_gap: torch.Tensor, tis_cap: float) -> torch.Tensor:
    """Where truncated IS caps the token weight: exp(gap) > tis_cap, with gap the trainer's
    logprob minus the sampler's (the weight `_split_ratio` clamps). For metrics."""
    return logprob_gap.exp() > tis_cap


def _split_ratio(logprobs, sampler_logprobs, tis_cap: float):
    """(ratio, token weight) for the IS losses.

    tis_cap = 0: ratio = trainer/sampler, weight 1 (plain importance sampling).
    tis_cap > 0, truncated importance sampling (TIS): the sampler-to-old-trainer mismatch is
    taken out of the ratio and capped: weight = min(exp(old - sampler), tis_cap), ratio =
    exp(logprobs - old). The old policy is the trainer's logprobs before this update, i.e.
    `logprobs.detach()`: exact for one optimizer step per batch of rollouts, as rlkit's trainer
    does. Same value and gradient as tis_cap = 0 wherever the cap does not bite.
    """
    if not tis_cap:
        return _ratio(logprobs, sampler_logprobs), 1.0
    old = logprobs.detach()
    weight = torch.exp(old - sampler_logprobs).clamp(max=tis_cap)
    return torch.exp(logprobs - old), weight


@register_loss("importance_sampling", inputs=("logprobs", "advantages"), tis_cap=0.0)
def importance_sampling(logprobs, inputs, tis_cap=0.0):
    """REINFORCE corrected for the sampler: -ratio * advantages (tis_cap: see _split_ratio)."""
    ratio, weight = _split_ratio(logprobs, inputs["logprobs"], tis_cap)
    return -weight * ratio * inputs["advantages"]


@register_loss(
    "ppo",
    inputs=("logprobs", "advantages"),
    clip_low_threshold=0.8,
    clip_high_threshold=1.2,
    tis_cap=0.0,
)
def ppo(logprobs, inputs, clip_low_threshold, clip_high_threshold, tis_cap=0.0):
    """Clipped surrogate: -min(ratio * A, clip(ratio, low, high) * A), thresholds on the ratio
    (with tis_cap > 0 the ratio is to the old trainer policy, times the capped TIS weight)."""
    ratio, weight = _split_ratio(logprobs, inputs["logprobs"], tis_cap)
    advantages = inputs["advantages"]
    clipped = ratio.clamp(clip_low_threshold, clip_high_threshold)
    return -weight * torch.minimum(ratio * advantages, clipped * advantages)


@register_loss(
    "cispo", inputs=("logprobs", "advantages"), clip_low_threshold=0.8, clip_high_threshold=1.2
)
def cispo(logprobs, inputs, clip_low_threshold, clip_high_threshold):
    """Clipped IS weight as a constant coefficient: -sg(clip(ratio)) * logprobs * A."""
    ratio = _ratio(logprobs, inputs["logprobs"])
    weight = ratio.clamp(clip_low_threshold, clip_high_threshold).detach()
    return -weight * logprobs * inputs["advantages"]


# beta's default is rlkit's choice; the hosted service documents the key but not a default.
@register_loss("dro", inputs=("logprobs", "advantages"), beta=0.05)
def dro(logprobs, inputs, beta):
    """Direct reward optimisation: -(logprobs * A - beta/2 * (logprobs - sampler_logprobs)^2)."""
    drift = logprobs - inputs["logprobs"]
    return -(logprobs * inputs["advantages"] - 0.5 * beta * drift.square())
