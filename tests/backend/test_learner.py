"""The learner behind a training client (rlkit.backend.learner): gradients against autograd
through the model, accumulation until the optimizer step, saved state (resumed exactly, refused,
damaged), the KL reference (the base model or a saved adapter), the entropy bonus, the engine a
quantized base falls back to, and several clients on one base model (one copy of its weights,
each client's own bits, whichever thread drives it)."""

import gc
import json
import logging
import os
import threading
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

import rlkit
from rlkit.api import types
from rlkit.api.errors import InvalidDatumError, NoGradientsError, RlkitError
from rlkit.backend import learner as learner_module
from rlkit.backend.engines import hf as hf_engine
from rlkit.backend.learner import STATE_FILE, read_state
from tests.helpers import (
    adapter_tensors,
    chat_datum,
    plain_datum,
    policy_datum,
    requires_bitsandbytes,
    rl_datum,
    sft_datums,
    train_step,
)


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


def test_optim_step_without_gradients(trainer):
    with pytest.raises(NoGradientsError, match="call forward_backward first"):
        trainer.optim_step(types.AdamParams()).result()
    # A forward (no backward) does not count either.
    trainer.forward([plain_datum()], "cross_entropy").result()
    with pytest.raises(NoGradientsError):
        trainer.optim_step(types.AdamParams()).result()


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


def test_bad_checkpoint_paths(service, trainer, tmp_path):
    with pytest.raises(rlkit.RlkitError, match="is not an rlkit checkpoint"):
        trainer.load_state(str(tmp_path)).result()
    with pytest.raises(ValueError, match="plain file name"):
        trainer.save_state("../escape")
    sampler_path = trainer.save_weights_for_sampler("s").result().path
    with pytest.raises(rlkit.RlkitError, match="no optimizer state"):
        trainer.load_state(sampler_path).result()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("symlink", r"adapter_model.safetensors is a link to /dev/zero, not a weights file"),
        ("garbage", r"cannot read .*adapter_model.safetensors as safetensors \(SafetensorError"),
        ("missing", r"adapter_model.safetensors is missing, not a weights file"),
        ("state_list", r"rlkit_state.json holds list, not a JSON object"),
        ("state_json", r"cannot read .*rlkit_state.json: Expecting property name"),
    ],
)
def test_load_state_from_a_damaged_folder_names_the_file(trainer, damage, message):
    path = Path(trainer.save_state("x").result().path)
    weights, state = path / "adapter_model.safetensors", path / "rlkit_state.json"
    if damage in ("symlink", "garbage", "missing"):
        weights.unlink()
    if damage == "symlink":
        weights.symlink_to("/dev/zero")
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 64)
    elif damage == "state_list":
        state.write_text("[1, 2]")
    elif damage == "state_json":
        state.write_text("{not json")
    with pytest.raises(RlkitError, match=message):
        trainer.load_state(str(path)).result()


def test_read_state_is_what_save_state_wrote_and_refuses_what_is_not_a_checkpoint(trainer):
    trainer.forward_backward(sft_datums(trainer.get_tokenizer(), n=1), "cross_entropy").result()
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = Path(trainer.save_state("one-step").result().path)
    state = read_state(path)
    assert (state["base_model"], state["step"], state["adapter"]["rank"]) == ("rlkit-tiny", 1, 8)
    (path / STATE_FILE).write_text(json.dumps({"base_model": "rlkit-tiny", "adapter": {}}))
    with pytest.raises(RlkitError, match="has no step: not an rlkit checkpoint"):
        read_state(path)
    (path / STATE_FILE).write_text(json.dumps({**state, "adapter": "r8"}))
    with pytest.raises(RlkitError, match="'adapter' is 'r8', not its settings"):
        read_state(path)


