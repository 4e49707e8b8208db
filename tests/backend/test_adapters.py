"""LoRA / DoRA adapters (rlkit.backend.adapters): the layers chosen by role, and LoRA, DoRA,
QLoRA and QDoRA (a quantized base, bitsandbytes, under an adapter) trained, sampled exactly and
resumed exactly."""

import pytest
import torch

from rlkit.api import types
from tests.helpers import adapter_tensors, chat_datum, requires_bitsandbytes, train_step


def test_lora_layers_follow_train_flags(service):
    attn_only = service.create_lora_training_client(
        "rlkit-tiny", rank=4, train_mlp=False, train_unembed=False
    )
    names = list(attn_only._learner.params)
    assert names and all("self_attn" in n for n in names)
    assert attn_only.get_info().lora_rank == 4


# name -> create_lora_training_client arguments. int8 is LoRA only (see rlkit.api.quant).
COMBOS = {
    "lora": {},
    "dora": {"use_dora": True},
    "qlora": {"quantize": "nf4"},
    "qdora": {"quantize": "nf4", "use_dora": True},
    "qlora_int8": {"quantize": "int8"},
}
# Largest |sampler - trainer| logprob of a sampled token. Measured on 2 CPU cores, float32:
# <= 1e-6 for lora/dora (merged copy) and nf4/fp4 (the same unmerged forward pass);
# 1.2e-3 for int8, whose matmul quantizes activations over the whole batch (batch-dependent).
SAMPLE_TOLERANCE = {"qlora_int8": 5e-3}


@requires_bitsandbytes
@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_each_combination_trains_samples_exactly_and_resumes_exactly(combo, service):
    trainer = service.create_lora_training_client("rlkit-tiny", rank=8, seed=0, **COMBOS[combo])
    tok = trainer.get_tokenizer()
    data = [chat_datum(tok, "<answer>12</answer>"), chat_datum(tok, "foo")]
    before = adapter_tensors(trainer)
    losses = [train_step(trainer, data) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    after = adapter_tensors(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before)

    # The sampler serves what the trainer computes: the probe, and every sampled token.
    sampler = trainer.save_weights_and_get_sampling_client()
    assert sampler.sync_metrics["sync/probe_mismatch"] <= 1e-6
    prompt = data[0].model_input.to_ints()[:8]
    out = sampler.sample(
        types.ModelInput.from_ints(prompt),
        num_samples=4,
        sampling_params=types.SamplingParams(max_tokens=10, temperature=1.0, seed=3),
    ).result()
    for seq in out.sequences:
        full = prompt + seq.tokens
        scored = trainer.forward(
            [
                types.Datum(
                    model_input=types.ModelInput.from_ints(full[:-1]),
                    loss_fn_inputs={"target_tokens": full[1:], "weights": [1.0] * (len(full) - 1)},
                )
            ],
            "cross_entropy",
        ).result()
        trainer_lp = scored.loss_fn_outputs[0]["logprobs"].to_torch()[len(prompt) - 1 :]
        gap = (trainer_lp - torch.tensor(seq.logprobs)).abs().max().item()
        assert gap <= SAMPLE_TOLERANCE.get(combo, 1e-5), (combo, gap)

    # A second snapshot replaces the first everywhere (DoRA's cached scales included).
    train_step(trainer, data)
    resynced = trainer.save_weights_and_get_sampling_client()
    assert resynced.sync_metrics["sync/probe_mismatch"] <= 1e-6

    # save -> a fresh client -> load: the next step is the same, bit for bit.
    path = trainer.save_state("mid").result().path
    expected_loss = train_step(trainer, data)
    expected = adapter_tensors(trainer)
    resumed = service.create_training_client_from_state_with_optimizer(path)
    assert resumed._learner.quant == trainer._learner.quant
    assert train_step(resumed, data) == expected_loss
    got = adapter_tensors(resumed)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
