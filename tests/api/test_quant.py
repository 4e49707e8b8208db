"""The base model's quantization settings (rlkit.api.quant): values refused by the schema and
the client, and a device bitsandbytes has no kernels for."""

import pytest

from rlkit.run.config import compose
from tests.helpers import requires_bitsandbytes


@requires_bitsandbytes
def test_a_device_bitsandbytes_has_no_kernels_for_is_refused():
    from rlkit.api.quant import QuantizationUnavailable, QuantSpec, check_available

    # (model.device=mps on a machine with one: validate maps key "device" to model.device)
    with pytest.raises(QuantizationUnavailable, match="bitsandbytes runs on cpu or cuda") as exc:
        check_available(QuantSpec("nf4"), "mps")
    assert exc.value.key == "device"


@requires_bitsandbytes
def test_bad_values_are_refused_by_the_schema_and_the_api(service):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="quantize"):
        compose(["recipe=pair_sum", "model.quantize=nf5"])
    with pytest.raises(ValueError, match="quantize must be one of"):
        service.create_lora_training_client("rlkit-tiny", quantize="nf5")
