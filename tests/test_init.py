"""`import rlkit` (rlkit/__init__.py): the hosted Tinker SDK's names, at top level and resolved
on first use, so `import rlkit as tinker` runs code written for it."""

import pytest

import rlkit


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


def test_top_level_names(tinker):
    for attr in [
        "ServiceClient",
        "TrainingClient",
        "SamplingClient",
        "types",
        "TensorData",
        "Datum",
        "ModelInput",
        "SamplingParams",
        "AdamParams",
    ]:
        assert hasattr(tinker, attr) and hasattr(rlkit, attr), attr
    for attr in [
        "Datum",
        "ModelInput",
        "EncodedTextChunk",
        "TensorData",
        "SamplingParams",
        "AdamParams",
        "SampleResponse",
        "SampledSequence",
        "ForwardBackwardOutput",
    ]:
        assert hasattr(rlkit.api.types, attr), attr
