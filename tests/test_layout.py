"""The package's shape: plugin imports stay light, the public API is complete and lazy, and each
engine's options are declared once (its Options dataclass) and match its YAML."""

import dataclasses
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from rlkit.run.config import CONF_DIR, import_target


@pytest.mark.parametrize("module", ["rlkit.rewards", "rlkit.envs", "rlkit"])
def test_plugin_imports_do_not_load_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_hosted_sdk_names_resolve_on_first_use():
    import rlkit
    from rlkit import client
    from rlkit.api import types

    assert rlkit.ServiceClient is client.ServiceClient
    assert rlkit.types is types and rlkit.Datum is types.Datum
    assert set(rlkit.__all__) <= set(dir(rlkit))
    for name in rlkit.__all__:
        assert getattr(rlkit, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        rlkit.Nope  # noqa: B018


@pytest.mark.parametrize("path", sorted((CONF_DIR / "engine").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_engine_yaml_sets_exactly_its_options(path):
    node = OmegaConf.load(path)
    engine = import_target(node._target_)
    declared = {f.name for f in dataclasses.fields(engine.Options)}
    assert set(node) - {"_target_", "probe_tolerance"} == declared
    assert engine.name == path.stem
