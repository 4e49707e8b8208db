"""The supervised loop: cross_entropy on (prompt, completion) pairs through the training API.

Used by the RL trainer's warm start (worked solutions from the environment) and usable alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from rlkit.api import types
from rlkit.rl.chat import observation_tokens
from rlkit.rl.envs.base import Env, Problem, draw


def prompt_tokens(tokenizer, messages: Sequence[dict]) -> list[int]:
    """The chat-formatted prompt, ending where the assistant's reply starts."""
    return tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=True, return_dict=False
    )


def completion_datum(
    tokenizer, prompt: list[int], completion: str | Sequence, render=None
) -> types.Datum:
    """A datum that trains on the completion and its end-of-turn token, never on the prompt.
    A multi-turn completion is a list alternating the model's turns and the environment's
    observations (`[turn, observation, turn, ...]`): observations stay in the context but out of
    the loss, as in RL, and `render(observation, turn_tokens)` gives their tokens (raw text's
    own by default; an env's chat messages through the template, as its rollouts have them)."""
    parts = [completion] if isinstance(completion, str) else list(completion)
    tokens, weights = list(prompt), [0.0] * (len(prompt) - 1)
    turn: list[int] = []
    for i, text in enumerate(parts):
        if i % 2 == 0:  # the model's turn
            part = turn = tokenizer.encode(text, add_special_tokens=False)
        elif render is None:
            part = tokenizer.encode(text, add_special_tokens=False)
        else:
            part = render(text, turn)
        tokens += part
        weights += [float(i % 2 == 0)] * len(part)
    tokens.append(tokenizer.eos_token_id)
    weights.append(1.0)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def train(
    trainer,
    make_batch: Callable[[int], list[types.Datum]],
    steps: int,
    adam: types.AdamParams,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    start: int = 0,
    stop: Callable[[int], bool] | None = None,
) -> list[float]:
    """Steps `start` .. `steps - 1` of forward_backward + optim_step; returns the mean loss per
    target token of each. `stop(done)`, called after each step but the last, ends the loop early
    when it returns True (Ctrl-C / SIGTERM).

    The next batch is built while the current step runs (the calls return futures).
    """
    losses = []
    batch = make_batch(start)
    for step in range(start, steps):
        fwd_bwd = trainer.forward_backward(batch, loss_fn="cross_entropy")
        optim = trainer.optim_step(adam)
        tokens = sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in batch)
        if step + 1 < steps:
            batch = make_batch(step + 1)
        loss = fwd_bwd.result().metrics["loss:sum"]
        losses.append(loss / max(tokens, 1.0))
        optim.result()
        if on_step:
            on_step(step, {"sft/loss": losses[-1]})
        if stop is not None and step + 1 < steps and stop(step + 1):
            break
    return losses


def warm_start(
    trainer,
    env: Env,
    rng: random.Random,
    steps: int,
    batch_size: int,
    adam: types.AdamParams,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    start: int = 0,
    stop: Callable[[int, object], bool] | None = None,
) -> list[float]:
    """Supervised steps `start` .. `steps - 1` on the environment's worked solutions, drawn from
    `rng`. `stop(done, state)` may end them early (see `train`); `state` is `rng`'s state
    before the batch of step `done`, from which a resumed warm start goes on."""
    tokenizer = trainer.get_tokenizer()
    states = {}  # rng state before each batch: the next batch is drawn a step ahead

    def make_batch(step: int) -> list[types.Datum]:
        states[step] = rng.getstate()
        problems: list[Problem] = draw(env, rng, batch_size, step)
        return [
            completion_datum(
                tokenizer, prompt_tokens(tokenizer, p.messages), env.solution(p), render
            )
            for p in problems
        ]

    def render(observation, turn: list[int]) -> list[int]:
        return observation_tokens(env, observation, tokenizer, turn)[1]

    stop_at = None if stop is None else lambda done: stop(done, states.pop(done))
    return train(trainer, make_batch, steps, adam, on_step, start, stop_at)
