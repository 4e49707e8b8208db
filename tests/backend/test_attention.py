"""The grouped-query attention (rlkit.backend.attention): key/value heads read in place, with
the same bits as transformers' sdpa."""

import torch

from rlkit.backend import attention, models


def test_grouped_query_attention_reads_heads_in_place_with_the_same_bits():
    model = models.load_model("rlkit-tiny")
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped
    assert model.config._attn_implementation == attention.NAME
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # padding: transformers' sdpa copies the heads in this case
    mask[2, 5:] = 0
    ours = model(input_ids=ids, attention_mask=mask).logits
    model.set_attn_implementation("sdpa")
    theirs = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(ours, theirs)
