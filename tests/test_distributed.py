"""The gradient sum across processes (issue 12's first part), on CPU with gloo: two real processes
joined by torch.distributed, each a training client on the tiny model.

Each process saves its adapter after one optim_step; the parent compares them with each other
and with a single process that trains on the whole batch.
"""

import os
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow  # starts two processes

WORLD = 2


def batch(tokenizer) -> list:
    from rlkit.api import types

    datums = []
    for i in range(4):
        tokens = tokenizer.encode(f"question {i} -> answer {i * 7}", add_special_tokens=False)
        datums.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
            )
        )
    return datums


def train_once(shares, out_file, checkpoint_dir) -> None:
    """One forward_backward on this process's share of the batch, one optim_step, then save."""
    import rlkit
    from rlkit.api import types

    service = rlkit.ServiceClient(device="cpu", checkpoint_dir=checkpoint_dir)
    trainer = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    data = batch(trainer.get_tokenizer())
    mine = [data[i] for i in shares]
    if mine:  # a process whose groups were all skipped sends nothing
        trainer.forward_backward(mine, "cross_entropy").result()
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    params = trainer._learner.params
    save_file({n: p.detach().clone().contiguous() for n, p in params.items()}, out_file)


def worker(rank, init_file, out_dir, shares_by_rank) -> None:
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
        train_once(shares_by_rank[rank], f"{out_dir}/rank{rank}.safetensors", f"{out_dir}/c{rank}")
    finally:
        dist.destroy_process_group()


def run_two_processes(tmp_path, shares_by_rank) -> list[dict]:
    os.environ.setdefault("RLKIT_CACHE_DIR", str(tmp_path / "cache"))  # children inherit it
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path), shares_by_rank), nprocs=WORLD)
    return [load_file(tmp_path / f"rank{r}.safetensors") for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same step in one process, on the whole batch."""
    tmp = tmp_path_factory.mktemp("one")
    torch.set_num_threads(1)
    train_once(range(4), tmp / "all.safetensors", tmp / "c")
    return load_file(tmp / "all.safetensors")


def test_a_process_with_no_datums_joins_the_step_and_all_match_one_process(tmp_path, one_process):
    """Rank 0 has the whole batch, rank 1 nothing: the sum adds exact zeros, so both processes
    take bitwise the step one process takes."""
    ranks = run_two_processes(tmp_path, [[0, 1, 2, 3], []])
    for params in ranks:
        assert params.keys() == one_process.keys()
        for name, tensor in params.items():
            assert torch.equal(tensor, one_process[name]), name


def test_a_split_batch_gives_every_process_the_same_step(tmp_path, one_process):
    """Each process has half the batch: the processes end bitwise equal to each other, and equal
    to one process up to the order of the sum (1e-6 relative on the gradients; Adam's first step
    is about lr * sign(gradient), so a parameter differs by at most 1e-5 here)."""
    rank0, rank1 = run_two_processes(tmp_path, [[0, 2], [1, 3]])
    moved = 0
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name
        torch.testing.assert_close(tensor, one_process[name], rtol=0, atol=1e-5)
        moved += int(not torch.equal(tensor, load_initial()[name]))
    assert moved > 0, "no parameter changed: no step was taken"


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
