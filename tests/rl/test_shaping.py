"""Overlong completions (rlkit.rl.shaping's `overlong_penalty`, and the masking that
`overlong.mode=mask` asks of the datums): DAPO's soft penalty by hand, and truncated episodes kept
or masked out of the loss."""

import torch

from rlkit.api import types
from rlkit.rl.rollouts import Episode, Group, group_datums
from rlkit.rl.shaping import overlong_penalty


def test_truncated_episodes_can_be_masked_and_penalised():
    ep = Episode()
    ep.act(types.SampledSequence("length", [5, 6, 7], [-1.0, -1.0, -1.0]), tokenizer=_Bytes())
    assert ep.truncated
    group = Group(problem=None, prompt=[1, 2], episodes=[ep])
    (kept,) = group_datums(group, torch.tensor([1.0]))
    (masked,) = group_datums(group, torch.tensor([1.0]), mask_truncated=True)
    assert kept.loss_fn_inputs["weights"].to_torch().tolist() == [0, 1, 1, 1]
    assert masked.loss_fn_inputs["weights"].to_torch().tolist() == [0, 0, 0, 0]
    # DAPO's soft penalty: 0 until limit - buffer, then down to -1 at the limit
    assert [overlong_penalty(n, 40, 8) for n in (10, 32, 36, 40)] == [0.0, 0.0, -0.5, -1.0]


class _Bytes:
    def decode(self, tokens, skip_special_tokens=True):
        return bytes(tokens).decode("latin-1")
