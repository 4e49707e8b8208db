"""Test setup: a private model cache per session, and no network lookups.

HF_HUB_OFFLINE makes a hub id that is not cached fail at once instead of after retries; the
real loading code still runs. Both must be set before transformers is imported.
"""

import os
import tempfile

os.environ.setdefault("RLKIT_CACHE_DIR", tempfile.mkdtemp(prefix="rlkit-test-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from rlkit.rl.envs.base import Env  # noqa: E402
from rlkit.rl.envs.pair_sum import PairSumEnv  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def service(tmp_path):
    """A float32 client on the CPU, or on RLKIT_TEST_DEVICE (e.g. cuda, for a check on a GPU
    machine: CI has none)."""
    import rlkit

    device = os.environ.get("RLKIT_TEST_DEVICE", "cpu")
    return rlkit.ServiceClient(
        device=device, dtype="float32", checkpoint_dir=tmp_path / "checkpoints"
    )


@pytest.fixture
def trainer(service):
    return service.create_lora_training_client("rlkit-tiny", rank=8, seed=0)


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


def replace_rollout_metrics(directory, body: str) -> str:
    """A PYTHONPATH under which a Python process replaces, as it starts (sitecustomize), the
    loop's `rlkit.rl.rollouts.rollout_metrics` with one running `body` (Python lines, indented
    by 4; `original(*args, **kwargs)` is the real one). For fault injection in child processes."""
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(
        "import time\n\nimport rlkit.rl.rollouts\n\n"
        "original = rlkit.rl.rollouts.rollout_metrics\n\n\n"
        f"def replacement(*args, **kwargs):\n{body}\n\n\n"
        "rlkit.rl.rollouts.rollout_metrics = replacement\n"
    )
    return str(directory)


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


def skip_module_without_vllm() -> None:
    """Skip the calling test module when vllm is missing, unless RLKIT_REQUIRE_VLLM=1 (set by
    `make test`, so CI cannot pass by skipping)."""
    from rlkit.backend.engines import vllm

    if not vllm.available():
        if os.environ.get("RLKIT_REQUIRE_VLLM") == "1":
            raise RuntimeError("RLKIT_REQUIRE_VLLM=1 but vllm is not importable")
        pytest.skip("vllm is not installed (pip install 'rlkit[cpu]')", allow_module_level=True)


def wait_for_lines(path, lines: int, process, timeout: float = 240.0) -> None:
    """Until the file `path` has `lines` lines (a run's progress), `process` ends, or `timeout`
    seconds pass."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.2)


def free_port() -> int:
    """A TCP port nothing listens on right now, on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def smollm2():
    """The real pretrained model's converted checkpoint (its directory), converted once per test
    session (~20 s); skipped when its package is missing, unless RLKIT_REQUIRE_SMOLLM2=1 (set
    by `make test`, whose setup installs it, so CI cannot pass by skipping)."""
    from rlkit.api.errors import ModelNotFoundError
    from rlkit.backend import models

    try:
        return models.resolve("smollm2-135m-instruct")
    except ModelNotFoundError as exc:
        if os.environ.get("RLKIT_REQUIRE_SMOLLM2") == "1":
            raise
        pytest.skip(str(exc))


@pytest.fixture
def tied_llama(smollm2, tmp_path):
    """A small random-init llama with SmolLM2's tokenizer and its tied output layer."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlkit.backend import models

    real = json.loads((Path(smollm2) / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=real["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        bos_token_id=real["bos_token_id"],
        eos_token_id=real["eos_token_id"],
        pad_token_id=real["pad_token_id"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = tmp_path / "tied-llama"
    path.mkdir()
    models.save_checkpoint(model, AutoTokenizer.from_pretrained(smollm2), path)
    return str(path)
