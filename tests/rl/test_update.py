"""The policy update of one RL step (rlkit.rl.update): the loss aggregation's weights, and one
or several updates (minibatches) per batch against the same steps made by hand on a client."""

import pytest
import torch

from rlkit.api import types
from rlkit.rl.update import aggregate, policy_update
from tests.helpers import adapter_tensors, policy_datum


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token_sum", [[1, 1, 1], [1, 1, 1, 1, 1]]),
        ("token_mean", [[1 / 8] * 3, [1 / 8] * 5]),
        ("sequence_mean", [[1 / 6] * 3, [1 / 10] * 5]),
        ("constant", [[1 / 20] * 3, [1 / 20] * 5]),
    ],
)
def test_aggregation_weights(mode, expected):
    out = aggregate([policy_datum(2, 3), policy_datum(2, 5)], mode, max_tokens=10)
    for d, want in zip(out, expected, strict=True):
        w = d.loss_fn_inputs["weights"].to_torch()
        assert w[0] == 0  # the prompt stays out
        torch.testing.assert_close(w[1:], torch.tensor(want, dtype=torch.float32))


def test_one_update_per_batch_is_the_plain_step_bitwise(service):
    adam = types.AdamParams(learning_rate=1e-2)
    ds = [policy_datum(2, 4), policy_datum(3, 5)]
    a = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    a.forward_backward(ds, "ppo", None).result()
    a.optim_step(adam).result()
    b = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    out = policy_update(b, ds, "ppo", {}, adam, updates_per_batch=1, minibatches=1)
    assert out.optimizer_steps == 1
    pa, pb = adapter_tensors(a), adapter_tensors(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_several_updates_use_the_old_logprobs_computed_once(service):
    adam = types.AdamParams(learning_rate=1e-2)
    ds = [policy_datum(2, 4), policy_datum(3, 5)]
    a = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    old = [o["logprobs"].to_torch() for o in a.forward(ds, "ppo").result().loss_fn_outputs]
    with_old = [
        types.Datum(d.model_input, {**d.loss_fn_inputs, "old_logprobs": o})
        for d, o in zip(ds, old, strict=True)
    ]
    for _ in range(3):
        a.forward_backward(with_old, "ppo", None).result()
        a.optim_step(adam).result()
    b = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    out = policy_update(b, ds, "ppo", {}, adam, updates_per_batch=3)
    assert out.optimizer_steps == 3
    pa, pb = adapter_tensors(a), adapter_tensors(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # and minibatches split the batch: 2 x 2 optimizer steps
    c = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    assert (
        policy_update(c, ds, "ppo", {}, adam, updates_per_batch=2, minibatches=2).optimizer_steps
        == 4
    )
