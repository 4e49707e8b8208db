"""The Tinker-style API end to end on the built-in tiny model (real transformers + peft)."""

import asyncio

import pytest
import torch

import rlkit
from rlkit.api import types
from rlkit.examples import first_sft


def sft_datums(tokenizer, n=4):
    return [first_sft.make_datum(tokenizer, q, "foo") for q in first_sft.TRAIN_QUESTIONS[:n]]


def rl_datum(tokenizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = first_sft.make_datum(tokenizer, "Why?", "because")
    n = d.model_input.length
    return types.Datum(
        d.model_input,
        {
            "target_tokens": d.loss_fn_inputs["target_tokens"],
            "logprobs": -torch.rand(n, generator=g) * 3,
            "advantages": torch.randn(n, generator=g),
        },
    )


@pytest.mark.slow  # 48 training steps and sampling, end to end
def test_first_sft_exercise_learns_foo():
    """The tutorial's first exercise: loss < 10% of start, then `foo<|im_end|>` on unseen questions."""
    result = first_sft.run(base_model="rlkit-tiny", steps=48, num_samples=8, verbose=False)
    assert result.losses[-1] < 0.1 * result.losses[0], result.losses
    outs = [s for samples in result.samples.values() for s in samples]
    hits = sum(s == "foo<|im_end|>" for s in outs)
    assert hits > len(outs) / 2, outs
    assert result.logprobs_match_tokens


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


def test_importance_sampling_gradient_through_the_model(trainer):
    """forward_backward's gradients equal autograd of -(exp(lp - q) * A).sum() on the model."""
    datum = rl_datum(trainer.get_tokenizer())
    learner = trainer._learner
    trainer.forward_backward([datum], "importance_sampling").result()
    ours = {n: p.grad.clone() for n, p in learner.params.items()}
    learner.optimizer.zero_grad(set_to_none=True)

    device = learner.device  # cpu, or RLKIT_TEST_DEVICE
    tokens = torch.tensor([datum.model_input.to_ints()], device=device)
    targets = datum.loss_fn_inputs["target_tokens"].to_torch().to(device)
    q = datum.loss_fn_inputs["logprobs"].to_torch().to(device)
    adv = datum.loss_fn_inputs["advantages"].to_torch().to(device)
    logits = learner.model(input_ids=tokens).logits[0].float()
    lp = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    (-(torch.exp(lp - q) * adv).sum()).backward()
    for name, p in learner.params.items():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in ours.values())


def test_gradients_accumulate_until_optim_step(trainer):
    data = sft_datums(trainer.get_tokenizer(), n=2)
    params = trainer._learner.params
    trainer.forward_backward(data, "cross_entropy").result()
    once = {n: p.grad.clone() for n, p in params.items()}
    # A fresh adapter has B = 0, so only the B matrices get a gradient; each of them must.
    b_grads = {n: g for n, g in once.items() if "lora_B" in n}
    assert b_grads and all(g.abs().sum() > 0 for g in b_grads.values())
    trainer.forward_backward(data, "cross_entropy").result()
    for n, p in params.items():
        torch.testing.assert_close(p.grad, 2 * once[n])


def test_save_load_state_reproduces_next_step_exactly(service, trainer):
    data = sft_datums(trainer.get_tokenizer())
    adam = types.AdamParams(learning_rate=1e-2)
    for _ in range(3):
        trainer.forward_backward(data, "cross_entropy")
        trainer.optim_step(adam)
    path = trainer.save_state("step3").result().path

    def next_losses(client):
        first = client.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
        client.optim_step(adam).result()
        second = client.forward(data, "cross_entropy").result().metrics["loss:sum"]
        return first, second

    expected = next_losses(trainer)
    fresh = service.create_lora_training_client("rlkit-tiny", rank=8, seed=123)
    fresh.load_state(path).result()
    assert next_losses(fresh) == expected  # bit-for-bit, optimizer moments included

    from_state = service.create_training_client_from_state_with_optimizer(path)
    assert next_losses(from_state) == expected


def test_load_state_refuses_a_different_base_or_rank(service, trainer):
    path = trainer.save_state("s").result().path
    other = service.create_lora_training_client("rlkit-tiny", rank=4)
    with pytest.raises(rlkit.RlkitError, match="rank=8"):
        other.load_state(path).result()


def test_sampler_weights_round_trip(service, trainer):
    data = sft_datums(trainer.get_tokenizer())
    trainer.forward_backward(data, "cross_entropy")
    trainer.optim_step(types.AdamParams(learning_rate=1e-2))
    path = trainer.save_weights_for_sampler("final").result().path
    prompt = types.ModelInput.from_ints(data[0].model_input.to_ints())
    live = trainer.save_weights_and_get_sampling_client().compute_logprobs(prompt).result()
    loaded = service.create_sampling_client(model_path=path).compute_logprobs(prompt).result()
    assert live == loaded


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


