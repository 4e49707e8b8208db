"""engine=vllm (its CPU build) on the real pretrained model, and vLLM loading a merged export.

SmolLM2-135M-Instruct (converted from its GGUF file; see tests/backend/test_pretrained.py) with
the recipe's adapter (LoRA on every layer, the output layer tied to the input embeddings
included): after a few training steps the post-sync probe and the sampled tokens' logprobs
agree with the trainer; then `rlkit.export --merge` of that adapter loads in a plain
`vllm.LLM`, whose logprobs agree too.

Without vLLM installed these tests skip, unless RLKIT_REQUIRE_VLLM=1 (set by `make test`).
"""

from pathlib import Path

import pytest

from rlkit.backend.engines import vllm as vllm_engine
from tests.helpers import (
    chat_prompt,
    sampled_logprob_gap,
    skip_module_without_vllm,
    supervised_steps,
    trainer_logprobs,
)

pytestmark = pytest.mark.slow

skip_module_without_vllm()

MODEL, RANK = "smollm2-135m-instruct", 8
# Measured: probe 1.6e-5, sampled-token logprobs within 4.5e-5 of the trainer, the merged export
# in a plain vLLM within 4.6e-5 (30 layers, float32, vLLM-CPU's kernels vs torch's); 1e-3 is the
# engines' default probe tolerance.
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def trainer(smollm2, tmp_path_factory):
    import rlkit

    service = rlkit.ServiceClient(
        device="cpu", checkpoint_dir=tmp_path_factory.mktemp("ckpt"), engine="vllm"
    )
    trainer = service.create_lora_training_client(MODEL, rank=RANK, seed=0)
    supervised_steps(trainer, "What is 47 + 38? 47 + 38 = 85", lr=1e-2)
    yield trainer
    vllm_engine.shutdown()


def prompt_of(trainer, question="What is 47 - 38? Answer with the number only."):
    return chat_prompt(trainer.get_tokenizer(), question)


def test_engine_vllm_serves_the_trained_real_model(trainer):
    sampler = trainer.save_weights_and_get_sampling_client()
    probe = sampler.sync_metrics["sync/probe_mismatch"]
    assert probe < TOLERANCE
    worst = sampled_logprob_gap(trainer, sampler, prompt_of(trainer))
    print(f"probe {probe:.2e}, sampled-token logprob gap {worst:.2e}")
    assert worst < TOLERANCE


def test_vllm_loads_a_merged_export_of_the_real_model(trainer, tmp_path):
    import vllm

    from rlkit import export

    adapter = trainer.save_weights_for_sampler("for-export").result().path
    export.export(Path(adapter), tmp_path / "merged", merge=True)
    llm = vllm.LLM(
        model=str(tmp_path / "merged"),
        dtype="float32",
        enforce_eager=True,
        enable_chunked_prefill=False,
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=2**29,
        max_model_len=512,
    )
    try:
        prompt = prompt_of(trainer)
        params = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        (out,) = llm.generate([vllm.TokensPrompt(prompt_token_ids=prompt)], params)
        served = [next(iter(lp.values())).logprob for lp in out.prompt_logprobs[1:]]
        trained = trainer_logprobs(trainer, prompt).tolist()
        gap = max(abs(a - b) for a, b in zip(served, trained, strict=True))
        print(f"merged export in vLLM vs trainer: {gap:.2e}")
        assert gap < TOLERANCE
    finally:
        del llm
