"""Environment messages in the chat template, token in, token out (rlkit.rl.chat), against the
oracle: the template's rendering of the whole conversation equals the episode's tokens, for
SmolLM2's template and a Qwen3-style one with think tags; and the environment's tokens stay out
of the loss in a sampled episode."""

import random
from pathlib import Path

import pytest
import torch

from rlkit.rl.chat import ChatTemplateError, message_tokens
from rlkit.rl.rollouts import group_datums, logprob_gaps, sample_groups
from rlkit.rl.sft import completion_datum, prompt_tokens
from tests.helpers import PairSumTurns

QWEN3_STYLE = (Path(__file__).parents[1] / "data" / "qwen3_style.jinja").read_text()


def byte_tokenizer(template: str | None = None):
    from rlkit.backend.models import build_tokenizer

    tokenizer = build_tokenizer()
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def smollm2_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# A tool-use conversation: (the model's turn, whether it ended with the end-of-turn token, the
# environment's answer). A turn that calls the tool stops at the call's closing tag.
TURNS = [
    ("I will use the calculator. <calc>12*7</calc>", False, "<result>84</result>"),
    ("Now the second one. <calc>84*3</calc>", False, "<result>252</result>"),
    ("Let me check my work first.", True, "Looks fine, go on."),
    ("The answer is <answer>252</answer>.", True, None),
]
THINKING = [
    (f"<think>\nStep {i}: what do I need?\n</think>\n\n{text}", ended, obs)
    for i, (text, ended, obs) in enumerate(TURNS)
]


def episode(tokenizer, messages, turns, roles):
    """The prompt and the episode's tokens, built as rollouts build them: each turn's tokens as
    sampled, then the environment's message tokens."""
    prompt = prompt_tokens(tokenizer, messages)
    tokens = []
    for (text, ended, observation), role in zip(turns, roles, strict=True):
        turn = tokenizer.encode(text, add_special_tokens=False)
        turn += [tokenizer.eos_token_id] if ended else []
        tokens += turn
        if observation is not None:
            tokens += message_tokens(tokenizer, role, observation, turn)
    return prompt, tokens


def oracle(tokenizer, messages, turns, roles):
    conversation = list(messages)
    for (text, _, observation), role in zip(turns, roles, strict=True):
        conversation.append({"role": "assistant", "content": text})
        if observation is not None:
            conversation.append({"role": role, "content": observation})
    return tokenizer.apply_chat_template(conversation, return_dict=False)


def check_against_oracle(tokenizer, turns, roles, system=True):
    messages = [{"role": "user", "content": "What is 12 * 7 * 3?"}]
    if system:
        messages.insert(0, {"role": "system", "content": "Multiply. Tool: <calc>2*3</calc>"})
    prompt, tokens = episode(tokenizer, messages, turns, roles)
    expected = oracle(tokenizer, messages, turns, roles)
    ours = prompt + tokens
    assert ours == expected[: len(ours)], (
        tokenizer.decode(ours),
        tokenizer.decode(expected[: len(ours)]),
    )
    # What the template writes after the final end-of-turn token (a newline) is not sampled.
    assert tokenizer.decode(expected[len(ours) :]).strip() == ""


ROLE_SETS = [("tool",) * 4, ("user",) * 4, ("tool", "tool", "user", "tool")]


@pytest.mark.slow  # the real model's checkpoint: converted once per session (~20 s)
@pytest.mark.parametrize("roles", ROLE_SETS)
@pytest.mark.parametrize("system", [True, False])
def test_smollm2s_template_renders_the_episode_token_for_token(smollm2, roles, system):
    """SmolLM2's template adds a default system prompt when there is none: both ways."""
    check_against_oracle(smollm2_tokenizer(smollm2), TURNS, roles, system)


