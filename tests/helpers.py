"""What the unit tests share (`from tests.helpers import ...`): datums of each kind, a few
supervised steps, trainer-vs-sampler logprobs, test environments built on pair_sum, and the skips
for optional packages (vLLM, bitsandbytes). Fixtures are in conftest.py; what only the end-to-end
tests use is in tests/e2e/runs.py."""

import importlib.util
import os

import pytest
import torch

from rlkit.api import types
from rlkit.examples import first_sft
from rlkit.rl.envs.base import Env, Grade
from rlkit.rl.envs.pair_sum import PairSumEnv

# A grader's three verdicts: right, wrong (in the asked format), unformatted.
RIGHT, WRONG, UNFORMATTED = Grade(True, True), Grade(False, True), Grade(False, False)


def sft_datums(tokenizer, n=4):
    """The first tutorial exercise's datums: `n` of its questions, each answered `foo`."""
    return [first_sft.make_datum(tokenizer, q, "foo") for q in first_sft.TRAIN_QUESTIONS[:n]]


def rl_datum(tokenizer, seed=0):
    """A policy-gradient datum (one question and answer) with random sampler logprobs and
    advantages, seeded."""
    g = torch.Generator().manual_seed(seed)
    d = first_sft.make_datum(tokenizer, "Why?", "because")
    n = d.model_input.length
    return types.Datum(
        d.model_input,
        {
            "target_tokens": d.loss_fn_inputs["target_tokens"],
            "logprobs": -torch.rand(n, generator=g) * 3,
            "advantages": torch.randn(n, generator=g),
        },
    )


def plain_datum(n=4, **inputs):
    """A cross_entropy datum of `n` tokens (ids 10, 11, ...); `inputs` replace loss_fn_inputs,
    and an input set to None is left out."""
    tokens = list(range(10, 10 + n))
    loss_inputs = {"target_tokens": tokens[1:] + [2], "weights": [1.0] * n}
    loss_inputs.update(inputs)
    return types.Datum(
        types.ModelInput.from_ints(tokens), {k: v for k, v in loss_inputs.items() if v is not None}
    )


def plain_rl_datum(n=4, **inputs):
    """`plain_datum` for a policy-gradient loss: sampler logprobs and advantages, no weights."""
    base = {"weights": None, "logprobs": [-1.0] * n, "advantages": [0.5] * n}
    base.update(inputs)
    return plain_datum(n, **base)


def policy_datum(n_prompt=2, n_model=3, with_ref=False):
    """A policy-gradient datum of `n_prompt` prompt tokens and `n_model` model tokens: logprob -1,
    advantage 1 and weight 1 on the model's, 0 on the prompt's; reference logprobs if asked."""
    tokens = list(range(1, n_prompt + n_model + 1))
    inputs = {
        "target_tokens": tokens[1:],
        "logprobs": [0.0] * (n_prompt - 1) + [-1.0] * n_model,
        "advantages": [0.0] * (n_prompt - 1) + [1.0] * n_model,
        "weights": [0.0] * (n_prompt - 1) + [1.0] * n_model,
    }
    if with_ref:
        inputs["ref_logprobs"] = [-1.0] * len(tokens[1:])
    return types.Datum(types.ModelInput.from_ints(tokens[:-1]), inputs)


def chat_datum(tokenizer, answer: str) -> types.Datum:
    """A chat-template question answered with `answer`, every token trained (cross_entropy)."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi?"}], add_generation_prompt=True, return_dict=False
    )
    tokens = prompt + tokenizer.encode(answer, add_special_tokens=False)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def train_step(trainer, data) -> float:
    """One cross_entropy step (Adam, lr 1e-2); the loss before it."""
    loss = trainer.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return loss


def supervised_steps(trainer, text: str, steps: int = 3, lr: float = 5e-2) -> None:
    """`steps` supervised steps on `text`, enough to move every adapter matrix (an output
    layer's included) well away from its start."""
    from rlkit.api import types

    tokens = trainer.get_tokenizer().encode(text)
    datum = types.Datum(
        types.ModelInput.from_ints(tokens[:-1]),
        {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    for _ in range(steps):
        trainer.forward_backward([datum], "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=lr)).result()


def adapter_tensors(trainer) -> dict[str, torch.Tensor]:
    """A copy of the adapter's tensors, named as peft saves them (clients on one base have
    adapters of different names)."""
    name = f".{trainer._learner.adapter_name}."
    return {n.replace(name, "."): p.detach().clone() for n, p in trainer._learner.params.items()}


def chat_prompt(tokenizer, question: str) -> list[int]:
    """`question` as a user's message in the tokenizer's chat template, ready for an answer."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False
    )


def trainer_logprobs(trainer, tokens: list[int]) -> torch.Tensor:
    """The trainer's logprob of each of `tokens` after the first."""
    from rlkit.api import types

    datum = types.Datum(
        types.ModelInput.from_ints(tokens[:-1]),
        {"target_tokens": tokens[1:], "weights": [0.0] * (len(tokens) - 1)},
    )
    out = trainer.forward([datum], "cross_entropy").result().loss_fn_outputs[0]
    return out["logprobs"].to_torch()


def sampled_logprob_gap(trainer, sampler, prompt: list[int], n: int = 4) -> float:
    """The largest gap between the logprobs `sampler` reports for the tokens it samples after
    `prompt` (n completions, 12 tokens, temperature 1) and the trainer's for the same tokens."""
    from rlkit.api import types

    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=5)
    worst = 0.0
    for seq in sampler.sample(types.ModelInput.from_ints(prompt), n, params).result().sequences:
        expected = trainer_logprobs(trainer, prompt + seq.tokens)[len(prompt) - 1 :]
        worst = max(worst, float((expected - torch.tensor(seq.logprobs)).abs().max()))
    return worst


class PairSumTurns(Env):
    """A base for test envs that differ from pair_sum only in their turns (`step`): pair_sum's
    problems, held-out set and grading."""

    def __init__(self):
        self.pair_sum = PairSumEnv(eval_size=2)

    def sample(self, rng, n, step=0):
        return self.pair_sum.sample(rng, n)

    def eval_problems(self):
        return self.pair_sum.eval_problems()

    def grade(self, problem, completion):
        return self.pair_sum.grade(problem, completion)


class Echo(PairSumTurns):
    """Answers every model turn with a numbered observation, for `max_turns` turns."""

    max_turns = 3

    def __init__(self, fail_on_turn: int = 0):
        super().__init__()
        self.fail_on_turn = fail_on_turn

    def step(self, problem, transcript):
        turn = transcript.count("<obs") + 1
        if turn == self.fail_on_turn:
            raise KeyError("no such tool")
        return f"<obs {turn}>"

    def metrics(self, problem, transcript):
        return {"observations": transcript.count("<obs")}


def skip_module_without_vllm() -> None:
    """Skip the calling test module when vllm is missing, unless RLKIT_REQUIRE_VLLM=1 (set by
    `make test`, so CI cannot pass by skipping)."""
    from rlkit.backend.engines import vllm

    if not vllm.available():
        if os.environ.get("RLKIT_REQUIRE_VLLM") == "1":
            raise RuntimeError("RLKIT_REQUIRE_VLLM=1 but vllm is not importable")
        pytest.skip("vllm is not installed (pip install 'rlkit[cpu]')", allow_module_level=True)


# The `quant` extra (`make setup` installs it): tests of a quantized base skip without it.
requires_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (pip install 'rlkit[quant]')",
)
