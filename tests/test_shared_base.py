"""Several training clients on one base model: one copy of its weights, an adapter each, and
each client's results bitwise those it gets alone (each call runs with its own adapter, on the
same shapes as alone)."""

import threading
from pathlib import Path

import pytest
import torch

import rlkit
from rlkit.api import types

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