def test_sampler_weights_round_trip(service, trainer):
    data = sft_datums(trainer.get_tokenizer())
    trainer.forward_backward(data, "cross_entropy")
    trainer.optim_step(types.AdamParams(learning_rate=1e-2))
    path = trainer.save_weights_for_sampler("final").result().path
    prompt = types.ModelInput.from_ints(data[0].model_input.to_ints())
    live = trainer.save_weights_and_get_sampling_client().compute_logprobs(prompt).result()
    loaded = service.create_sampling_client(model_path=path).compute_logprobs(prompt).result()
    assert live == loaded


@requires_bitsandbytes
def test_sampler_weights_load_on_an_unquantized_base(service, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    from rlkit.backend import models

    trainer = service.create_lora_training_client(
        "rlkit-tiny", rank=8, quantize="nf4", use_dora=True
    )
    train_step(trainer, [chat_datum(trainer.get_tokenizer(), "foo")])
    path = trainer.save_weights_for_sampler("for-serving").result().path
    saved = load_file(os.path.join(path, "adapter_model.safetensors"))
    base = models.load_model("rlkit-tiny")  # float32, not quantized
    tokens = torch.tensor([chat_datum(trainer.get_tokenizer(), "foo").model_input.to_ints()])
    plain_logits = base(tokens).logits
    served = PeftModel.from_pretrained(base, path).eval()
    loaded = get_peft_model_state_dict(served, save_embedding_layers=False)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)
    assert not torch.allclose(served(tokens).logits, plain_logits)


@requires_bitsandbytes
def test_vllm_falls_back_to_hf_for_a_quantized_base(tmp_path, caplog):
    import rlkit

    service = rlkit.ServiceClient(device="cpu", engine="vllm", checkpoint_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        trainer = service.create_lora_training_client("rlkit-tiny", rank=8, quantize="fp4")
    assert trainer._learner.engine.name == "hf"
    assert "cannot serve a quantized base" in caplog.text
    sampler = trainer.save_weights_and_get_sampling_client()
    assert sampler.sync_metrics["sync/probe_mismatch"] <= 1e-6


def test_reference_logprobs_equal_a_separately_loaded_base_model(service, trainer):
    d = policy_datum(3, 6)
    # move the adapter away from the base first: B starts at 0, so a fresh adapter is the base
    for _ in range(3):
        trainer.forward_backward([d], "ppo", None)
        trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    policy = trainer.forward([d], "ppo").result().loss_fn_outputs[0]["logprobs"].to_torch()
    (ref,) = trainer.compute_reference_logprobs([d]).result()
    base = service.create_sampling_client(base_model="rlkit-tiny")
    tokens = d.model_input.to_ints() + [d.loss_fn_inputs["target_tokens"].to_torch()[-1].item()]
    from_copy = torch.tensor(base.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:])
    torch.testing.assert_close(ref.to_torch(), from_copy, atol=1e-5, rtol=0)
    assert (policy - from_copy).abs().max() > 1e-3  # the adapter does change the policy
    # the adapter is back on afterwards
    again = trainer.forward([d], "ppo").result().loss_fn_outputs[0]["logprobs"].to_torch()
    assert torch.equal(again, policy)


def test_the_reference_can_be_a_saved_adapter_and_the_policy_is_left_untouched(service):
    """kl.reference=start: the KL reference is the adapter RL started from (the warm start's),
    swapped in for one forward pass; the policy's weights come back bitwise."""
    trainer = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    d = policy_datum(3, 6)

    def train(n):
        for _ in range(n):
            trainer.forward_backward([d], "ppo", None)
            trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()

    train(3)
    start = trainer.save_weights_for_sampler("start").result().path
    train(3)
    before = adapter_tensors(trainer)
    policy = trainer.forward([d], "ppo").result().loss_fn_outputs[0]["logprobs"].to_torch()
    trainer.set_reference(start).result()
    (ref,) = trainer.compute_reference_logprobs([d]).result()
    tokens = d.model_input.to_ints() + [d.loss_fn_inputs["target_tokens"].to_torch()[-1].item()]
    saved = service.create_sampling_client(model_path=start)
    want = torch.tensor(saved.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:])
    torch.testing.assert_close(ref.to_torch(), want, atol=1e-5, rtol=0)
    assert (policy - want).abs().max() > 1e-3  # the three later steps did move the policy
    after = adapter_tensors(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = trainer.forward([d], "ppo").result().loss_fn_outputs[0]["logprobs"].to_torch()
    assert torch.equal(again, policy)
    # None: the base model again
    trainer.set_reference(None).result()
    (base_ref,) = trainer.compute_reference_logprobs([d]).result()
    base = service.create_sampling_client(base_model="rlkit-tiny")
    from_base = torch.tensor(base.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:])
    torch.testing.assert_close(base_ref.to_torch(), from_base, atol=1e-5, rtol=0)


