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

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def service(tmp_path):
    import rlkit

    return rlkit.ServiceClient(device="cpu", checkpoint_dir=tmp_path / "checkpoints")


@pytest.fixture
def trainer(service):
    return service.create_lora_training_client("rlkit-tiny", rank=8, seed=0)
