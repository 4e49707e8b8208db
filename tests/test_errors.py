"""Bad input fails with a sentence naming the datum and field, never deep inside torch."""

import pytest

import rlkit
from rlkit.api import types
from rlkit.api.errors import (
    InvalidDatumError,
    ModelNotFoundError,
    NoGradientsError,
    UnknownLossError,
)


def datum(n=4, **inputs):
    tokens = list(range(10, 10 + n))
    loss_inputs = {"target_tokens": tokens[1:] + [2], "weights": [1.0] * n}
    loss_inputs.update(inputs)
    return types.Datum(
        types.ModelInput.from_ints(tokens), {k: v for k, v in loss_inputs.items() if v is not None}
    )


def rl_datum(n=4, **inputs):
    base = {"weights": None, "logprobs": [-1.0] * n, "advantages": [0.5] * n}
    base.update(inputs)
    return datum(n, **base)


@pytest.mark.parametrize(
    ("bad", "loss", "message"),
    [
        (
            datum(weights=[1.0, 1.0]),
            "cross_entropy",
            r"datum 0: loss_fn_inputs\['weights'\] has shape \[2\], but model_input has length 4",
        ),
        (
            datum(target_tokens=[11, 12, 13]),
            "cross_entropy",
            r"loss_fn_inputs\['target_tokens'\] has shape \[3\]",
        ),
        (
            rl_datum(logprobs=[-1.0] * 5),
            "importance_sampling",
            r"loss_fn_inputs\['logprobs'\] has shape \[5\]",
        ),
        (rl_datum(advantages=[0.1] * 3), "ppo", r"loss_fn_inputs\['advantages'\] has shape \[3\]"),
        (
            datum(target_tokens=[11, 12, 99999, 2]),
            "cross_entropy",
            r"target_tokens\[2\] = 99999 is outside the vocabulary \[0, 259\)",
        ),
        (
            datum(target_tokens=[11, -1, 12, 2]),
            "cross_entropy",
            r"target_tokens\[1\] = -1 is outside",
        ),
        (
            datum(weights=[1.0, float("nan"), 1.0, 1.0]),
            "cross_entropy",
            r"loss_fn_inputs\['weights'\]\[1\] = nan is not finite",
        ),
        (
            rl_datum(advantages=[0.0, 0.0, float("inf"), 0.0]),
            "importance_sampling",
            r"\['advantages'\]\[2\] = inf is not finite",
        ),
        (
            datum(weights=None),
            "cross_entropy",
            r"loss 'cross_entropy' needs loss_fn_inputs \['weights'\]",
        ),
        (rl_datum(advantages=None), "ppo", r"needs loss_fn_inputs \['advantages'\]"),
        (datum(mask=[1.0] * 4), "cross_entropy", r"does not use loss_fn_inputs \['mask'\]"),
    ],
)
def test_bad_datums_are_named(trainer, bad, loss, message):
    good = datum() if loss == "cross_entropy" else rl_datum()
    with pytest.raises(InvalidDatumError, match=r"datum 1: .*" + message.removeprefix("datum 0: ")):
        trainer.forward_backward([good, bad], loss).result()
    # Nothing was accumulated by the failed call.
    with pytest.raises(NoGradientsError):
        trainer.optim_step(types.AdamParams()).result()


def test_token_ids_outside_vocab_in_model_input(trainer):
    bad = types.Datum(
        types.ModelInput.from_ints([1, 500]), {"target_tokens": [2, 2], "weights": [1, 1]}
    )
    with pytest.raises(InvalidDatumError, match=r"datum 0: model_input\[1\] = 500 is outside"):
        trainer.forward([bad], "cross_entropy").result()


def test_a_datum_longer_than_the_context_is_refused_as_sample_refuses_it(trainer):
    """It trained silently: positions past the context have no trained embedding."""
    context = trainer.get_info().max_context_length

    def of_length(n):
        tokens = [10 + i % 200 for i in range(n)]
        return types.Datum(
            types.ModelInput.from_ints(tokens), {"target_tokens": tokens, "weights": [1.0] * n}
        )

    ok, long = of_length(context), of_length(context + 1)
    trainer.forward([ok], "cross_entropy").result()
    message = rf"datum 1: model_input has {context + 1} tokens, more than the model's context"
    with pytest.raises(InvalidDatumError, match=message):
        trainer.forward_backward([ok, long], "cross_entropy").result()
    with pytest.raises(InvalidDatumError, match=message):
        trainer.compute_reference_logprobs([ok, long]).result()


def test_empty_inputs(trainer):
    with pytest.raises(InvalidDatumError, match="empty list of datums"):
        trainer.forward_backward([], "cross_entropy").result()
    empty = types.Datum(types.ModelInput.empty(), {"target_tokens": [], "weights": []})
    with pytest.raises(InvalidDatumError, match="model_input is empty"):
        trainer.forward_backward([empty], "cross_entropy").result()


def test_unknown_loss_lists_the_known_ones(trainer):
    with pytest.raises(
        UnknownLossError,
        match="known losses: cispo, cross_entropy, dro, gspo, importance_sampling, ppo",
    ):
        trainer.forward_backward([datum()], "grpo").result()


def test_unknown_loss_config_key(trainer):
    with pytest.raises(ValueError, match=r"unknown loss_fn_config keys \['clip_ratio'\]"):
        trainer.forward_backward([rl_datum()], "ppo", {"clip_ratio": 0.2}).result()


def test_optim_step_without_gradients(trainer):
    with pytest.raises(NoGradientsError, match="call forward_backward first"):
        trainer.optim_step(types.AdamParams()).result()
    # A forward (no backward) does not count either.
    trainer.forward([datum()], "cross_entropy").result()
    with pytest.raises(NoGradientsError):
        trainer.optim_step(types.AdamParams()).result()


def test_nonexistent_base_model_says_what_was_tried(service):
    with pytest.raises(
        ModelNotFoundError, match=r"'rlkit-tinyy' could not be loaded. Tried: \(1\) built-in models"
    ):
        service.create_lora_training_client("rlkit-tinyy")


def test_sampling_input_errors(trainer):
    sampler = trainer.save_weights_and_get_sampling_client()
    with pytest.raises(ValueError, match="empty prompt"):
        sampler.sample(types.ModelInput.empty(), 1, types.SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="num_samples"):
        sampler.sample(types.ModelInput.from_ints([1]), 0, types.SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"prompt token ids \[300\] are outside"):
        sampler.sample(types.ModelInput.from_ints([1, 300]), 1, types.SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="exceeds the model's context of 2048"):
        sampler.sample(
            types.ModelInput.from_ints([1]), 1, types.SamplingParams(max_tokens=5000)
        ).result()


def test_bad_client_arguments(service):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        service.create_lora_training_client("rlkit-tiny", rank=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        rlkit.ServiceClient(dtype="float8")
    with pytest.raises(ValueError, match="needs model_path or base_model"):
        service.create_sampling_client()


def test_bad_checkpoint_paths(service, trainer, tmp_path):
    with pytest.raises(rlkit.RlkitError, match="is not an rlkit checkpoint"):
        trainer.load_state(str(tmp_path)).result()
    with pytest.raises(ValueError, match="plain file name"):
        trainer.save_state("../escape")
    sampler_path = trainer.save_weights_for_sampler("s").result().path
    with pytest.raises(rlkit.RlkitError, match="no optimizer state"):
        trainer.load_state(sampler_path).result()


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
