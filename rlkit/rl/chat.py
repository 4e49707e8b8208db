"""Environment messages in the model's own chat template, token in, token out.

A chat model reads a tool's result or a user's reply as a message of its own (`<|im_start|>tool
...<|im_end|>`), not as more of its own words. When an environment answers with a role (`tool` or
`user`), the episode's context grows by exactly the tokens the tokenizer's chat template writes
for that: the end of the model's turn (its end-of-turn token, if the model stopped elsewhere, e.g.
at a tool call's closing tag, and whatever the template puts after it), the new message, and the
header of the model's next turn. Earlier tokens are never re-tokenized: the model's sampled
tokens stay as it sampled them.

The template's text for one message is read off a rendering of a stand-in conversation (a user's
question, a stand-in model turn, the message), so it is the template's own, whatever the
template; one whose assistant turns do not end with the tokenizer's end-of-turn token is refused,
naming it. The episode's tokens then equal the template's rendering of the whole conversation
wherever the template renders earlier turns as they were sampled (it may not: Qwen3's drops an
empty think block from earlier turns, while the episode keeps the tokens the model saw).
"""

from __future__ import annotations

from collections.abc import Mapping

from rlkit.rl.envs.base import ROLES, Env, EnvError, env_name

# The stand-in for the model's turn in the conversations the template renders.
STAND_IN = "rlkit-model-turn"


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot render an environment message after a model turn."""


def _after_turn(tokenizer, role: str, content: str) -> str:
    """The template's text after a model turn's content when a `role` message follows: the
    turn's end-of-turn token and what follows it, the message, and the next turn's header.
    Read off one rendering of a stand-in conversation, so it is the template's own text."""
    conversation = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": STAND_IN},
        {"role": role, "content": content},
    ]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    at = text.find(STAND_IN)
    tail = text[at + len(STAND_IN) :] if at >= 0 else ""
    eos = tokenizer.eos_token
    if not eos or not tail.startswith(eos):
        raise ChatTemplateError(
            f"the chat template of {type(tokenizer).__name__} does not end an assistant turn "
            f"with the end-of-turn token {eos!r}: a {role!r} message cannot follow a sampled "
            "turn token in, token out"
        )
    return tail


def message_tokens(tokenizer, role: str, content: str, turn_tokens: list[int]) -> list[int]:
    """The tokens that follow a model turn (`turn_tokens`, as sampled) in the chat template when
    the environment answers with a `role` message of `content`: the end of the turn (its
    end-of-turn token, unless the model sampled it), the message, and the next assistant
    turn's header."""
    if role not in ROLES:
        raise ChatTemplateError(f"an observation's role must be one of {ROLES}, got {role!r}")
    tail = _after_turn(tokenizer, role, content)
    if turn_tokens and turn_tokens[-1] == tokenizer.eos_token_id:
        tail = tail[len(tokenizer.eos_token) :]
    return tokenizer.encode(tail, add_special_tokens=False)


def observation_tokens(env: Env, observation, tokenizer, turn: list[int], where: str = ""):
    """An observation's text (what the transcript shows) and the tokens that extend the context:
    raw text's own tokens, or a message's in the chat template (see rlkit.rl.chat). An EnvError
    naming the env for anything else."""
    role = env.observation_role
    if isinstance(observation, Mapping) and set(observation) == {"role", "content"}:
        role, observation = observation["role"], observation["content"]
    if not isinstance(observation, str):
        raise EnvError(
            f"env {env_name(env)}.step returned {type(observation).__name__} "
            f"{observation!r:.60} {where}; it must return the observation as a str, a message "
            '{"role": "tool" | "user", "content": str}, or None to end the episode'
        )
    if role is None:
        return observation, tokenizer.encode(observation, add_special_tokens=False)
    try:
        return observation, message_tokens(tokenizer, role, observation, turn)
    except ChatTemplateError as exc:
        raise EnvError(f"env {env_name(env)}: {exc}") from None
