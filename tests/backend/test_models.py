"""Base models and tokenizers (rlkit.backend.models): built-in models built deterministically
and cached (a corrupt cache rebuilt), local directories, and the errors of a missing model, an
unreachable hub and a cache dir that is a file."""

import json

import pytest
import torch

import rlkit
from rlkit.api.errors import ModelNotFoundError, RlkitError
from rlkit.backend import models


def test_builtin_build_is_deterministic(tmp_path, monkeypatch):
    digests = []
    for sub in ("a", "b"):
        monkeypatch.setenv("RLKIT_CACHE_DIR", str(tmp_path / sub))
        path = models.builtin_path("rlkit-tiny")
        digests.append(json.loads((path / "rlkit_build.json").read_text())["sha256"])
    assert digests[0] == digests[1]
    assert "model.safetensors" in digests[0]


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("RLKIT_CACHE_DIR", str(tmp_path))
    path = models.builtin_path("rlkit-tiny")
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # a truncated file
    assert models.builtin_path("rlkit-tiny") == path
    assert weights.read_bytes() == good
    (path / "rlkit_build.json").unlink()  # an interrupted build
    models.builtin_path("rlkit-tiny")
    assert weights.read_bytes() == good


def test_tokenizer_chat_template_and_byte_coverage():
    tok = models.load_tokenizer("rlkit-tiny")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "héllo 1+2"}], add_generation_prompt=True, return_dict=False
    )
    text = tok.decode(ids)
    assert text == "<|im_start|>user\nhéllo 1+2<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
    assert tok.decode(tok.encode("any text ✓", add_special_tokens=False)) == "any text ✓"


def test_local_directory_loads_like_a_hub_id():
    path = models.builtin_path("rlkit-tiny")
    by_name = models.load_model("rlkit-tiny")
    by_path = models.load_model(str(path))
    for (n1, p1), (n2, p2) in zip(
        by_name.named_parameters(), by_path.named_parameters(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2)


def test_missing_model_says_what_was_tried():
    with pytest.raises(ModelNotFoundError) as info:
        models.load_tokenizer("no-such-org/no-such-model")
    message = str(info.value)
    assert "built-in models ['rlkit-small', 'rlkit-tiny', 'smollm2-135m-instruct']" in message
    assert "local directory" in message and "does not exist" in message
    assert "model hub" in message


def test_missing_local_path_fails_without_hub_lookup(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        models.load_model(str(tmp_path / "nothing-here"))


def test_nonexistent_base_model_says_what_was_tried(service):
    with pytest.raises(
        ModelNotFoundError, match=r"'rlkit-tinyy' could not be loaded. Tried: \(1\) built-in models"
    ):
        service.create_lora_training_client("rlkit-tinyy")


def test_an_unreachable_hub_fails_at_once_with_one_message(monkeypatch):
    """Fault injection: the hub lookup fails as it does offline; no retried download follows."""
    import huggingface_hub

    from rlkit.api.errors import ModelNotFoundError
    from rlkit.backend import models

    calls = []

    def unreachable(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(ModelNotFoundError, match="the model hub / its local cache — Connection"):
        models.load_tokenizer("not-a-model")
    assert calls == ["not-a-model"]


def test_a_cache_dir_that_is_a_file_is_named(tmp_path, monkeypatch):

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    monkeypatch.setenv("RLKIT_CACHE_DIR", str(not_a_dir))
    with pytest.raises(RlkitError, match=f"RLKIT_CACHE_DIR={not_a_dir} is a file, not a directory"):
        rlkit.ServiceClient(device="cpu")
