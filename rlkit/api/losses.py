"""Loss registry: small pure functions over one sequence's per-token tensors.

Semantics follow the hosted Tinker service: every loss is a *sum* over tokens (and over datums),
never a mean. Each function gets `logprobs`, the learner's log-probability of each target token
(shape (N,), differentiable), the datum's `loss_fn_inputs` as float tensors, and the resolved
`loss_fn_config`; it returns the per-token loss. Notation in the formulas below:
`ratio = exp(logprobs - inputs["logprobs"])`, the learner-to-sampler probability ratio.

Policy-gradient losses (`register_policy_loss`) share options on top of their own term:
- `weights` (optional input): each token's weight in the sum (0 on prompt and environment
  tokens; 1/length for a sequence mean, ...). Absent: every token weighs 1.
- `old_logprobs` (optional input): the trainer's logprobs before the first of several updates
  on one batch; ratios are then to this old policy, times the sampler correction
  exp(old - sampler) (capped by `tis_cap` where the loss has one).
- `kl_coef`, `kl_estimator`, with input `ref_logprobs` (the base model's): a KL penalty to the
  reference, `kl_coef * k(logprobs, ref_logprobs)` per token (estimators: `kl_penalty`).
- `entropy_coef`: an entropy bonus, `-entropy_coef * H(token distribution)`; the learner
  computes H from the logits when the coefficient is > 0.
- Off-policy masks (0 = off), on the behaviour ratio r = exp(old - sampler), old being
  `old_logprobs` or the trainer's own logprobs (detached): `seq_mask_cap` C zeroes the policy
  term of a whole sequence whose ratio prod(r) over its model tokens leaves [1/C, C] (TRL's
  sequence masking); `token_mask_low`, `token_mask_high` zero it on tokens whose r leaves
  [low, high] (IcePop). Both bounds must bracket 1. The KL and entropy terms are not masked.

Add a loss with `@register_loss("name", inputs=(...), **config_defaults)` (or
`register_policy_loss`); a name registered twice is an error. loss_fn_config values are
thresholds, caps and coefficients (finite numbers >= 0), or one of a key's named choices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rlkit.api.errors import UnknownLossError

LossFn = Callable[..., torch.Tensor]


def _low_var_kl(d: torch.Tensor) -> torch.Tensor:
    d = d.clamp(-20, 20)
    return (torch.expm1(d) - d).clamp(-10, 10)


# KL estimators by name (the config's `kl.estimator` choices), as functions of
# d = ref_logprob - logprob on tokens sampled from the policy (Schulman, "Approximating KL
# divergence", 2020): all estimate KL(policy || ref).
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # -d: unbiased, its gradient is 0 in expectation: use it in the reward, not the loss.
    "k1": lambda d: -d,
    "k2": lambda d: 0.5 * d.square(),
    # exp(d) - 1 - d: unbiased, low variance, >= 0.
    "k3": lambda d: torch.expm1(d) - d,
    # k3 with d clamped to [-20, 20] and the estimate to [-10, 10] (verl's name and clamps).
    "low_var_kl": _low_var_kl,
}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(policy || ref) estimate by `estimator` (a name in KL_ESTIMATORS)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {estimator!r}; known: {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](ref_logprobs - logprobs)


def _token_mean(masks: list[torch.Tensor], max_tokens: int) -> list[float]:
    total = sum(float((m > 0).sum()) for m in masks)
    return [1.0 / max(total, 1.0)] * len(masks)


# How the per-token losses of a minibatch add up (the config's `loss.aggregation` choices): each
# datum's loss weights are scaled by the factor its function gives, from the datums' weight
# masks and max_tokens (a datum's trained tokens are those of weight > 0).
AGGREGATIONS: dict[str, Callable[[list[torch.Tensor], int], list[float]] | None] = {
    # The sum over tokens, the weights as they are (the API's semantics).
    "token_sum": None,
    # 1 / (model tokens in the minibatch): DAPO's token-level mean.
    "token_mean": _token_mean,
    # 1 / (sequence's model tokens x sequences): GRPO's original mean of means (and GSPO's).
    "sequence_mean": lambda masks, max_tokens: [
        1.0 / (max(float((m > 0).sum()), 1.0) * len(masks)) for m in masks
    ],
    # 1 / (max_tokens x sequences): Dr. GRPO's constant normaliser.
    "constant": lambda masks, max_tokens: [1.0 / (max_tokens * len(masks))] * len(masks),
}


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    # loss_fn_inputs the loss reads, besides target_tokens (always required).
    inputs: tuple[str, ...]
    # loss_fn_config keys the loss accepts, with their defaults.
    defaults: dict[str, float | str] = field(default_factory=dict)
    # loss_fn_inputs it reads when given.
    optional: tuple[str, ...] = ()
    # loss_fn_config keys whose value is a name, with the names allowed.
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # target_tokens may be (N, K): K targets per position, each with its own weight (a
    # distribution to match, e.g. a teacher's top-k); its inputs and outputs are (N, K) then.
    soft_targets: bool = False

    @property
    def is_policy_loss(self) -> bool:
        return "advantages" in self.inputs

    def resolve_config(self, name: str, config: dict | None) -> dict[str, float | str]:
        config = dict(config or {})
        unknown = sorted(set(config) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"loss {name!r} got unknown loss_fn_config keys {unknown}; "
                f"it accepts {sorted(self.defaults) or 'none'}"
            )
        resolved: dict[str, float | str] = dict(self.defaults)
        for key, value in config.items():
            if key in self.choices:
                if value not in self.choices[key]:
                    raise ValueError(
                        f"loss {name!r}: loss_fn_config {key}={value!r} is not one of "
                        f"{', '.join(self.choices[key])}"
                    )
                resolved[key] = value
                continue
            try:
                resolved[key] = float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"loss {name!r}: loss_fn_config {key}={value!r} must be a number"
                ) from None
            if not 0 <= resolved[key] < math.inf:
                raise ValueError(
                    f"loss {name!r}: loss_fn_config {key}={value} must be a finite number >= 0"
                )
        cap = resolved.get("seq_mask_cap")
        if cap and not cap > 1:
            raise ValueError(
                f"loss {name!r}: loss_fn_config seq_mask_cap={cap} must be > 1 (the ratio bounds "
                "[1/cap, cap] must bracket 1), or 0 for off"
            )
        low, high = resolved.get("token_mask_low"), resolved.get("token_mask_high")
        if (low or high) and not low < 1 < high:
            raise ValueError(
                f"loss {name!r}: loss_fn_config needs token_mask_low < 1 < token_mask_high (the "
                f"ratio bounds must bracket 1), got {low} and {high}; both 0 for off"
            )
        low, high = resolved.get("clip_low_threshold"), resolved.get("clip_high_threshold")
        if low is not None and high is not None and not low <= 1 <= high:
            raise ValueError(
                f"loss {name!r}: loss_fn_config needs clip_low_threshold <= 1 <= "
                f"clip_high_threshold (ratio bounds around 1), got {low} and {high}"
            )
        return resolved

    def required_inputs(self, config: dict) -> set[str]:
        """The loss_fn_inputs a datum must carry under the resolved `config`."""
        required = {"target_tokens", *self.inputs}
        if config.get("kl_coef"):
            required |= {"ref_logprobs", "weights"}  # weights say which tokens are the model's
        if config.get("entropy_coef"):
            required.add("weights")
        return required

    def needs_entropy(self, config: dict) -> bool:
        return bool(config.get("entropy_coef"))


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    inputs: tuple[str, ...],
    optional: tuple[str, ...] = (),
    choices: dict[str, tuple[str, ...]] | None = None,
    soft_targets: bool = False,
    **defaults: float | str,
):
    def decorate(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = LossSpec(fn, inputs, defaults, optional, choices or {}, soft_targets)
        return fn

    return decorate


# The options every policy-gradient loss has (see the module docstring).
POLICY_DEFAULTS: dict[str, float | str] = {
    "kl_coef": 0.0,
    "kl_estimator": "k3",
    "entropy_coef": 0.0,
    "seq_mask_cap": 0.0,
    "token_mask_low": 0.0,
    "token_mask_high": 0.0,
}


def behaviour_log_ratio(logprobs: torch.Tensor, inputs: dict) -> torch.Tensor:
    """log r per token: the policy being corrected for (old_logprobs, or the trainer's
    logprobs) minus the sampler's; no gradient."""
    old = inputs.get("old_logprobs")
    return ((logprobs if old is None else old) - inputs["logprobs"]).detach()


