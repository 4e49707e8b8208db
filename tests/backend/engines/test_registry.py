"""Engine names and options (rlkit.backend.engines.registry): a bad name or option is named
before any model loads, each engine's YAML sets exactly its Options, and an engine from outside
rlkit plugs in by its dotted path."""

import dataclasses

import pytest
from omegaconf import OmegaConf

import rlkit
from rlkit.api import types
from rlkit.run.build import import_target
from rlkit.run.config import CONF_DIR


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"engine": "vlm"}, "unknown engine 'vlm'; known engines: hf, vllm"),
        ({"engine_options": {"kv_cache": 1}}, "unknown engine_options kv_cache for engine 'hf'"),
        ({"engine_options": {"probe_tolerance": 0}}, "probe_tolerance must be > 0, got 0"),
        (
            {"engine": "vllm", "engine_options": {"kv_cache_gib": "1G"}},
            "engine_options kv_cache_gib='1G' must be float or null",
        ),
    ],
)
def test_bad_engine_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rlkit.ServiceClient(device="cpu", **kwargs)


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