def test_a_reference_of_another_rank_is_refused(service):
    other = service.create_lora_training_client("rlkit-tiny", rank=2, seed=0)
    path = other.save_weights_for_sampler("r2").result().path
    trainer = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    with pytest.raises(Exception, match="rank=2, but this client has .* rank=4"):
        trainer.set_reference(path).result()


def test_entropy_bonus_in_the_learner_matches_the_logits_formula(trainer):
    d = policy_datum(3, 6)
    config = {"entropy_coef": 0.1}
    trainer.forward_backward([d], "importance_sampling", config).result()
    learner = trainer._learner
    got = {k: p.grad.clone() for k, p in learner.params.items() if p.grad is not None}
    learner.optimizer.zero_grad(set_to_none=True)
    learner.pending_datums = 0
    device = learner.device  # cpu, or RLKIT_TEST_DEVICE
    tokens = torch.tensor([d.model_input.to_ints()], device=device)
    targets = d.loss_fn_inputs["target_tokens"].to_torch().long().to(device)
    logits = learner.model(input_ids=tokens).logits.float()[0]
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(1, targets[:, None])[:, 0]
    h = -(logp.exp() * logp).sum(-1)
    inputs = {
        k: d.loss_fn_inputs[k].to_torch().float().to(device)
        for k in ("logprobs", "advantages", "weights")
    }
    per = -torch.exp(lp - inputs["logprobs"]) * inputs["advantages"] - 0.1 * h
    (per * inputs["weights"]).sum().backward()
    for k, g in got.items():
        torch.testing.assert_close(learner.params[k].grad, g, atol=1e-6, rtol=1e-5)


# Several training clients on one base model: one copy of its weights, an adapter each, and
# each client's results bitwise those it gets alone (each call runs with its own adapter, on the
# same shapes as alone).
ARMS = [
    dict(rank=8, seed=0, lora_alpha=16.0, lr=2e-2),
    dict(rank=4, seed=1, lora_alpha=32.0, lr=5e-3, train_mlp=False),
    dict(rank=8, seed=2, lora_alpha=16.0, lr=1e-2, use_dora=True),
]


def client(service, arm):
    kwargs = {k: v for k, v in arm.items() if k != "lr"}
    return service.create_lora_training_client("rlkit-tiny", **kwargs)


