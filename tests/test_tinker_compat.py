"""Code written for the hosted Tinker SDK runs on rlkit: same names, same arguments, its types.

Uses the real `tinker` package (a dev dependency) as the reference.
"""

import inspect

import pytest

import rlkit

tinker = pytest.importorskip("tinker")

# Hosted-service plumbing with no local meaning.
HOSTED_ONLY = {
    "close",
    "copy_weights",
    "create",
    "create_custom_loss",
    "create_rest_client",
    "from_sampler_handle",
    "get_console_url",
    "get_sampler_handle",
    "get_telemetry",
    "holder",
    "on_queue_state_change",
    "save_weights_external",
    "save_weights_external_async",
}


@pytest.mark.parametrize("name", ["ServiceClient", "TrainingClient", "SamplingClient"])
def test_every_client_method_exists_and_takes_the_same_arguments(name):
    theirs, ours = getattr(tinker, name), getattr(rlkit, name)
    for method in sorted(set(dir(theirs)) - HOSTED_ONLY):
        if method.startswith("_") or not callable(getattr(theirs, method)):
            continue
        assert hasattr(ours, method), f"rlkit.{name} lacks {method}"
        our_sig = inspect.signature(getattr(ours, method))
        takes_any = any(p.kind is p.VAR_KEYWORD for p in our_sig.parameters.values())
        for param in inspect.signature(getattr(theirs, method)).parameters.values():
            if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            assert param.name in our_sig.parameters or takes_any, (
                f"rlkit.{name}.{method} does not accept {param.name!r}"
            )


def test_top_level_names():
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


def test_sdk_types_are_accepted(trainer):
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


def test_unsupported_sampling_options_are_refused_not_ignored(trainer):
    sampler = trainer.save_weights_and_get_sampling_client()
    prompt = rlkit.api.types.ModelInput.from_ints([1, 2])
    params = rlkit.api.types.SamplingParams(max_tokens=2)
    with pytest.raises(NotImplementedError, match="topk_prompt_logprobs=5"):
        sampler.sample(prompt, 1, params, topk_prompt_logprobs=5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        sampler.sample(prompt, 1, params, temprature=0.5)
    # Their "off" values are fine.
    sampler.sample(prompt, 1, params, topk_prompt_logprobs=0).result()
