"""The client's data parallelism (global-view SPMD), on CPU with gloo: two real processes joined
by torch.distributed, each a training client on the tiny model, both making the same calls with
the same data, as a hand-written loop under a launcher does.

Each process saves its adapter after one forward_backward + optim_step and writes what it did
itself (tokens forwarded and sampled, the items `map_items` ran there); the parent compares them
with each other and with a single process making the same calls.
"""

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.e2e import warm

pytestmark = pytest.mark.slow  # starts two processes

WORLD = 2
ROOT = Path(__file__).resolve().parents[2]  # where `python -m tests.e2e...` finds this module


def batch(tokenizer, n: int) -> list:
    from rlkit.api import types

    datums = []
    for i in range(n):
        tokens = tokenizer.encode(f"question {i} -> answer {i * 7}", add_special_tokens=False)
        datums.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
            )
        )
    return datums


def train_once(n_datums, out_dir, name) -> None:
    """The same calls in every process: forward_backward on the whole batch, optim_step, four
    sample requests, and a map over six items; then save what came back."""
    import rlkit
    from rlkit import client
    from rlkit.api import types

    service = rlkit.ServiceClient(device="cpu", checkpoint_dir=f"{out_dir}/c-{name}")
    trainer = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    data = batch(trainer.get_tokenizer(), n_datums)
    out = trainer.forward_backward(data, "cross_entropy").result()
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    params = trainer._learner.params
    save_file(
        {n: p.detach().clone().contiguous() for n, p in params.items()},
        f"{out_dir}/{name}.safetensors",
    )
    sampler = trainer.save_weights_and_get_sampling_client()
    sp = types.SamplingParams(max_tokens=6, temperature=1.0, seed=11)
    futures = [sampler.sample(d.model_input, 2, sp) for d in data[:4]]
    samples = [[s.tokens for s in f.result().sequences] for f in futures]
    ran_here = []
    squares = client.map_items(lambda x: ran_here.append(x) or x * x, list(range(6)))
    record = {
        "loss": out.metrics["loss:sum"],
        "logprobs": [o["logprobs"].tolist() for o in out.loss_fn_outputs],
        "samples": samples,
        "squares": squares,
        "ran_here": ran_here,
        "counts": trainer._learner.local_counts,
        "tokens": sum(d.model_input.length for d in data),
    }
    with open(f"{out_dir}/{name}.json", "w") as f:
        json.dump(record, f)


def worker(rank: int, init_file: str, out_dir: str, n_datums: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=120),  # a hung peer fails the test instead of stalling CI
    )
    try:
        train_once(n_datums, out_dir, f"rank{rank}")
    finally:
        dist.destroy_process_group()
    # Everything is written: leave without the interpreter's teardown, where gloo's worker
    # threads, freed late, can abort a spawned process (SIGABRT, "terminate called without an
    # active exception"; pytorch/pytorch PR 179291). rlkit's own processes leave their group
    # at exit (distributed.leave) before that teardown.
    os._exit(0)


def run_two_processes(tmp_path, n_datums) -> list[tuple[dict, dict]]:
    """`worker` in WORLD processes, each `python -m` this module, forked from a warm
    interpreter (tests/e2e/warm.py; spawned, each imported torch and transformers first)."""
    os.environ.setdefault("RLKIT_CACHE_DIR", str(tmp_path / "cache"))  # children inherit it
    args = [str(tmp_path / "init"), str(tmp_path), str(n_datums)]
    processes = [
        subprocess.Popen(
            [warm.python(), "-m", __name__, str(rank), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for rank, (process, output) in enumerate(zip(processes, outputs, strict=True)):
        assert process.returncode == 0, f"rank {rank}: exit {process.returncode}\n{output[-3000:]}"
    return [
        (
            load_file(tmp_path / f"rank{r}.safetensors"),
            json.loads((tmp_path / f"rank{r}.json").read_text()),
        )
        for r in range(WORLD)
    ]


def one_process(tmp_path, n_datums) -> tuple[dict, dict]:
    """The same calls in one process."""
    torch.set_num_threads(1)
    train_once(n_datums, tmp_path, "all")
    return load_file(tmp_path / "all.safetensors"), json.loads((tmp_path / "all.json").read_text())


def test_two_processes_split_every_call_and_match_one_process(tmp_path):
    """4 datums: each process forwards its block (together: every token once), samples its
    block of the requests and runs its block of the map; both get every result, bitwise equal
    to each other, and equal to one process up to the order of the gradient sum (1e-6 relative
    on the gradients; Adam's first step is about lr * sign(gradient), so 1e-5 here)."""
    (p0, r0), (p1, r1) = run_two_processes(tmp_path, 4)
    (tmp_path / "one").mkdir()
    one_params, one = one_process(tmp_path / "one", 4)
    moved = 0
    for name, tensor in p0.items():
        assert torch.equal(tensor, p1[name]), name
        torch.testing.assert_close(tensor, one_params[name], rtol=0, atol=1e-5)
        moved += int(not torch.equal(tensor, load_initial()[name]))
    assert moved > 0, "no parameter changed: no step was taken"
    for key in ("loss", "logprobs", "samples", "squares"):
        assert r0[key] == r1[key], key
    assert r0["squares"] == one["squares"] == [x * x for x in range(6)]
    assert r0["samples"] == one["samples"]  # a request's tokens depend on its seed, not its batch
    assert r0["loss"] == pytest.approx(one["loss"], rel=1e-6)
    for a, b in zip(r0["logprobs"], one["logprobs"], strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    # The work was divided: each item once, each token forwarded once, each process sampled.
    assert sorted(r0["ran_here"] + r1["ran_here"]) == list(range(6)) and r0["ran_here"]
    forwarded = [r0["counts"]["forward_tokens"], r1["counts"]["forward_tokens"]]
    assert sum(forwarded) == one["counts"]["forward_tokens"] == one["tokens"] and min(forwarded) > 0
    sampled = [r0["counts"]["sampled_tokens"], r1["counts"]["sampled_tokens"]]
    assert sum(sampled) == one["counts"]["sampled_tokens"] and min(sampled) > 0


def test_a_process_with_no_datums_joins_the_step_and_all_match_one_process(tmp_path):
    """One datum, two processes: rank 0 forwards it, rank 1 nothing; the gradient sum adds exact
    zeros, so both processes take bitwise the step one process takes."""
    (p0, r0), (p1, r1) = run_two_processes(tmp_path, 1)
    (tmp_path / "one").mkdir()
    one_params, one = one_process(tmp_path / "one", 1)
    assert r1["counts"]["forward_tokens"] == 0 and r0["counts"]["forward_tokens"] == one["tokens"]
    for params in (p0, p1):
        assert params.keys() == one_params.keys()
        for name, tensor in params.items():
            assert torch.equal(tensor, one_params[name]), name
    assert r0["loss"] == r1["loss"] == one["loss"]


_INITIAL: dict = {}


def load_initial() -> dict:
    """The adapter before any step (B is zero, A is seeded), built once in this process."""
    if not _INITIAL:
        import rlkit

        trainer = rlkit.ServiceClient(device="cpu").create_lora_training_client(
            "rlkit-tiny", rank=4, seed=0
        )
        _INITIAL.update({n: p.detach().clone() for n, p in trainer._learner.params.items()})
    return _INITIAL


if __name__ == "__main__":  # one of run_two_processes's processes: RANK INIT_FILE OUT_DIR N
    worker(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
