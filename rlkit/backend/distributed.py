"""Data parallelism across processes, the part that lives in the machine half: the adapter's
gradients summed over every process of a torch.distributed group before the optimizer step, so
that every process takes the identical step.

Processes are started by a launcher (`accelerate launch`, torchrun) and joined by
torch.distributed; rlkit starts none itself. In one process (no group), nothing here does
anything, so a single-process run computes exactly what it always did.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_count(n: int) -> int:
    """`n` summed over the processes (each process passes its own)."""
    if world_size() == 1:
        return n
    total = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(total)
    return int(total)


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Every parameter's gradient becomes, in place, its sum over the processes; a process with
    no gradient (all its groups skipped) contributes zeros. One flat all-reduce per step: one
    message, and the same summation order every time."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        param.grad = flat[offset : offset + grad.numel()].view_as(grad)
        offset += grad.numel()