@pytest.mark.parametrize("roles", [("tool",) * 4, ("tool", "tool", "tool", "tool")])
@pytest.mark.parametrize("turns", [TURNS, THINKING], ids=["plain", "think"])
def test_a_qwen3_style_template_with_think_tags_renders_the_episode_token_for_token(roles, turns):
    """Tool results go in one user turn as <tool_response> blocks, and a turn's reasoning is
    re-rendered from its <think> tags: the episode equals the rendering where the turns' think
    blocks are written as the template writes them."""
    tokenizer = byte_tokenizer(QWEN3_STYLE)
    if turns is TURNS:
        # The template gives the last turn an empty think block the model did not write: the
        # episode is the model's tokens, so only the earlier turns can match.
        turns = [*turns[:-1], (THINKING[-1][0], True, None)]
    check_against_oracle(tokenizer, turns, roles)


def test_a_template_that_does_not_end_turns_with_the_end_of_turn_token_is_refused():
    tokenizer = byte_tokenizer(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="does not end an assistant turn"):
        message_tokens(tokenizer, "tool", "6", [1, 2])


@pytest.mark.slow  # the real model's checkpoint: converted once per session (~20 s)
def test_the_warm_start_renders_observations_as_rollouts_do(smollm2):
    tokenizer = smollm2_tokenizer(smollm2)
    messages = [{"role": "user", "content": "What is 12 * 7?"}]
    prompt = prompt_tokens(tokenizer, messages)
    parts = ["<calc>12*7</calc>", "<result>84</result>", "<answer>84</answer>"]

    def render(observation, turn):
        return message_tokens(tokenizer, "tool", observation, turn)

    datum = completion_datum(tokenizer, prompt, parts, render)
    targets = datum.loss_fn_inputs["target_tokens"].tolist()
    weights = datum.loss_fn_inputs["weights"].tolist()
    conversation = [
        *messages,
        {"role": "assistant", "content": parts[0]},
        {"role": "tool", "content": parts[1]},
        {"role": "assistant", "content": parts[2]},
    ]
    expected = tokenizer.apply_chat_template(conversation, return_dict=False)
    assert [*prompt[:1], *targets] == expected[: len(targets) + 1]
    call = tokenizer.encode(parts[0], add_special_tokens=False)
    between = render(parts[1], call)
    start = len(prompt) - 1
    trained = [t for t, w in zip(targets[start:], weights[start:], strict=True) if w]
    assert trained == call + tokenizer.encode(parts[2], add_special_tokens=False) + [
        tokenizer.eos_token_id
    ]
    assert not any(weights[start + len(call) : start + len(call) + len(between)])


class ToolEcho(PairSumTurns):
    """Answers every model turn with a tool message, for `max_turns` turns."""

    max_turns = 3
    observation_role = "tool"
    stop = ("</calc>",)

    def step(self, problem, transcript):
        return f"<result>{transcript.count('<result>') + 1}</result>"


def test_sampled_tool_messages_are_the_templates_and_stay_out_of_the_loss(trainer):
    tokenizer = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client()
    from rlkit.api import types

    params = types.SamplingParams(max_tokens=6, temperature=1.0)
    env = ToolEcho()
    groups = sample_groups(
        sampler, tokenizer, env, env.sample(random.Random(0), 2), 2, params, [7, 8]
    )
    datums = []
    for group in groups:
        datums += group_datums(group, torch.tensor([1.0, -1.0]))
        for episode in group.episodes:
            assert episode.turns == 3
            env_text = tokenizer.decode(
                [t for t, m in zip(episode.tokens, episode.model_mask, strict=True) if not m]
            )
            assert env_text.count("<|im_start|>tool\n<result>") == 2
            assert env_text.count("<|im_start|>assistant\n") == 2
    out = trainer.forward_backward(datums, "importance_sampling").result()
    gaps = logprob_gaps(datums, out.loss_fn_outputs)
    assert gaps.numel() == sum(sum(e.model_mask) for g in groups for e in g.episodes)
    assert gaps.abs().max() < 1e-4  # later turns were sampled from exactly this context
