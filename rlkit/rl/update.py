"""The policy update of one RL step: optimizer steps on a batch of rollouts' datums.

`updates_per_batch` passes over the batch, each split into `minibatches` optimizer steps
(shuffled per pass, seeded from (seed, step, pass)). With more than one optimizer step, the
trainer's logprobs are computed once before the first (`old_logprobs`), so every later step's
ratio is to that old policy and PPO / CISPO / GSPO clipping bounds the distance from it, while
the correction from the sampler to the old policy (exp(old - sampler), capped by `tis_cap`)
stays exact. With one step the old policy is the current one and nothing extra is computed.

`loss.aggregation` sets each token's weight in the summed loss (`weights`, 0 off the model's
tokens), per minibatch: token_sum, token_mean (DAPO), sequence_mean (GRPO, GSPO) or constant
(Dr. GRPO), declared with their factors in `rlkit.api.losses.AGGREGATIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rlkit.api import types
from rlkit.api.losses import AGGREGATIONS
from rlkit.rl.rollouts import gaps_and_sums
from rlkit.run import seeds


@dataclass
class UpdateResult:
    # Sum of the losses of the first optimizer step's datums.
    loss: float | None
    # Trainer minus sampler logprobs before any update, on the trained tokens.
    gaps: torch.Tensor | None
    # Mean gradient norm over the optimizer steps.
    grad_norm: float
    optimizer_steps: int
    # The same gaps summed over each datum's trained tokens (the sequence's log ratio).
    sequence_gaps: torch.Tensor | None = None


def aggregate(datums_D, mode: str, max_tokens: int) -> list[types.Datum]:
    """The datums with their `weights` scaled for `mode`, a name in AGGREGATIONS."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss.aggregation {mode!r}; known: {', '.join(AGGREGATIONS)}")
    if AGGREGATIONS[mode] is None:
        return list(datums_D)
    masks = [d.loss_fn_inputs["weights"].to_torch() for d in datums_D]
    scales = AGGREGATIONS[mode](masks, max_tokens)
    return [_with(d, weights=m * s) for d, m, s in zip(datums_D, masks, scales, strict=True)]


def policy_update(
    trainer,
    datums_D: list[types.Datum],
    loss_name: str,
    loss_config: dict,
    adam: types.AdamParams,
    *,
    updates_per_batch: int = 1,
    minibatches: int = 1,
    aggregation: str = "token_sum",
    max_tokens: int = 1,
    seed: int = 0,
    step: int = 0,
) -> UpdateResult:
    """Optimizer steps on the batch's `datums_D`."""
    n_steps = updates_per_batch * minibatches
    gaps = seq_gaps = None
    if n_steps > 1 and datums_D:
        before = trainer.forward(datums_D, loss_name, loss_config).result().loss_fn_outputs
        gaps, seq_gaps = gaps_and_sums(datums_D, before)
        datums_D = [
            _with(d, old_logprobs=o["logprobs"].to_torch())
            for d, o in zip(datums_D, before, strict=True)
        ]
    loss, norms = None, []
    for epoch in range(updates_per_batch):
        order = list(range(len(datums_D)))
        if minibatches > 1:
            seeds.rng(seed, "minibatch", step, epoch).shuffle(order)
        for part in range(minibatches):
            mine = [datums_D[i] for i in order[part::minibatches]]
            if not mine:
                continue  # fewer datums than minibatches
            mine = aggregate(mine, aggregation, max_tokens)
            out = trainer.forward_backward(mine, loss_name, loss_config)
            norms.append(trainer.optim_step(adam).result().metrics["grad_norm"])
            if loss is None:
                result = out.result()
                loss = result.metrics["loss:sum"]
                if gaps is None:
                    gaps, seq_gaps = gaps_and_sums(mine, result.loss_fn_outputs)
    return UpdateResult(loss, gaps, sum(norms) / len(norms), len(norms), seq_gaps)


def _with(datum: types.Datum, **inputs: torch.Tensor) -> types.Datum:
    extra = {k: types.TensorData.from_torch(v.float()) for k, v in inputs.items()}
    return replace(datum, loss_fn_inputs={**datum.loss_fn_inputs, **extra})
