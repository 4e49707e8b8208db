"""The Tinker-style client API (rlkit.client) on the built-in tiny model (real transformers +
peft): futures in submission order, async twins, sampling clients, custom losses, bad arguments,
the hosted SDK's method signatures, and the seam (the client passes on no backend names)."""

import asyncio
import inspect

import pytest
import torch

import rlkit
from rlkit.api import types
from tests.helpers import sft_datums


def test_futures_complete_in_submission_order(trainer):
    data = sft_datums(trainer.get_tokenizer())
    before = trainer.forward(data, "cross_entropy")
    fb = trainer.forward_backward(data, "cross_entropy")
    step = trainer.optim_step(types.AdamParams(learning_rate=1e-2))
    after = trainer.forward(data, "cross_entropy")
    # The forward queued after optim_step sees the updated weights; the one before does not.
    assert before.result().metrics["loss:sum"] == pytest.approx(fb.result().metrics["loss:sum"])
    assert step.result().metrics["grad_norm"] > 0
    assert after.result().metrics["loss:sum"] < before.result().metrics["loss:sum"]


def test_async_twins(trainer):
    data = sft_datums(trainer.get_tokenizer())

    async def main():
        fb = await trainer.forward_backward_async(data, "cross_entropy")
        step = await trainer.optim_step_async(types.AdamParams(learning_rate=1e-3))
        out = await fb.result_async()
        await step
        sampler = await trainer.save_weights_and_get_sampling_client_async()
        prompt = types.ModelInput.from_ints([1, 2, 3])
        response = await sampler.sample_async(prompt, 2, types.SamplingParams(max_tokens=3))
        logprobs = await sampler.compute_logprobs_async(prompt)
        return out, response, logprobs

    out, response, logprobs = asyncio.run(main())
    assert out.metrics["loss:sum"] > 0
    assert len(response.sequences) == 2
    assert logprobs[0] is None and len(logprobs) == 3


def test_outputs_hold_one_logprob_per_target(trainer):
    data = sft_datums(trainer.get_tokenizer(), n=3)
    out = trainer.forward(data, "cross_entropy").result()
    assert out.loss_fn_output_type == "cross_entropy"
    for datum, o in zip(data, out.loss_fn_outputs, strict=True):
        lp = o["logprobs"].tolist()
        assert len(lp) == datum.model_input.length
        assert all(x <= 0 for x in lp)
    weights = torch.cat([d.loss_fn_inputs["weights"].to_torch() for d in data])
    lps = torch.cat([o["logprobs"].to_torch() for o in out.loss_fn_outputs])
    assert out.metrics["loss:sum"] == pytest.approx(float(-(weights * lps).sum()), rel=1e-5)


def test_sampling_client_is_frozen_at_creation(trainer):
    data = sft_datums(trainer.get_tokenizer())
    prompt = types.ModelInput.from_ints(data[0].model_input.to_ints())
    sampler = trainer.save_weights_and_get_sampling_client()
    before = sampler.compute_logprobs(prompt).result()
    trainer.forward_backward(data, "cross_entropy")
    trainer.optim_step(types.AdamParams(learning_rate=5e-2))
    assert sampler.compute_logprobs(prompt).result() == before
    newer = trainer.save_weights_and_get_sampling_client().compute_logprobs(prompt).result()
    assert newer != before


def test_sample_logprobs_match_a_trainer_forward(trainer):
    sampler = trainer.save_weights_and_get_sampling_client()
    prompt = [1, 87, 85, 71, 84, 201]
    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    seqs = sampler.sample(types.ModelInput.from_ints(prompt), 3, params).result().sequences
    for seq in seqs:
        assert len(seq.logprobs) == len(seq.tokens) > 0
        scored = sampler.compute_logprobs(types.ModelInput.from_ints(prompt + seq.tokens)).result()
        torch.testing.assert_close(
            torch.tensor(scored[len(prompt) :]), torch.tensor(seq.logprobs), atol=1e-4, rtol=0
        )


def test_same_seed_same_tokens_and_stop_reasons(trainer):
    sampler = trainer.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints([1, 87, 85])
    params = types.SamplingParams(max_tokens=20, seed=11)
    a = sampler.sample(prompt, 4, params).result()
    b = sampler.sample(prompt, 4, params).result()
    c = sampler.sample(prompt, 4, types.SamplingParams(max_tokens=20, seed=12)).result()
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert [s.tokens for s in a.sequences] != [s.tokens for s in c.sequences]
    for s in a.sequences:
        assert s.stop_reason in ("stop", "length")
        assert (s.stop_reason == "length") == (len(s.tokens) == 20 and s.tokens[-1] != 2)


def test_stop_strings_and_greedy(trainer):
    tok = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints(tok.encode("abc", add_special_tokens=False))
    greedy = sampler.sample(prompt, 3, types.SamplingParams(max_tokens=30, temperature=0)).result()
    assert len({tuple(s.tokens) for s in greedy.sequences}) == 1
    text = tok.decode(greedy.sequences[0].tokens, skip_special_tokens=True)
    assert len(text) >= 3, greedy
    # Stop on a character the greedy text contains: the sequence ends right after it.
    stop_char = text[2]
    stopped = (
        sampler.sample(
            prompt, 1, types.SamplingParams(max_tokens=30, temperature=0, stop=[stop_char])
        )
        .result()
        .sequences[0]
    )
    assert stopped.stop_reason == "stop"
    assert tok.decode(stopped.tokens, skip_special_tokens=True).endswith(stop_char)
    assert stop_char not in tok.decode(stopped.tokens[:-1], skip_special_tokens=True)


def test_forward_backward_custom_matches_cross_entropy(service):
    a = service.create_lora_training_client("rlkit-tiny", rank=8, seed=0)
    b = service.create_lora_training_client("rlkit-tiny", rank=8, seed=0)
    data = sft_datums(a.get_tokenizer(), n=2)

    def weighted_nll(batch, logprobs):
        loss = sum(
            -(d.loss_fn_inputs["weights"].to_torch() * lp).sum()
            for d, lp in zip(batch, logprobs, strict=True)
        )
        return loss, {"custom:sum": float(loss.detach())}

    custom = a.forward_backward_custom(data, weighted_nll).result()
    plain = b.forward_backward(data, "cross_entropy").result()
    assert custom.metrics["loss:sum"] == pytest.approx(plain.metrics["loss:sum"], rel=1e-6)
    for (_n, pa), pb in zip(a._learner.params.items(), b._learner.params.values(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7)


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


def test_share_prefix_must_be_a_bool():
    import rlkit

    with pytest.raises(ValueError, match="share_prefix must be True or False, got 'no'"):
        rlkit.ServiceClient(device="cpu", share_prefix="no")


def test_unsupported_sampling_options_are_refused_not_ignored(trainer):
    sampler = trainer.save_weights_and_get_sampling_client()
    prompt = rlkit.api.types.ModelInput.from_ints([1, 2])
    params = rlkit.api.types.SamplingParams(max_tokens=2)
    with pytest.raises(NotImplementedError, match="prompt_alt_tokens_k=5"):
        sampler.sample(prompt, 1, params, prompt_alt_tokens_k=5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        sampler.sample(prompt, 1, params, temprature=0.5)
    # Their "off" values are fine.
    sampler.sample(prompt, 1, params, prompt_alt_tokens_k=0).result()


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
def test_every_client_method_exists_and_takes_the_same_arguments(name, tinker):
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
