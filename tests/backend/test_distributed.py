"""Data parallelism (rlkit.backend.distributed) within one process: the cut of a call's items into
one contiguous block per process, and, without a launcher, no process group and every collective
a local no-op. Processes joined for real are tested end to end in tests/e2e/test_data_parallel.py
and tests/e2e/test_data_parallel_client.py."""

import random

import torch

from rlkit.backend import distributed
from rlkit.backend.distributed import Processes


def blocks(costs, world):
    """Every rank's block `[start, stop)` of items with these costs."""
    return [Processes(rank=rank, world_size=world).split(costs) for rank in range(world)]


def test_split_cuts_contiguous_blocks_in_rank_order_balanced_by_cost():
    assert blocks([1.0] * 6, 2) == [(0, 3), (3, 6)]  # equal costs: equal counts
    assert blocks([1.0] * 7, 3) == [(0, 2), (2, 5), (5, 7)]
    assert blocks([10.0] + [1.0] * 10, 2) == [(0, 1), (1, 11)]  # a costly item: a block alone
    assert blocks([1.0] * 3, 1) == [(0, 3)]
    rng = random.Random(0)
    for _ in range(500):
        world = rng.randint(1, 5)
        costs = [rng.uniform(0.1, 10.0) for _ in range(rng.randint(0, 12))]
        cut = blocks(costs, world)
        # Every item in exactly one block, the blocks in rank order ...
        assert cut[0][0] == 0 and cut[-1][1] == len(costs)
        assert all(a[0] <= a[1] == b[0] for a, b in zip(cut, cut[1:], strict=False))
        # ... each cut within half an item's cost of where k/N of the total cost lies.
        for k, (start, _) in enumerate(cut[1:], start=1):
            before = sum(costs[:start])
            assert abs(before - sum(costs) * k / world) <= max(costs, default=0) / 2 + 1e-9, (
                costs,
                cut,
            )


def test_one_process_runs_every_item_itself_and_its_collectives_are_local():
    one = Processes()
    assert one.is_main and one.backend is None
    assert one.map_items(lambda x: x * x, [1, 2, 3], "squares") == [1, 4, 9]
    assert one.all_gather("mine") == ["mine"] and one.concat([1, 2]) == [1, 2]
    assert one.broadcast(7) == 7 and one.sum(2.5) == 2.5 and one.any(False) is False
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.tensor([1.0, -2.0, 3.0])
    one.sum_gradients([param])
    assert torch.equal(param.grad, torch.tensor([1.0, -2.0, 3.0]))


def test_without_a_launcher_a_process_joins_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched()
    # (An in-process vLLM engine of an earlier test may have set up its own one-process group.)
    had_group = torch.distributed.is_initialized()
    assert distributed.join(timeout_s=5) == Processes()  # rank 0 of 1
    assert torch.distributed.is_initialized() == had_group  # join set none up
    assert distributed.launcher_info() == {"world_size": 1}
    assert distributed.device("cpu") == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "2")  # what a launcher sets for each of its processes
    assert distributed.launched()
