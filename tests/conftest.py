"""Test setup: a private model cache per session, no network lookups, and the fixtures tests in
every directory use (a client on the tiny model, the real pretrained model, the hosted SDK).
Plain helpers are in tests/helpers.py (tests/e2e/runs.py for the end-to-end tests).

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

# `make test` sets OMP_NUM_THREADS (one thread for each of its test processes); else 2.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))


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


def pytest_sessionstart(session):
    """With several test processes (xdist), the real model is converted (~30 s of one core) in
    the background from the start: the first two tests that need it, one in each process, used
    to wait for it together, one core idle. The `smollm2` fixture waits for it (the model
    cache's lock) or converts it itself if this did not."""
    config = session.config
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    if "not slow" in (config.option.markexpr or ""):
        return
    import subprocess
    import sys

    code = "from rlkit.backend import models; models.resolve('smollm2-135m-instruct')"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop():  # SIGINT: the cache's staging folder is removed as the interpreter unwinds
        import signal

        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

    config.add_cleanup(stop)


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


@pytest.fixture(scope="session")
def tinker():
    """The hosted Tinker SDK (the real `tinker` package, a dev dependency): the reference for
    compatibility tests, which skip without it."""
    return pytest.importorskip("tinker")
