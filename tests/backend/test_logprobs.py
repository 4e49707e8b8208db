"""The trainer's target-token logprobs (backend/logprobs.py) against log_softmax and gather:
values and gradients, rows reading shared batch rows, padding past each row's length."""

import pytest
import torch

from rlkit.backend.logprobs import target_logprobs


def reference(logits, targets, lengths, source):
    t = targets.shape[1]
    lp = logits.float().log_softmax(-1)[source[:, None], torch.arange(t), targets]
    return lp * (torch.arange(t) < lengths[:, None])


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_target_logprobs_and_their_gradients_equal_log_softmax_and_gather(dtype, atol):
    g = torch.Generator().manual_seed(0)
    batch, length, vocab = 3, 6, 50
    logits = (torch.randn(batch, length, vocab, generator=g) * 4).to(dtype)
    source = torch.tensor([0, 0, 1, 2, 2, 1])  # six rows read three batch rows
    lengths = torch.tensor([6, 3, 4, 0, 5, 2])
    targets = torch.randint(0, vocab, (6, length), generator=g)
    weights = torch.randn(6, length, generator=g)

    ours = logits.clone().requires_grad_()
    out = target_logprobs(ours, targets, lengths, source)
    (out * weights).sum().backward()
    theirs = logits.clone().requires_grad_()
    want = reference(theirs, targets, lengths, source)
    (want * weights).sum().backward()

    assert out.dtype == torch.float32 and out.shape == (6, length)
    torch.testing.assert_close(out, want, atol=atol, rtol=0)
    torch.testing.assert_close(ours.grad.float(), theirs.grad.float(), atol=atol, rtol=0)
    assert (out[3] == 0).all() and (out[1, 3:] == 0).all()  # past a row's length: 0
    assert (ours.grad[2, 5:] == 0).all() and (ours.grad[1, 4:] == 0).all()  # read by no row


def test_rows_default_to_their_own_batch_row():
    logits = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    lengths = torch.tensor([4, 2])
    torch.testing.assert_close(
        target_logprobs(logits, targets, lengths),
        reference(logits, targets, lengths, torch.arange(2)),
    )


def test_k_targets_per_position_give_each_its_logprob_and_gradient():
    """Targets (R, T, K), soft cross-entropy's: each of a position's K targets read off its
    log-softmax (duplicates too), the gradients of all of them summed."""
    g = torch.Generator().manual_seed(1)
    batch, length, vocab, k = 2, 5, 40, 3
    logits = torch.randn(batch, length, vocab, generator=g) * 4
    source = torch.tensor([0, 1, 1])
    lengths = torch.tensor([5, 2, 4])
    targets = torch.randint(0, vocab, (3, length, k), generator=g)
    targets[0, 0, 1] = targets[0, 0, 0]  # the same token twice at one position
    weights = torch.randn(3, length, k, generator=g)

    ours = logits.clone().requires_grad_()
    out = target_logprobs(ours, targets, lengths, source)
    (out * weights).sum().backward()
    theirs = logits.clone().requires_grad_()
    lp = theirs.log_softmax(-1)[source[:, None, None], torch.arange(length)[:, None], targets]
    want = lp * (torch.arange(length) < lengths[:, None])[..., None]
    (want * weights).sum().backward()

    assert out.shape == (3, length, k)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=0)
