"""`python -m rlkit.export`: the adapter in peft's format, or base + adapter merged into one
transformers checkpoint whose logits equal base + adapter's (LoRA, DoRA, an output layer tied to
the input embeddings, a 4-bit base), and the one-line errors of bad input."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkit import export
from rlkit.backend import models
from tests.helpers import supervised_steps, trainer_logprobs

PROBE = "a probe sentence, not the training text"


def trained(service, base, steps=3, **adapter):
    """A training client on `base` after a few supervised steps (so the adapter is not zero),
    and the folder save_weights_for_sampler wrote."""
    trainer = service.create_lora_training_client(base, seed=0, **{"rank": 4, **adapter})
    supervised_steps(trainer, "the quick brown fox jumps over the lazy dog", steps)
    return trainer, Path(trainer.save_weights_for_sampler("final").result().path)


def logits_of(model, tokens):
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([tokens])).logits[0].float()


def base_and_unmerged(base, adapter, tokens):
    """The base's logits, and base + adapter's as peft runs it unmerged: the oracle."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(models.resolve(base), dtype=torch.float32)
    before = logits_of(model, tokens)
    return before, logits_of(PeftModel.from_pretrained(model, str(adapter)), tokens)


def check_merged(out, base, adapter, tokens):
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    logits = logits_of(merged, tokens)
    before, expected = base_and_unmerged(base, adapter, tokens)
    # Merged weights round once more than base + B A: float32 rounding of logits of ~3.
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert (logits - before).abs().max() > 1e-3  # the adapter changed them
    return merged


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_merged_export_has_the_logits_of_base_plus_adapter(service, tmp_path, use_dora):
    trainer, adapter = trained(service, "rlkit-tiny", use_dora=use_dora)
    summary = export.export(adapter, tmp_path / "merged", merge=True)
    assert summary == "rlkit-tiny with the adapter merged, weights in float32"
    tokens = trainer.get_tokenizer().encode(PROBE)
    check_merged(tmp_path / "merged", "rlkit-tiny", adapter, tokens)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.chat_template == trainer.get_tokenizer().chat_template
    assert tokenizer.encode(PROBE) == tokens


@pytest.mark.slow  # tied_llama has the real model's tokenizer: its conversion (~20 s)
def test_a_tied_output_layer_is_untied_before_merging(service, tmp_path, tied_llama):
    trainer, adapter = trained(service, tied_llama, train_unembed=True)
    export.export(adapter, tmp_path / "merged", merge=True)
    tokens = trainer.get_tokenizer().encode(PROBE)
    merged = check_merged(tmp_path / "merged", tied_llama, adapter, tokens)
    base = AutoModelForCausalLM.from_pretrained(tied_llama, dtype=torch.float32)
    # The adapter on the output layer left the input embeddings as they were.
    assert torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not merged.config.tie_word_embeddings


def test_a_merged_4bit_base_is_the_model_that_was_trained(service, tmp_path):
    """QLoRA: the merge goes into the de-quantized nf4 weights, so the exported model computes
    what the trainer computed (not the original float base plus the adapter)."""
    pytest.importorskip("bitsandbytes")
    trainer, adapter = trained(service, "rlkit-tiny", quantize="nf4")
    summary = export.export(adapter, tmp_path / "merged", merge=True)
    assert summary.endswith("weights in float32, holding the de-quantized nf4 values of the base")
    tokens = trainer.get_tokenizer().encode(PROBE)
    as_trained = trainer_logprobs(trainer, tokens)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    logprobs = logits_of(merged, tokens[:-1]).log_softmax(-1)
    exported = logprobs.gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
    assert (exported - as_trained).abs().max() < 1e-5
    assert "quantization_config" not in json.loads((tmp_path / "merged/config.json").read_text())


def test_an_adapter_export_loads_on_its_base_with_peft(service, tmp_path):
    from peft import PeftModel

    trainer, adapter = trained(service, "rlkit-tiny")
    # As saved, the adapter names its base as the run did, not by this machine's cache path
    # (two runs with other caches wrote different adapter_config.json files).
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "rlkit-tiny"
    card = (adapter / "README.md").read_text()  # peft's model card
    assert "base_model: rlkit-tiny\n" in card and "base_model:adapter:rlkit-tiny\n" in card
    summary = export.export(adapter, tmp_path / "adapter")
    assert summary == "adapter of rlkit-tiny (peft format) with its tokenizer"
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == models.resolve("rlkit-tiny")
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    tokens = trainer.get_tokenizer().encode(PROBE)
    expected = base_and_unmerged("rlkit-tiny", adapter, tokens)[1]
    assert torch.equal(logits_of(loaded, tokens), expected)
    assert AutoTokenizer.from_pretrained(tmp_path / "adapter").chat_template


def test_a_run_dirs_adapter_is_found(service, tmp_path):
    _, adapter = trained(service, "rlkit-tiny", steps=1)
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    for name in export.ADAPTER_FILES:
        (run / "adapter" / name).write_bytes((adapter / name).read_bytes())
    assert export.find_adapter(run) == run / "adapter"


def test_bad_input_is_one_line(service, tmp_path, capsys):
    _, adapter = trained(service, "rlkit-tiny", steps=1)
    run = tmp_path / "stopped"
    (run / "checkpoints" / "step_000010" / "state").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_000010\n")
    cases = [
        ([str(run), str(tmp_path / "out")], f"error: {run} holds no adapter (no adapter/ with"),
        ([str(tmp_path / "nothing"), str(tmp_path / "out")], "does not exist"),
        ([str(adapter), str(adapter)], f"error: {adapter} already exists: choose a new OUT_DIR"),
    ]
    for argv, message in cases:
        assert export.main(argv) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert export.main([str(run), str(tmp_path / "out")]) == 1
    assert f"{run}/checkpoints/step_000010/state as RUN_DIR" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
