"""What the loop adds to the reward functions' scores, before advantages: a KL penalty to the
reference policy (`kl.placement=reward`) and DAPO's soft overlong penalty (`overlong.mode=penalty`).
Each shows up as a reward component (`reward/kl_ref`, `reward/overlong`) with its weight in
the total."""

from __future__ import annotations

import torch

from rlkit.api import types
from rlkit.api.losses import kl_penalty
from rlkit.rl.rollouts import Group


def attach_reference(trainer, groups_P: list[Group], estimator: str) -> None:
    """Each episode's logprobs under the KL reference (the trainer's model with its adapter
    off or swapped, see TrainingClient.set_reference: one forward pass, no second copy) and its
    KL(policy || reference) estimate summed over the model's tokens, from the sampler's
    logprobs."""
    datums = [
        types.Datum(
            model_input=types.ModelInput.from_ints((g.prompt + e.tokens)[:-1]),
            loss_fn_inputs={"target_tokens": (g.prompt + e.tokens)[1:]},
        )
        for g in groups_P
        for e in g.episodes
    ]
    if not datums:
        return
    refs = iter(trainer.compute_reference_logprobs(datums).result())
    for group in groups_P:
        n_prompt = len(group.prompt) - 1
        for episode in group.episodes:
            ref = next(refs).to_torch()[n_prompt:]
            episode.ref_logprobs = ref.tolist()
            kl = kl_penalty(torch.tensor(episode.logprobs), ref, estimator)
            episode.kl_ref = float(kl[torch.tensor(episode.model_mask, dtype=torch.bool)].sum())


def shape_rewards(cfg, env, groups_P: list[Group], scores_P: list) -> None:
    """The KL penalty (kl.placement=reward: -kl.coef x the sequence's summed estimate) and the
    overlong penalty (overlong.mode=penalty) as components of each group's scores."""
    if cfg.kl.coef and cfg.kl.placement == "reward":
        add_component(scores_P, groups_P, "kl_ref", -cfg.kl.coef, lambda e: e.kl_ref)
    if cfg.overlong.mode == "penalty":
        limit, buffer = cfg.max_tokens * env.max_turns, cfg.overlong.buffer
        add_component(
            scores_P,
            groups_P,
            "overlong",
            cfg.overlong.weight,
            lambda e: overlong_penalty(sum(e.model_mask), limit, buffer),
        )


def add_component(scores_P, groups_P, name: str, weight: float, value) -> None:
    """`value(episode)` as reward component `name`, added to each total with `weight`."""
    for group, scores in zip(groups_P, scores_P, strict=True):
        if scores is None:
            continue
        values = [float(value(e)) for e in group.episodes]
        scores.components[name] = values
        scores.total = [t + weight * v for t, v in zip(scores.total, values, strict=True)]


def overlong_penalty(length: int, limit: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to `limit - buffer` tokens, then falling linearly
    to -1 at `limit`."""
    start = limit - buffer
    return 0.0 if length <= start else -min(1.0, (length - start) / buffer)
