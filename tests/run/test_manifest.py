"""The run manifest (rlkit.run.manifest): the config hash leaves out the keys that only say how
to start a run; each segment of a resumed run keeps its own record, a fresh start clears them.
A real run's manifest is checked end to end in tests/e2e/test_repro.py."""

import functools
import json

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
    write()  # the run dir started over
    assert [p.name for p in segments.iterdir()] == ["step_000000.json"]
