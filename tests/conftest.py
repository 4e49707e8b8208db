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
