"""The package's shape: plugin imports stay light, the public API is complete and lazy, and each
engine's options are declared once (its Options dataclass) and match its YAML."""

import dataclasses
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from rlkit.run.build import import_target
from rlkit.run.config import CONF_DIR


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


def test_the_client_passes_on_no_backend_names():
    """The seam contract forbids importing rlkit.backend above the client; re-exporting its
    classes through the client would be a hole in it. Everything the client exports is defined
    there or is an rlkit.api type, and code above the client imports nothing else from it
    (`rlkit.client.NAME` and `from rlkit.client import NAME` alike)."""
    import ast
    from pathlib import Path

    from rlkit import client

    for name in client.__all__:
        home = getattr(client, name).__module__
        assert home == "rlkit.client" or home.startswith("rlkit.api"), (name, home)
    root = Path(client.__file__).parent
    used = []
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).parts[0] in ("backend", "api", "client.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "rlkit.client":
                used += [(path.name, a.name) for a in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(
                node.value, ast.Name | ast.Attribute
            ):
                owner = ast.unparse(node.value)
                if owner in ("client", "rlkit.client"):
                    used.append((path.name, node.attr))
    outside = [(f, n) for f, n in used if n not in client.__all__]
    assert used and not outside, outside


def test_the_algorithm_half_names_no_process():
    """The client owns parallelism: rlkit/rl has no rank, shard, gather or collective."""
    import re
    from pathlib import Path

    import rlkit.rl

    pattern = re.compile(r"rank|world_size|procs|processes|gather|all_reduce|shard")
    hits = [
        f"{path}:{i}: {line.strip()}"
        for path in sorted(Path(rlkit.rl.__file__).parent.rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("path", sorted((CONF_DIR / "engine").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_engine_yaml_sets_exactly_its_options(path):
    node = OmegaConf.load(path)
    engine = import_target(node._target_)
    declared = {f.name for f in dataclasses.fields(engine.Options)}
    assert set(node) - {"_target_", "probe_tolerance"} == declared
    assert engine.name == path.stem


def test_an_engine_from_outside_rlkit_plugs_in_by_its_dotted_path(tmp_path, monkeypatch):
    """Adding an engine touches no rlkit file: a class with name, Options and build, named by
    its path, serves the sampler; its options are checked against its own Options."""
    (tmp_path / "my_engines.py").write_text(
        "from dataclasses import dataclass\n"
        "from rlkit.backend.engines.hf import HFEngine\n"
        "class LoggingHF(HFEngine):\n"
        "    name = 'logging_hf'\n"
        "    built = []\n"
        "    @dataclass(frozen=True)\n"
        "    class Options:\n"
        "        tag: str = 'x'\n"
        "    @classmethod\n"
        "    def build(cls, learner, options):\n"
        "        cls.built.append(options.tag)\n"
        "        return cls(learner.model, learner.tokenizer)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import rlkit
    from rlkit.api import types

    with pytest.raises(ValueError, match="unknown engine_options colour for engine 'logging_hf'"):
        rlkit.ServiceClient(
            device="cpu", engine="my_engines.LoggingHF", engine_options={"colour": 1}
        )
    service = rlkit.ServiceClient(
        device="cpu",
        checkpoint_dir=tmp_path,
        engine="my_engines.LoggingHF",
        engine_options={"tag": "t"},
    )
    trainer = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    sampler = trainer.save_weights_and_get_sampling_client()
    out = sampler.sample(
        types.ModelInput.from_ints([1, 2, 3]), 2, types.SamplingParams(max_tokens=3)
    )
    assert len(out.result().sequences) == 2
    import my_engines

    assert my_engines.LoggingHF.built == ["t"]
    assert service.engine.name == "logging_hf"
