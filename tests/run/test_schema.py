"""The config schema (rlkit.run.schema): wrong types and unknown enum values fail at composition
naming the full key, and the optimizer and adapter sections are the API's AdamParams and
AdapterSpec fields, declared once."""

import pytest
from hydra.errors import ConfigCompositionException

from rlkit.run.config import compose


def test_type_errors_name_the_full_key():
    with pytest.raises(ConfigCompositionException) as info:
        compose(["optim.lr=abc"])
    assert "full_key: optim.lr" in str(info.value.__cause__)


def test_an_unknown_estimator_fails_at_composition_naming_the_key():
    with pytest.raises(Exception, match=r"kl\.estimator"):
        compose(["kl.estimator=k9"])


def test_optimizer_and_adapter_settings_are_declared_once():
    """optim.* and adapter.* are the API's AdamParams and AdapterSpec fields, renamed where the
    config says so, and turn back into them without a field-by-field copy."""
    import dataclasses

    from rlkit.api.adapter import AdapterSpec
    from rlkit.api.types import AdamParams
    from rlkit.run.build import adam_params, adapter_args
    from rlkit.run.schema import AdapterConfig, OptimConfig

    optim_keys = [f.name for f in dataclasses.fields(OptimConfig)]
    assert optim_keys == ["lr", *[f.name for f in dataclasses.fields(AdamParams)][1:], "schedule"]
    adapter_keys = [f.name for f in dataclasses.fields(AdapterConfig)]
    assert adapter_keys == [f.name for f in dataclasses.fields(AdapterSpec) if f.name != "seed"]

    cfg = compose(["recipe=pair_sum", "optim.lr=0.25", "optim.eps=1e-6", "adapter.alpha=8"])
    assert adam_params(cfg.optim) == AdamParams(
        learning_rate=0.25, beta1=0.9, beta2=0.95, eps=1e-6, weight_decay=0.0, grad_clip_norm=1.0
    )
    args = adapter_args(cfg.adapter)
    assert args["lora_alpha"] == 8 and "alpha" not in args and args["rank"] == cfg.adapter.rank