def model_tokens(inputs: dict) -> torch.Tensor:
    """Which tokens are the model's (weights > 0; without weights, those with an advantage)."""
    if "weights" in inputs:
        return inputs["weights"] > 0
    return inputs["advantages"] != 0


def token_kept(log_ratio: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Where the token mask (IcePop) keeps a token: its ratio exp(log_ratio) in [low, high]."""
    ratio = log_ratio.exp()
    return (ratio >= low) & (ratio <= high)


def sequence_masked(log_ratio_sum: torch.Tensor, cap: float) -> torch.Tensor:
    """Where the sequence mask drops a sequence: its ratio exp(log_ratio_sum) outside
    [1/cap, cap]."""
    return log_ratio_sum.double().abs() > math.log(cap)


def offpolicy_keep(
    log_ratio: torch.Tensor,
    tokens: torch.Tensor,
    seq_mask_cap: float = 0.0,
    token_mask_low: float = 0.0,
    token_mask_high: float = 0.0,
) -> torch.Tensor:
    """1.0 where a token's policy term is kept, 0.0 where an off-policy mask drops it (see the
    module docstring), for one sequence's `log_ratio` and its model `tokens`."""
    keep = torch.ones_like(log_ratio)
    if token_mask_high:
        keep = keep * token_kept(log_ratio, token_mask_low, token_mask_high)
    if seq_mask_cap and bool(sequence_masked((log_ratio * tokens).sum(), seq_mask_cap)):
        keep = keep * 0.0
    return keep


