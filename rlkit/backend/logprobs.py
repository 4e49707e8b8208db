"""Target-token logprobs off the logits, without a (rows, length, vocabulary) tensor to spare.

`log_softmax(logits).gather(targets)` writes the whole log-softmax, and its backward pass a
zero-filled tensor of the logits' shape plus the log-softmax's gradient: at a 49k vocabulary
those passes over memory were 15% of a training step (SmolLM2, profiled). Here the forward pass
keeps one logsumexp per position, and the backward pass writes the logits' gradient once,
`softmax * -g` with `g` added at each target, a row at a time (a row's positions fit in cache).
Padding positions past a row's length are skipped both ways (their gradient is zero).
"""

from __future__ import annotations

import torch


class _TargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, source, targets, lengths):
        # logits (B, T, V); row r reads batch row source[r], positions [0, lengths[r]).
        spans = _spans(source, lengths, logits.shape[0])
        lse = logits.new_zeros(logits.shape[:2], dtype=torch.float32)
        for b, n in enumerate(spans):
            if n:
                lse[b, :n] = torch.logsumexp(logits[b, :n].float(), dim=-1)
        positions = torch.arange(targets.shape[1], device=logits.device)
        if targets.dim() == 3:  # (R, T, K): K targets per position
            valid = (positions < lengths[:, None])[..., None]
            picked = logits[source[:, None, None], positions[None, :, None], targets].float()
            out = (picked - lse[source][..., None]) * valid
        else:
            picked = logits[source[:, None], positions, targets].float()
            out = (picked - lse[source]) * (positions < lengths[:, None])
        ctx.save_for_backward(logits, source, targets, lengths, lse)
        ctx.spans = spans
        return out

    @staticmethod
    def backward(ctx, g):
        logits, source, targets, lengths, lse = ctx.saved_tensors
        positions = torch.arange(targets.shape[1], device=logits.device)
        soft = targets.dim() == 3
        valid = positions < lengths[:, None]
        g = g.float() * (valid[..., None] if soft else valid)
        # Each batch row's positions get the sum of the gradients of the rows that read them.
        total = torch.zeros_like(lse).index_add_(0, source, g.sum(-1) if soft else g)
        grad = torch.empty_like(logits)
        direct = grad.dtype == torch.float32  # else each row in float32, then rounded
        for b, n in enumerate(ctx.spans):
            grad[b, n:] = 0
            if n:
                part = grad[b, :n] if direct else grad.new_empty(n, grad.shape[-1], dtype=lse.dtype)
                torch.sub(logits[b, :n], lse[b, :n, None], out=part)
                part.exp_().mul_(-total[b, :n, None])
                if not direct:
                    grad[b, :n] = part
        # Then + g at each row's targets (a scatter of (R, T) values, not of (R, T, V)).
        if soft:
            rows, positions = source[:, None, None], positions[None, :, None]
        else:
            rows = source[:, None]
        index = (rows.expand_as(targets), positions.expand_as(targets), targets)
        grad.index_put_(index, g.to(grad.dtype), accumulate=True)
        return grad, None, None, None


def _spans(source: torch.Tensor, lengths: torch.Tensor, batch: int) -> list[int]:
    """Per batch row: how many of its positions some row reads."""
    spans = [0] * batch
    for b, n in zip(source.tolist(), lengths.tolist(), strict=True):
        spans[b] = max(spans[b], n)
    return spans


def target_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, source=None
) -> torch.Tensor:
    """(R, T) logprobs of `targets` (R, T) under `logits` (B, T', V), float32: row r reads batch
    row `source[r]` (default: row r), positions [0, lengths[r]); later positions give 0.
    Targets (R, T, K), K per position, give (R, T, K)."""
    device = logits.device
    source = torch.arange(targets.shape[0]) if source is None else source
    source, targets, lengths = (t.to(device) for t in (source, targets, lengths))
    return _TargetLogprobs.apply(logits, source, targets, lengths)
