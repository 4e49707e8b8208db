"""Config nodes into what rlkit runs (rlkit.run.build): a component's own value check is a
config error naming it, and the run config's sections become the client's arguments."""

import pytest

from rlkit.run.config import compose
from rlkit.run.schema import ConfigError
from tests.helpers import requires_bitsandbytes

TINY = ["recipe=pair_sum", "model=rlkit_tiny"]


def test_a_components_own_value_check_is_a_config_error_naming_it():
    from rlkit.run.build import as_callable

    cfg = compose([*TINY, "env.n_choices=[3]"])
    with pytest.raises(ConfigError, match=r"^env: env.n_choices must be even numbers >= 2"):
        as_callable(cfg.env, "env")


@requires_bitsandbytes
def test_the_run_config_reaches_the_client():
    from rlkit.run.build import adapter_args, quant_args

    cfg = compose(["recipe=pair_sum_qlora", "adapter=dora"])
    assert quant_args(cfg.model) == {
        "quantize": "nf4",
        "quant_compute_dtype": "auto",
        "double_quant": True,
    }
    assert adapter_args(cfg.adapter)["use_dora"] is True