def datums(tokenizer, seed):
    texts = [f"{seed} plus {i} is {seed + i}." for i in range(3)]
    out = []
    for text in texts:
        tokens = tokenizer.encode(text)
        out.append(
            types.Datum(
                types.ModelInput.from_ints(tokens[:-1]),
                {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
            )
        )
    return out


def run_steps(trainer, arm):
    return list(steps_of(trainer, arm))


def saved_files(trainer, name):
    path = Path(trainer.save_state(name).result().path)
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        elif isinstance(x, list | tuple):
            assert_same(x, y)
        else:
            assert x == y


@pytest.fixture
def alone(tmp_path):
    """Each arm on a service of its own: what it gets alone."""
    out = []
    for i, arm in enumerate(ARMS):
        service = rlkit.ServiceClient(
            device="cpu", dtype="float32", checkpoint_dir=tmp_path / f"alone{i}"
        )
        trainer = client(service, arm)
        out.append((run_steps(trainer, arm), saved_files(trainer, "end")))
    return out


def test_clients_on_one_base_share_its_weights_and_get_their_own_bits(tmp_path, alone):
    service = rlkit.ServiceClient(device="cpu", dtype="float32", checkpoint_dir=tmp_path / "one")
    trainers = [client(service, arm) for arm in ARMS]
    models = {id(t._learner.model) for t in trainers}
    assert len(models) == 1  # one copy of the base weights
    params = {n for t in trainers for n in t._learner.params}
    assert len(params) == sum(len(t._learner.params) for t in trainers)  # adapters apart
    # Interleaved, one call of each in turn: every client still gets its own results.
    records = [[] for _ in ARMS]
    steps = [steps_of(t, arm) for t, arm in zip(trainers, ARMS, strict=True)]
    for _ in range(6):
        for i, it in enumerate(steps):
            records[i].append(next(it))
    for i, trainer in enumerate(trainers):
        assert_same(records[i], alone[i][0])
        assert saved_files(trainer, "end") == alone[i][1]
    # and one merged copy of the base for the hf engine: each client's snapshot re-merged in it
    samplers = {id(t._learner._engine()._sampler) for t in trainers}
    assert len(samplers) == 1


def steps_of(trainer, arm):
    """A few train steps and samples; what the client returned, one call's result at a time
    (so callers can interleave clients)."""
    data = datums(trainer.get_tokenizer(), arm["seed"])
    for step in range(3):
        out = trainer.forward_backward(data, "cross_entropy").result()
        yield [o["logprobs"].to_torch() for o in out.loss_fn_outputs]
        trainer.optim_step(types.AdamParams(learning_rate=arm["lr"])).result()
        sampler = trainer.save_weights_and_get_sampling_client()
        prompt = data[0].model_input.to_ints()[:6]
        sample = sampler.sample(
            types.ModelInput.from_ints(prompt), 2, types.SamplingParams(max_tokens=8, seed=step)
        ).result()
        yield [(s.tokens, s.logprobs) for s in sample.sequences]


def test_clients_in_threads_on_one_base_get_their_own_bits(tmp_path, alone):
    first = rlkit.ServiceClient(device="cpu", dtype="float32", checkpoint_dir=tmp_path / "a")
    # A second ServiceClient (its own checkpoint dir) sharing the first one's bases.
    second = rlkit.ServiceClient(
        device="cpu", dtype="float32", checkpoint_dir=tmp_path / "b", shares_with=first
    )
    trainers = [client(first if i % 2 == 0 else second, arm) for i, arm in enumerate(ARMS)]
    assert len({id(t._learner.model) for t in trainers}) == 1
    results: dict[int, object] = {}

    def work(i):
        results[i] = (run_steps(trainers[i], ARMS[i]), saved_files(trainers[i], "end"))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(ARMS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(ARMS)):
        assert_same(results[i][0], alone[i][0])
        assert results[i][1] == alone[i][1]


def test_another_dtype_or_base_is_another_copy(tmp_path):
    service = rlkit.ServiceClient(device="cpu", dtype="float32", checkpoint_dir=tmp_path)
    a = service.create_lora_training_client("rlkit-tiny", rank=4)
    b = service.create_lora_training_client("rlkit-tiny", rank=4, seed=1)
    other = rlkit.ServiceClient(device="cpu", dtype="bfloat16", checkpoint_dir=tmp_path)
    c = other.create_lora_training_client("rlkit-tiny", rank=4)
    assert a._learner.model is b._learner.model
    assert c._learner.model is not a._learner.model


def test_clients_driven_from_threads_served_in_the_main_thread(tmp_path, alone):
    """`serve_calls_here`: the threads drive the clients, the main thread does all their model
    work (building the models included); each client still gets its own bits."""
    service = rlkit.ServiceClient(device="cpu", dtype="float32", checkpoint_dir=tmp_path)
    results: dict[int, object] = {}
    workers: dict[int, str] = {}

    def work(i):
        trainer = client(service, ARMS[i])
        workers[i] = trainer._worker._run(lambda: threading.current_thread().name)
        results[i] = (run_steps(trainer, ARMS[i]), saved_files(trainer, "end"))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(ARMS))]
    service.serve_calls_here(
        until=lambda: not any(t.is_alive() for t in threads),
        start=lambda: [t.start() for t in threads],
    )
    assert set(workers.values()) == {threading.main_thread().name}
    for i in range(len(ARMS)):
        assert_same(results[i][0], alone[i][0])
        assert results[i][1] == alone[i][1]