def test_lora_layers_follow_train_flags(service):
    attn_only = service.create_lora_training_client(
        "rlkit-tiny", rank=4, train_mlp=False, train_unembed=False
    )
    names = list(attn_only._learner.params)
    assert names and all("self_attn" in n for n in names)
    assert attn_only.get_info().lora_rank == 4


@pytest.mark.parametrize("use_dora", [False, True])
def test_sampler_matches_trainer_after_training(service, use_dora):
    """The sampler serves a merged copy; its logprobs equal the trainer's LoRA forward pass."""
    trainer = service.create_lora_training_client("rlkit-tiny", rank=8, use_dora=use_dora)
    data = sft_datums(trainer.get_tokenizer(), n=2)
    for _ in range(3):
        trainer.forward_backward(data, "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=1e-2))
    sampler = trainer.save_weights_and_get_sampling_client()
    prompt = data[0].model_input.to_ints()[:20]
    seq = (
        sampler.sample(
            types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=10, seed=1)
        )
        .result()
        .sequences[0]
    )
    tokens = prompt + seq.tokens
    datum = types.Datum(
        types.ModelInput.from_ints(tokens[:-1]),
        {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    trainer_lp = trainer.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    torch.testing.assert_close(
        trainer_lp.to_torch()[len(prompt) - 1 :], torch.tensor(seq.logprobs), atol=1e-4, rtol=0
    )


def test_hf_engine_decodes_queued_requests_together_with_their_own_seeds(trainer):
    """The hf engine decodes a step's requests in one batch; each completion draws from its own
    generator (request seed, row), so a request gets the same tokens alone, in a batch of
    mixed prompts, lengths and settings, or split into batches of `batch_rows`."""
    from rlkit.backend.engines.base import Request
    from rlkit.backend.engines.hf import HFEngine

    learner = trainer._learner
    tok = learner.tokenizer
    engine = HFEngine(learner.model, tok)
    engine.load(1, learner.snapshot().tensors)
    requests = [
        Request(tok.encode("ab"), 3, types.SamplingParams(seed=1), 1, 12),
        Request(tok.encode("hello there"), 2, types.SamplingParams(top_k=5), 2, 7),
        Request(tok.encode("x"), 2, types.SamplingParams(temperature=0), 3, 9),
        Request(tok.encode("abc"), 2, types.SamplingParams(top_p=0.5, stop=["e"]), 4, 12),
    ]
    together = engine.sample(requests)
    alone = [engine.sample([r])[0] for r in requests]
    engine.batch_rows = 3
    split = engine.sample(requests)
    tokens = lambda out: [[s.tokens for s in r] for r in out]  # noqa: E731
    assert tokens(together) == tokens(alone) == tokens(split)
    assert [len(r) for r in together] == [3, 2, 2, 2]
    assert len({tuple(s) for s in tokens(together)[0]}) > 1  # rows of one request differ
    assert tokens(together)[2][0] == tokens(together)[2][1]  # greedy: one pass, repeated
    assert all(len(s.tokens) <= 7 for s in together[1])
    for s in together[3]:  # a stop string ends the row right after it
        text = tok.decode(s.tokens, skip_special_tokens=True)
        assert s.stop_reason == "length" or "e" in text


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (-1, 0.7), (20, 0.9)])
def test_hf_engine_filters_match_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from rlkit.backend.engines.hf import _filtered

    logits = torch.randn(300, generator=torch.Generator().manual_seed(0)) * 3
    params = types.SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
    want = TemperatureLogitsWarper(0.7)(None, logits[None].clone())
    if top_k != -1:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    torch.testing.assert_close(_filtered(logits, params), want[0])


def test_hf_engine_draws_follow_the_distribution():
    """The hf engine's draw (one uniform per token through the inverse cumulative distribution,
    blocks of 256 tokens): a vocabulary not a multiple of the block, tokens of probability 0
    never drawn, frequencies within 5 standard errors of the probabilities."""
    from rlkit.backend.engines.hf import _inverse_cdf

    g = torch.Generator().manual_seed(0)
    vocab, n = 1000, 200_000
    probs = torch.softmax(torch.randn(vocab, generator=g) * 2, -1)
    probs[[0, 5, 256, 999]] = 0  # block edges and the padded end
    u = torch.rand(n, dtype=torch.float64, generator=g)
    tokens = _inverse_cdf(probs.expand(n, vocab).contiguous(), u)
    freq = torch.bincount(tokens, minlength=vocab).double() / n
    p = (probs / probs.sum()).double()
    assert (freq[p == 0] == 0).all()
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9).all()


def test_hf_engine_filters_a_batch_as_each_row():
    from rlkit.backend.engines.hf import _filtered

    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    params = types.SamplingParams(temperature=0.7, top_k=20, top_p=0.8)
    batch = _filtered(logits, params)
    for row in range(4):
        assert torch.equal(batch[row], _filtered(logits[row], params))
