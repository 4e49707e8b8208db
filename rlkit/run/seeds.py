"""Seeds derived from the run seed, and the determinism switches.

Every random stream of a run is a pure function of the run seed and a name (`derive_seed(seed,
"problems", step)`), never of how many draws came before. So a resumed run regenerates exactly
the problems and per-request sampling seeds an uninterrupted one would, and any rollout engine
that honours `SamplingParams.seed` reproduces the same rollouts without engine-specific state.
The global RNGs (python, numpy, torch) are seeded too, for code that uses them anyway, and
checkpoints save and restore their states.
"""

from __future__ import annotations

import hashlib
import os
import random


def derive_seed(seed: int, *names: object) -> int:
    """A 31-bit seed for the stream `names` of run `seed` (sha256: stable across processes,
    platforms and Python versions, unlike hash())."""
    key = "/".join(map(str, (seed, *names)))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") & 0x7FFF_FFFF


def rng(seed: int, *names: object) -> random.Random:
    """A private `random.Random` for the stream `names` of run `seed`."""
    return random.Random(derive_seed(seed, *names))


def rng_state(saved) -> tuple:
    """A `random.Random` state from its JSON form (lists where getstate() has tuples)."""
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)


def apply_determinism(cfg) -> None:
    """Seed the global RNGs and set the determinism switches of `cfg.determinism`.

    Call before any model or engine starts: the environment variables are read when CUDA's
    cuBLAS and vLLM initialize, not later.
    """
    import numpy as np
    import torch

    det = cfg.determinism
    if det.cublas_workspace:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = det.cublas_workspace
    os.environ["VLLM_BATCH_INVARIANT"] = "1" if det.vllm_batch_invariant else "0"
    if det.num_threads:
        torch.set_num_threads(det.num_threads)
    torch.use_deterministic_algorithms(det.deterministic_algorithms, warn_only=det.warn_only)
    if det.deterministic_algorithms:
        torch.backends.cudnn.benchmark = False  # benchmarking picks kernels by timing
    random.seed(derive_seed(cfg.seed, "python"))
    np.random.seed(derive_seed(cfg.seed, "numpy"))
    torch.manual_seed(derive_seed(cfg.seed, "torch"))
