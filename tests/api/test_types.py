"""The API's data types (rlkit.api.types): conversions and validation, and the hosted Tinker
SDK's own types accepted wherever these are."""

import numpy as np
import pytest
import torch

import rlkit
from rlkit.api import types


def test_model_input_round_trip():
    mi = types.ModelInput.from_ints([3, 4, 5]).append_int(6)
    assert mi.to_ints() == [3, 4, 5, 6]
    assert mi.length == 4
    assert types.ModelInput.empty().length == 0


@pytest.mark.parametrize(
    "value",
    [[1.5, 2.5], np.array([1.5, 2.5], dtype=np.float64), torch.tensor([1.5, 2.5])],
)
def test_tensor_data_from_lists_numpy_torch(value):
    td = types.to_tensor_data(value)
    assert td.dtype == "float32"
    assert td.tolist() == [1.5, 2.5]
    assert td.to_torch().dtype == torch.float32
    assert td.shape == [2]


def test_tensor_data_keeps_integers_and_shape():
    td = types.TensorData.from_numpy(np.arange(6).reshape(2, 3))
    assert td.dtype == "int64"
    assert td.to_numpy().shape == (2, 3)
    assert td.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_datum_coerces_loss_inputs():
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": [2, 3], "weights": torch.ones(2)},
    )
    assert all(isinstance(v, types.TensorData) for v in datum.loss_fn_inputs.values())
    assert datum.loss_fn_inputs["target_tokens"].dtype == "int64"


def test_tensor_data_rejects_unknown_objects():
    with pytest.raises(TypeError, match="expected TensorData"):
        types.to_tensor_data(object())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        types.SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"beta2": 1.0}, "beta2"),
        ({"grad_clip_norm": -0.1}, "grad_clip_norm"),
    ],
)
def test_adam_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        types.AdamParams(**kwargs)


def test_sdk_types_are_accepted(trainer, tinker):
    tt = tinker.types
    tok = trainer.get_tokenizer()
    prompt = tok.encode("Q?", add_special_tokens=False)
    tokens = prompt + tok.encode("foo", add_special_tokens=False) + [tok.eos_token_id]
    weights = [0.0] * (len(prompt) - 1) + [1.0] * (len(tokens) - len(prompt))
    sdk_datum = tt.Datum(
        model_input=tt.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )
    our_datum = rlkit.api.types.Datum(
        model_input=rlkit.api.types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )
    sdk_out = trainer.forward([sdk_datum], "cross_entropy").result()
    our_out = trainer.forward([our_datum], "cross_entropy").result()
    assert sdk_out.metrics == our_out.metrics

    trainer.forward_backward([sdk_datum], "cross_entropy").result()
    step = trainer.optim_step(tt.AdamParams(learning_rate=1e-3)).result()
    assert step.metrics["learning_rate"] == 1e-3

    sampler = trainer.save_weights_and_get_sampling_client()
    params = tt.SamplingParams(max_tokens=4, seed=3, temperature=0.7)
    a = sampler.sample(tt.ModelInput.from_ints(prompt), 2, params).result()
    b = sampler.sample(
        rlkit.api.types.ModelInput.from_ints(prompt),
        2,
        rlkit.api.types.SamplingParams(max_tokens=4, seed=3, temperature=0.7),
    ).result()
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