def register_policy_loss(name: str, requires: tuple[str, ...] = (), **defaults: float):
    """Register `fn(logprobs, inputs, **own_config) -> per-token policy term` as a loss with the
    shared options: token weights, old-policy logprobs, KL to a reference, entropy bonus.
    `requires`: optional inputs this loss cannot do without."""

    def decorate(fn: LossFn) -> LossFn:
        def loss(
            logprobs,
            inputs,
            kl_coef=0.0,
            kl_estimator="k3",
            entropy_coef=0.0,
            seq_mask_cap=0.0,
            token_mask_low=0.0,
            token_mask_high=0.0,
            **config,
        ):
            per_token = fn(logprobs, inputs, **config)
            if seq_mask_cap or token_mask_high:
                log_ratio = behaviour_log_ratio(logprobs, inputs)
                per_token = per_token * offpolicy_keep(
                    log_ratio, model_tokens(inputs), seq_mask_cap, token_mask_low, token_mask_high
                )
            if kl_coef:
                per_token = per_token + kl_coef * kl_penalty(
                    logprobs, inputs["ref_logprobs"], kl_estimator
                )
            if entropy_coef:
                per_token = per_token - entropy_coef * inputs["entropy"]
            if "weights" in inputs:
                per_token = per_token * inputs["weights"]
            return per_token

        loss.__doc__, loss.__name__ = fn.__doc__, fn.__name__
        register_loss(
            name,
            inputs=("logprobs", "advantages", *requires),
            optional=tuple(
                k for k in ("weights", "old_logprobs", "ref_logprobs") if k not in requires
            ),
            choices={"kl_estimator": tuple(KL_ESTIMATORS)},
            **defaults,
            **POLICY_DEFAULTS,
        )(loss)
        return fn

    return decorate


# Hosted Tinker losses rlkit cannot compute, and why.
NOT_AVAILABLE = {
    "stable_reinforce": "Tinker has not published its objective, only what it records while "
    "sampling",
}