def test_a_closed_client_gives_its_adapter_back_and_the_last_one_the_base(tmp_path, alone):
    """`TrainingClient.close`: the others on the base go on with their own bits; once the last
    one closes, nothing holds the base's weights."""
    service = rlkit.ServiceClient(device="cpu", dtype="float32", checkpoint_dir=tmp_path)
    first, second = (client(service, arm) for arm in ARMS[:2])
    run_steps(first, ARMS[0])  # both adapters in the engine's shared copy
    sampler = first.save_weights_and_get_sampling_client()
    model = weakref.ref(first._learner.model)
    first.close()
    assert list(second._learner.model.peft_config) == ["adapter_1"]
    assert list(second._learner._engine()._sampler.model.peft_config) == ["adapter_1"]
    assert_same(run_steps(second, ARMS[1]), alone[1][0])
    for call in (
        lambda: first.forward_backward(datums(first.get_tokenizer(), 0), "cross_entropy"),
        lambda: sampler.sample(types.ModelInput.from_ints([1, 2]), 1),
    ):
        with pytest.raises(RlkitError, match="this training client was closed"):
            call()
    second.close()
    second.close()  # twice: nothing left to give
    gc.collect()
    assert model() is None and not service._pool.bases
    again = client(service, ARMS[0])  # a new base, as the first client on it
    assert_same(run_steps(again, ARMS[0]), alone[0][0])


def test_soft_targets_are_the_weighted_sum_of_hard_ones(service):
    """cross_entropy with (N, K) target_tokens and weights (a teacher's top-k, as Tinker's
    distillation sends): the loss and gradients of K hard-target datums, one per column, in
    one pass; (N, K) logprobs out; another datum in the same batch is unchanged."""
    prompt = [5, 6, 7, 8, 9, 10]
    targets = [[6, 11, 12], [7, 7, 13], [8, 14, 2], [9, 3, 4], [10, 20, 21], [11, 5, 6]]
    weights = [[0.0, 0.0, 0.0], [0.5, 0.3, 0.2], [0.6, 0.4, 0.0], [1.0, 0.0, 0.0]]
    weights += [[0.2, 0.2, 0.6], [0.7, 0.2, 0.1]]
    soft = types.Datum(
        types.ModelInput.from_ints(prompt),
        {"target_tokens": torch.tensor(targets), "weights": torch.tensor(weights)},
    )
    plain = types.Datum(
        types.ModelInput.from_ints([3, 4, 5]),
        {"target_tokens": [4, 5, 6], "weights": [1.0, 1.0, 1.0]},
    )
    hard = [
        types.Datum(
            types.ModelInput.from_ints(prompt),
            {"target_tokens": [t[j] for t in targets], "weights": [w[j] for w in weights]},
        )
        for j in range(3)
    ]

    def run(data):
        trainer = service.create_lora_training_client("rlkit-tiny", rank=8, seed=0)
        out = trainer.forward_backward(data, "cross_entropy").result()
        learner = trainer._learner  # the second client on the base: another adapter name
        name = learner.adapter_name
        grads = {n.replace(name, "X"): p.grad.clone() for n, p in learner.params.items()}
        return out, grads

    a, grads_a = run([soft, plain])
    b, grads_b = run([*hard, plain])
    assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=1e-5)
    lp = a.loss_fn_outputs[0]["logprobs"].to_torch()
    assert lp.shape == (6, 3)
    for j in range(3):
        want = b.loss_fn_outputs[j]["logprobs"].to_torch()
        torch.testing.assert_close(lp[:, j], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        a.loss_fn_outputs[1]["logprobs"].to_torch(),
        b.loss_fn_outputs[3]["logprobs"].to_torch(),
        atol=1e-5,
        rtol=0,
    )
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "loss, inputs, message",
    [
        ("cross_entropy", {"weights": [1.0, 1.0]}, r"'weights'\] has shape \[2\], .*\[2, 2\]"),
        (
            "importance_sampling",
            {"logprobs": [0.0, 0.0], "advantages": [1.0, 1.0]},
            r"'target_tokens'\] has shape \[2, 2\], .*expected shape \[2\]\)",
        ),
    ],
)
def test_soft_targets_need_matching_inputs_and_a_loss_that_takes_them(
    trainer, loss, inputs, message
):
    datum = types.Datum(
        types.ModelInput.from_ints([1, 2]), {"target_tokens": [[2, 3], [3, 4]], **inputs}
    )
    with pytest.raises(InvalidDatumError, match=message):
        trainer.forward_backward([datum], loss).result()


