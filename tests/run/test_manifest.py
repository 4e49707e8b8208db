"""The run manifest (rlkit.run.manifest): the config hash leaves out the keys that only say how
to start a run; each segment of a resumed run keeps its own record, a fresh start clears them.
A real run's manifest is checked end to end in tests/e2e/test_repro.py."""

import functools
import hashlib
import json
import os

import torch

from rlkit.run import manifest
from rlkit.run.config import compose


def test_the_config_hash_leaves_out_how_a_run_starts():
    config = {"seed": 0, "optim": {"lr": 0.1}, "resume": "never", "distributed": {"timeout_s": 60}}
    digest = manifest.config_hash(config)
    assert digest == manifest.config_hash(
        {**config, "resume": "auto", "distributed": {"timeout_s": 5}}
    )
    assert digest == manifest.config_hash(dict(reversed(config.items())))  # key order
    assert digest != manifest.config_hash({**config, "seed": 1})
    assert digest != manifest.config_hash({**config, "optim": {"lr": 0.2}})


def test_flatten_dots_the_keys_of_nested_dicts():
    nested = {"a": {"b": 1, "c": {"d": None}}, "e": [1, 2], "f": {}}
    assert manifest.flatten(nested) == {"a.b": 1, "a.c.d": None, "e": [1, 2], "f": {}}


def test_each_segment_of_a_run_keeps_its_manifest_and_a_fresh_start_clears_them(tmp_path):
    cfg = compose(["recipe=pair_sum", "model=rlkit_tiny"])
    write = functools.partial(manifest.write_manifest, tmp_path, cfg, "cpu", torch.float32, "hf")
    write()
    write(resumed_from={"checkpoint": "step_000003"}, segment_start=3)
    segments = tmp_path / "manifests"
    assert sorted(p.name for p in segments.iterdir()) == ["step_000000.json", "step_000003.json"]
    latest = json.loads((tmp_path / "manifest.json").read_text())
    assert latest == json.loads((segments / "step_000003.json").read_text())
    assert latest["resumed_from"] == {"checkpoint": "step_000003"}
    assert latest["config_hash"] == manifest.config_hash(latest["config"])
    assert latest["config"]["seed"] == cfg.seed and latest["engine"] == "hf"
    assert latest["device"]["dtype"] == "float32" and latest["processes"] == {"world_size": 1}
    assert set(latest["env"]) == set(manifest.KERNEL_ENV_VARS)
    assert latest["machine"] == manifest.machine_traits()
    assert latest["environment"]["packages"] == manifest.installed_packages()
    write()  # the run dir started over
    assert [p.name for p in segments.iterdir()] == ["step_000000.json"]


def test_the_environment_is_recorded_against_the_lock(tmp_path):
    """Every installed package's version, and the lock's hash with what differs from it: a
    package at another version, one the lock lacks."""
    from importlib import metadata

    lock = tmp_path / "cpu.txt"
    lock.write_text(
        f"torch=={metadata.version('torch')} \\\n    --hash=sha256:00\n"
        "numpy==0.0.1 \\\n    --hash=sha256:00\n"
    )
    env = manifest.environment_info(lock)
    assert env["packages"]["torch"] == metadata.version("torch")
    assert env["lock"]["sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    assert env["lock"]["not_as_locked"] == [f"numpy=={metadata.version('numpy')} (locked 0.0.1)"]
    assert "peft==" + metadata.version("peft") in env["lock"]["not_in_lock"]
    assert env["packages_sha256"] == manifest.environment_info(lock)["packages_sha256"]


def test_the_machines_traits_are_recorded():
    traits = manifest.machine_traits()
    assert traits["cpu_count"] == os.cpu_count()
    assert traits["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if torch.backends.mkl.is_available():  # the CPU build: MKL says its version and code path
        assert traits["mkl_version"].startswith("Intel(R) oneAPI Math Kernel Library")
        assert traits["mkl_branch"] in manifest.MKL_BRANCHES.values()
        assert traits["mkl_auto_branch"] in manifest.MKL_BRANCHES.values()