def get_loss(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        why = f" ({NOT_AVAILABLE[name]})" if name in NOT_AVAILABLE else ""
        raise UnknownLossError(
            f"unknown loss_fn {name!r}{why}; known losses: {', '.join(sorted(LOSSES))}"
        ) from None


def _ratio(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor) -> torch.Tensor:
    return torch.exp(logprobs - sampler_logprobs)


@register_loss("cross_entropy", inputs=("weights",), soft_targets=True)
def cross_entropy(logprobs, inputs):
    """Supervised learning: -weights * logprobs (weights 0 mask out the prompt). With (N, K)
    target_tokens and weights, each position's K targets weighted (distillation onto a teacher's
    top-k distribution)."""
    return -inputs["weights"] * logprobs


def tis_capped(logprob_gap: torch.Tensor, tis_cap: float) -> torch.Tensor:
    """Where truncated IS caps the token weight: exp(gap) > tis_cap, with gap the trainer's
    logprob minus the sampler's (the weight `_split_ratio` clamps). For metrics."""
    return logprob_gap.exp() > tis_cap


def _split_ratio(logprobs, inputs, tis_cap: float):
    """(ratio, token weight) for the IS losses.

    Without `old_logprobs` (one optimizer step per batch of rollouts):
    tis_cap = 0: ratio = trainer/sampler, weight 1 (plain importance sampling).
    tis_cap > 0, truncated importance sampling (TIS): the sampler-to-old-trainer mismatch is
    taken out of the ratio and capped: weight = min(exp(old - sampler), tis_cap), ratio =
    exp(logprobs - old), the old policy being `logprobs.detach()`: exact for one update. Same
    value and gradient as tis_cap = 0 wherever the cap does not bite.
    With `old_logprobs` (several updates on one batch): ratio = exp(logprobs - old_logprobs),
    weight = exp(old_logprobs - sampler), capped at tis_cap when tis_cap > 0.
    """
    sampler_logprobs = inputs["logprobs"]
    old = inputs.get("old_logprobs")
    if old is None:
        if not tis_cap:
            return _ratio(logprobs, sampler_logprobs), 1.0
        old = logprobs.detach()
    weight = torch.exp(old - sampler_logprobs)
    if tis_cap:
        weight = weight.clamp(max=tis_cap)
    return torch.exp(logprobs - old), weight


@register_policy_loss("importance_sampling", tis_cap=0.0)
def importance_sampling(logprobs, inputs, tis_cap=0.0):
    """REINFORCE corrected for the sampler: -ratio * advantages (tis_cap: see _split_ratio)."""
    ratio, weight = _split_ratio(logprobs, inputs, tis_cap)
    return -weight * ratio * inputs["advantages"]


# clip_high_threshold above 1 + (1 - clip_low_threshold) is DAPO's clip-higher (e.g. 0.8 / 1.28).
@register_policy_loss("ppo", clip_low_threshold=0.8, clip_high_threshold=1.2, tis_cap=0.0)
def ppo(logprobs, inputs, clip_low_threshold, clip_high_threshold, tis_cap=0.0):
    """Clipped surrogate: -min(ratio * A, clip(ratio, low, high) * A), thresholds on the ratio
    (with tis_cap > 0 or old_logprobs the ratio is to the old trainer policy, times the TIS
    weight)."""
    ratio, weight = _split_ratio(logprobs, inputs, tis_cap)
    advantages = inputs["advantages"]
    clipped = ratio.clamp(clip_low_threshold, clip_high_threshold)
    return -weight * torch.minimum(ratio * advantages, clipped * advantages)


@register_policy_loss("cispo", clip_low_threshold=0.8, clip_high_threshold=1.2)
def cispo(logprobs, inputs, clip_low_threshold, clip_high_threshold):
    """Clipped IS weight as a constant coefficient: -sg(clip(ratio)) * logprobs * A (with
    old_logprobs: sg(clip(ratio to old) * exp(old - sampler)))."""
    ratio, correction = _split_ratio(logprobs, inputs, 0.0)
    weight = (ratio.clamp(clip_low_threshold, clip_high_threshold) * correction).detach()
    return -weight * logprobs * inputs["advantages"]


# beta's default is rlkit's choice; the hosted service documents the key but not a default.
@register_policy_loss("dro", beta=0.05)
def dro(logprobs, inputs, beta):
    """Direct reward optimisation: -(logprobs * A - beta/2 * (logprobs - sampler_logprobs)^2)."""
    drift = logprobs - inputs["logprobs"]
    return -(logprobs * inputs["advantages"] - 0.5 * beta * drift.square())


# Defaults from the GSPO paper (Zheng et al., 2025, section 5.1): clip range 3e-4 / 4e-4.
@register_policy_loss(
    "gspo", requires=("weights",), clip_low_threshold=1 - 3e-4, clip_high_threshold=1 + 4e-4
)
def gspo(logprobs, inputs, clip_low_threshold, clip_high_threshold):
    """Sequence-level ratio s = exp(mean over the model's tokens of (logprobs - old)), old being
    old_logprobs or the sampler's; -min(s * A, clip(s, low, high) * A), written per token as
    GSPO-token: s_t = sg(s) * exp(logprobs - sg(logprobs)) (value s, gradient s * grad
    logprobs_t). With weights 1/length (loss.aggregation=sequence_mean) the datum's sum is the
    paper's per-sequence objective. The model's tokens are those with weight > 0."""
    old = inputs.get("old_logprobs", inputs["logprobs"])
    mask = (inputs["weights"] > 0).to(logprobs.dtype)
    log_s = ((logprobs - old) * mask).sum() / mask.sum().clamp(min=1)
    s_t = torch.exp(log_s.detach() + logprobs - logprobs.detach())
    advantages = inputs["advantages"]
    clipped = s_t.clamp(clip_low_threshold, clip_high_threshold)
    return -torch.minimum(s_t * advantages, clipped * advantages)