def test_party_clients_forward_backward_runs_as_one_pass(tmp_path, alone, monkeypatch):
    """`serve_calls_here(parties=...)`: the LoRA clients' forward_backward calls run as one
    pass, and their samples as one decode, each row through its own adapter (one of rank 8 on every layer, one of rank 4 on
    attention only): each client's results are its own to float rounding, and the same bits
    in every run."""
    passes, decodes = [], []
    forward_rows = learner_module._forward_rows
    sample_batch = hf_engine.sample_batch

    def spy(part, backward, per_row):
        passes.append((len(part), per_row))
        return forward_rows(part, backward, per_row)

    def spy_sample(model, tokenizer, requests, adapters=None):
        decodes.append(adapters)
        return sample_batch(model, tokenizer, requests, adapters)

    monkeypatch.setattr(learner_module, "_forward_rows", spy)
    monkeypatch.setattr(hf_engine, "sample_batch", spy_sample)
    arms = ARMS[:2]

    def sweep(name):
        service = rlkit.ServiceClient(device="cpu", dtype="float32", checkpoint_dir=tmp_path / name)
        results: dict[int, object] = {}

        def work(i):
            trainer = client(service, arms[i])
            results[i] = (run_steps(trainer, arms[i]), saved_files(trainer, "end"))

        threads = [threading.Thread(target=service.in_turn, args=(work, i)) for i in range(2)]
        service.serve_calls_here(
            until=lambda: not any(t.is_alive() for t in threads),
            start=lambda: [t.start() for t in threads],
            parties=threads,
        )
        return results

    first = sweep("first")
    assert passes == [(2, True)] * 3  # three steps, each one pass for both clients
    # and each step's samples one decode, each client's rows through its adapter
    assert [sorted(set(names)) for names in decodes] == [["adapter_1", "default"]] * 3
    again = sweep("again")
    for i in range(2):
        assert_same(first[i][0], again[i][0])
        assert first[i][1] == again[i][1]
        for got, want in zip(first[i][0], alone[i][0], strict=True):
            if isinstance(got[0], torch.Tensor):  # forward_backward's logprobs
                for g, w in zip(got, want, strict=True):
                    torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
            else:  # samples: the same tokens, logprobs to rounding
                for (tokens, lps), (want_tokens, want_lps) in zip(got, want, strict=True):
                    assert tokens == want_tokens
                    torch.testing.assert_close(
                        torch.tensor(lps), torch.tensor(want_lps), atol=1e-5, rtol=1e-5
                    )
        weights = load_safetensors(first[i][1]["adapter_model.safetensors"])
        want = load_safetensors(alone[i][1]["adapter_model.safetensors"])
        assert weights.keys() == want.keys()
        for key in weights:
            torch.testing.assert_close(weights[key], want[key], atol=1e-5, rtol=1e-4)
