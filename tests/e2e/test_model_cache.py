"""The model cache (rlkit.backend.models.cached) across processes: two processes asking for an
entry nobody has built; one builds it under the cache's lock, the other waits."""

from pathlib import Path

import pytest

from rlkit.backend import models

# Starts two processes.
pytestmark = pytest.mark.slow


def _build_slowly(staging):
    import os
    import time

    time.sleep(1.0)  # long enough for the other process to arrive while this one builds
    (staging / "weights.bin").write_bytes(b"built")
    with open(os.environ["BUILDS"], "a") as log:
        log.write(f"{os.getpid()}\n")
    return {"name": "slow"}


def _resolve_in_child(target):
    return str(models.cached(Path(target), _build_slowly))


def test_concurrent_converters_wait_for_one_another(tmp_path, monkeypatch):
    """Two processes asking for an entry nobody has built: one builds (the conversion runs under
    the cache's lock, as the built-in models' build does), the other waits and uses it."""
    import multiprocessing

    monkeypatch.setenv("BUILDS", str(tmp_path / "builds.log"))
    target = tmp_path / "models" / "slow-entry"
    # Forked (what they run is file locks and sleeps, no torch op): a spawned process imports
    # torch and transformers first, 10 s of CPU for a check of 1 s.
    with multiprocessing.get_context("fork").Pool(2) as pool:
        paths = pool.map(_resolve_in_child, [str(target), str(target)])
    assert paths == [str(target), str(target)]
    assert len((tmp_path / "builds.log").read_text().splitlines()) == 1
    assert (target / "weights.bin").read_bytes() == b"built"
