"""LoRA, DoRA, QLoRA and QDoRA (issue 13): a quantized base (bitsandbytes) under an adapter,
sampled exactly, checkpointed and resumed exactly, and refused before training where it cannot
run."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlkit import types
from rlkit.run.config import compose
from rlkit.run.schema import ConfigError
from rlkit.run.validate import validate

pytest.importorskip("bitsandbytes")  # the `quant` extra; `make setup` installs it

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


def datum(tokenizer, answer: str) -> types.Datum:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi?"}], add_generation_prompt=True, return_dict=False
    )
    tokens = prompt + tokenizer.encode(answer, add_special_tokens=False)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def step(trainer, data) -> float:
    loss = trainer.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return loss


def adapter_tensors(trainer) -> dict[str, torch.Tensor]:
    # Named as peft saves them (clients on one base have adapters of different names).
    name = f".{trainer._learner.adapter_name}."
    return {n.replace(name, "."): p.detach().clone() for n, p in trainer._learner.params.items()}


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_each_combination_trains_samples_exactly_and_resumes_exactly(combo, service):
    trainer = service.create_lora_training_client("rlkit-tiny", rank=8, seed=0, **COMBOS[combo])
    tok = trainer.get_tokenizer()
    data = [datum(tok, "<answer>12</answer>"), datum(tok, "foo")]
    before = adapter_tensors(trainer)
    losses = [step(trainer, data) for _ in range(3)]
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
    step(trainer, data)
    resynced = trainer.save_weights_and_get_sampling_client()
    assert resynced.sync_metrics["sync/probe_mismatch"] <= 1e-6

    # save -> a fresh client -> load: the next step is the same, bit for bit.
    path = trainer.save_state("mid").result().path
    expected_loss = step(trainer, data)
    expected = adapter_tensors(trainer)
    resumed = service.create_training_client_from_state_with_optimizer(path)
    assert resumed._learner.quant == trainer._learner.quant
    assert step(resumed, data) == expected_loss
    got = adapter_tensors(resumed)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_quantized_layers_are_4bit_and_the_engine_never_merges_into_them(service):
    import bitsandbytes as bnb

    trainer = service.create_lora_training_client("rlkit-tiny", rank=8, quantize="nf4")
    learner = trainer._learner
    base = [m for m in learner.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert base and all(m.weight.dtype == torch.uint8 for m in base)
    packed = {id(m): m.weight.data.clone() for m in base}
    step(trainer, [datum(trainer.get_tokenizer(), "foo")])
    trainer.save_weights_and_get_sampling_client()
    engine = learner._engine()
    assert not engine._sampler.merge
    # The sampling copy shares the frozen 4-bit weights, which nothing rewrote.
    shared = {id(p) for p in engine._sampler.model.parameters()}
    assert all(id(m.weight) in shared for m in base)
    assert all(torch.equal(m.weight.data, packed[id(m)]) for m in base)


def test_sampler_weights_load_on_an_unquantized_base(service, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    from rlkit.backend import models

    trainer = service.create_lora_training_client(
        "rlkit-tiny", rank=8, quantize="nf4", use_dora=True
    )
    step(trainer, [datum(trainer.get_tokenizer(), "foo")])
    path = trainer.save_weights_for_sampler("for-serving").result().path
    saved = load_file(os.path.join(path, "adapter_model.safetensors"))
    base = models.load_model("rlkit-tiny")  # float32, not quantized
    tokens = torch.tensor([datum(trainer.get_tokenizer(), "foo").model_input.to_ints()])
    plain_logits = base(tokens).logits
    served = PeftModel.from_pretrained(base, path).eval()
    loaded = get_peft_model_state_dict(served, save_embedding_layers=False)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)
    assert not torch.allclose(served(tokens).logits, plain_logits)


def test_vllm_falls_back_to_hf_for_a_quantized_base(tmp_path, caplog):
    import rlkit

    service = rlkit.ServiceClient(device="cpu", engine="vllm", checkpoint_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        trainer = service.create_lora_training_client("rlkit-tiny", rank=8, quantize="fp4")
    assert trainer._learner.engine.name == "hf"
    assert "cannot serve a quantized base" in caplog.text
    sampler = trainer.save_weights_and_get_sampling_client()
    assert sampler.sync_metrics["sync/probe_mismatch"] <= 1e-6


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        (["model.quantize=int8", "adapter=dora"], "adapter.use_dora", "int8 with a DoRA"),
        (
            ["model.quantize=int8", "model.quant_compute_dtype=float32"],
            "model.quant_compute_dtype",
            "int8 layers compute in float16",
        ),
    ],
)
def test_impossible_quantization_fails_before_training_naming_the_key(overrides, key, reason):
    cfg = compose(["recipe=pair_sum", "model=rlkit_tiny", *overrides])
    with pytest.raises(ConfigError, match=rf"^{key}=.*{reason}"):
        validate(cfg)


def test_a_device_bitsandbytes_has_no_kernels_for_is_refused():
    from rlkit.api.quant import QuantizationUnavailable, QuantSpec, check_available

    # (model.device=mps on a machine with one: validate maps key "device" to model.device)
    with pytest.raises(QuantizationUnavailable, match="bitsandbytes runs on cpu or cuda") as exc:
        check_available(QuantSpec("nf4"), "mps")
    assert exc.value.key == "device"


def test_missing_bitsandbytes_names_the_key_and_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # fault injection: import fails
    cfg = compose(["recipe=pair_sum", "model=rlkit_tiny", "model.quantize=nf4"])
    with pytest.raises(ConfigError, match=r"^model.quantize=nf4 .*rlkit\[quant\]"):
        validate(cfg)


def test_bad_values_are_refused_by_the_schema_and_the_api(service):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="quantize"):
        compose(["recipe=pair_sum", "model.quantize=nf5"])
    with pytest.raises(ValueError, match="quantize must be one of"):
        service.create_lora_training_client("rlkit-tiny", quantize="nf5")


def test_the_run_config_reaches_the_client():
    from rlkit.run.build import adapter_args, quant_args

    cfg = compose(["recipe=pair_sum_qlora", "adapter=dora"])
    assert quant_args(cfg.model) == {
        "quantize": "nf4",
        "quant_compute_dtype": "auto",
        "double_quant": True,
    }
    assert adapter_args(cfg.adapter)["use_dora"] is True


def test_resuming_on_another_quantization_is_refused_before_loading(tmp_path, service):
    from rlkit.run import checkpoint

    tiny = ["recipe=pair_sum", "model=rlkit_tiny", "adapter.rank=8"]
    trainer = service.create_lora_training_client("rlkit-tiny", rank=8, seed=0, quantize="nf4")
    saved = checkpoint.Checkpointer(tmp_path / "run", compose([*tiny, "model.quantize=nf4"]))
    saved.resume(trainer)
    saved.save(0)
    fresh = service.create_lora_training_client("rlkit-tiny", rank=8, seed=0)
    cfg = compose([*tiny, "resume=auto"])
    with pytest.raises(ConfigError, match=r"different model.quantize \('nf4' -> 'none'\)"):
        checkpoint.Checkpointer(saved.run_dir, cfg).resume(fresh)


@pytest.mark.slow
def test_cli_qdora_run_is_bitwise_reproducible(tmp_path):
    """`python -m rlkit ... model.quantize=nf4 adapter=dora` twice: the same bits."""
    args = [
        "recipe=pair_sum",
        "model=rlkit_tiny",
        "model.quantize=nf4",
        "adapter=dora",
        "adapter.rank=4",
        "warmup.steps=1",
        "warmup.batch_size=4",
        "steps=2",
        "groups_per_step=2",
        "group_size=4",
        "max_tokens=8",
        "env.eval_size=2",
        "eval_every=2",
        "reward=[format,correct,concise]",
        "reward.concise.only_correct=false",
        "determinism.num_threads=1",
    ]
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        subprocess.run(
            [sys.executable, "-m", "rlkit", *args, f"hydra.run.dir={run}"],
            cwd=tmp_path,
            check=True,
            capture_output=True,
            timeout=600,
        )
    metrics = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    rl = [m for m in metrics if "sync/probe_mismatch" in m]
    assert len(rl) == 2 and all(m["sync/probe_mismatch"] <= 1e-6 for m in rl)
    assert all(m["train/logprob_mismatch"] <= 1e-5 for m in rl)
    compared = subprocess.run(
        [sys.executable, "-m", "rlkit.repro", "compare", *map(str, runs)],
        capture_output=True,
        text=True,
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr
