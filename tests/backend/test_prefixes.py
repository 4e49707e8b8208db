"""Shared prefixes (rlkit.backend.prefixes): the planner's clusters and buckets, and the
trainer's logprobs, entropies and gradients with sharing on against the same rows run in full
(a sliding-window architecture included)."""

import random

import pytest
import torch

from rlkit.api import types
from rlkit.api.losses import get_loss
from rlkit.backend import models, prefixes
from rlkit.backend.batching import TokenRow, to_rows

ATOL = 2e-5  # float32 rounding of two differently shaped passes over the same rows


def row(tokens: list[int]) -> TokenRow:
    t = torch.tensor(tokens)
    return TokenRow(t, t, {})


def test_plan_clusters_the_completions_of_each_prompt():
    rng = random.Random(0)
    prompts = [[5] * 30 + [rng.randrange(10, 200) for _ in range(12)] for _ in range(4)]
    seqs, owner = [], []
    for p, prompt in enumerate(prompts):
        for _ in range(8):
            seqs.append(row(prompt + [rng.randrange(10, 200) for _ in range(rng.randrange(3, 20))]))
            owner.append(p)
    random.Random(1).shuffle(order := list(range(len(seqs))))
    seqs, owner = [seqs[i] for i in order], [owner[i] for i in order]
    plan = prefixes.plan(seqs)
    assert plan is not None
    # Rows of one prompt share a cluster; the shared length covers the shortest prompt and
    # leaves each row at least one token of its own.
    by_cluster = {}
    for r, c in enumerate(plan.cluster):
        by_cluster.setdefault(c, set()).add(owner[r])
        assert plan.length <= seqs[r].length - 1
        first = seqs[plan.members[c]].tokens[: plan.length]
        assert torch.equal(seqs[r].tokens[: plan.length], first)
    assert all(len(owners) == 1 for owners in by_cluster.values())
    assert plan.length >= 42
    lengths = [s.length for s in seqs]
    assert plan.tokens_run(lengths) < 0.5 * len(seqs) * max(lengths)


@pytest.mark.parametrize(
    "tokens",
    [
        [[1, 2, 3, 4]],  # one row
        [[1, 2, 3], [4, 5, 6], [7, 8, 9]],  # nothing in common
        [[1, 2, 3, 4, 5], [1, 9]],  # a short row: little to save
        [[1], [1]],  # rows of one token keep nothing to run after a prefix
    ],
)
def test_plan_declines_when_sharing_saves_nothing(tokens):
    assert prefixes.plan([row(t) for t in tokens]) is None


def test_buckets_group_rows_of_similar_lengths_when_that_saves_work():
    assert prefixes.buckets([40, 5, 40, 5, 5, 40, 5, 5]) == [[0, 2, 5], [1, 3, 4, 6, 7]]
    # Padding 3 rows by a token each costs less than a pass of their own.
    assert prefixes.buckets([10, 9, 10, 9]) == [[0, 1, 2, 3]]
    rng = random.Random(0)
    lengths = [rng.randrange(1, 60) for _ in range(50)]
    plan = prefixes.buckets(lengths)
    run = sum(len(b) * max(lengths[r] for r in b) + prefixes.PASS_COST for b in plan)
    assert run < len(lengths) * max(lengths) + prefixes.PASS_COST
    assert sorted(r for b in plan for r in b) == list(range(50))
    # Thousands of rows of thousands of lengths: runs end at no more than MAX_CUTS candidates.
    lengths = [rng.randrange(1, 4000) for _ in range(5000)]
    plan = prefixes.buckets(lengths)
    assert sorted(r for b in plan for r in b) == list(range(5000))
    assert 1 < len(plan) <= prefixes.MAX_CUTS


def rl_batch(seed: int = 0, long_rows: int = 0) -> list[types.Datum]:
    """Two prompts of different lengths x 3 completions, a lone row, and a row whose targets
    inside the shared prompt differ from its neighbours' (the API allows any targets); plus
    `long_rows` completions of 70-80 tokens (the short ones then run in passes of their own)."""
    g = random.Random(seed)
    system = [g.randrange(3, 250) for _ in range(20)]
    prompts = [system + [g.randrange(3, 250) for _ in range(n)] for n in (6, 9)]
    rows = [
        p + [g.randrange(3, 250) for _ in range(g.randrange(2, 12))]
        for p in prompts
        for _ in range(3)
    ]
    rows += [prompts[1] + [g.randrange(3, 250) for _ in range(g.randrange(70, 80))]] * long_rows
    rows.append([g.randrange(3, 250) for _ in range(40)])  # longer than the shared prefix
    data = []
    for k, tokens in enumerate(rows):
        n = len(tokens) - 1
        targets = tokens[1:]
        if k == 1:
            targets = [(t + 7) % 250 + 3 for t in targets]
        data.append(
            types.Datum(
                types.ModelInput.from_ints(tokens[:-1]),
                {
                    "target_tokens": targets,
                    "logprobs": [-3.0] * n,
                    "advantages": [g.uniform(-1, 1)] * n,
                    "weights": [0.0] * 10 + [1.0] * (n - 10),
                },
            )
        )
    return data


def run(trainer, data, share: bool, config=None):
    learner = trainer._learner
    learner.share_prefix = share
    out = trainer.forward_backward(data, "importance_sampling", config).result()
    grads = {k: p.grad.clone() for k, p in learner.params.items() if p.grad is not None}
    learner.optimizer.zero_grad(set_to_none=True)
    learner.pending_datums = 0
    return out, grads


@pytest.mark.parametrize(
    "config, long_rows",
    [(None, 0), ({"entropy_coef": 0.1}, 0), (None, 3), ({"entropy_coef": 0.1}, 3)],
)
def test_shared_prefix_gives_the_full_rows_logprobs_and_gradients(trainer, config, long_rows):
    data = rl_batch(long_rows=long_rows)
    # A trained adapter (B != 0), so the adapter's path through the shared pass counts.
    trainer.forward_backward(data, "importance_sampling").result()
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    learner = trainer._learner
    rows = to_rows(data, get_loss("importance_sampling"), "x", learner.vocab_size)
    plan = prefixes.plan(rows)
    assert plan is not None and plan.length >= 20  # the rows share the system prompt
    # Every row runs its own tokens once; long rows do not pad the short ones.
    assert sorted(r for bucket in plan.buckets for r in bucket) == list(range(len(rows)))
    long = {r for r, s in enumerate(rows) if s.length > 90}
    assert len(long) == long_rows and (not long or long in map(set, plan.buckets))

    full, full_grads = run(trainer, data, share=False, config=config)
    shared, shared_grads = run(trainer, data, share=True, config=config)
    for a, b in zip(full.loss_fn_outputs, shared.loss_fn_outputs, strict=True):
        for key in ("logprobs", "elementwise_loss"):
            torch.testing.assert_close(b[key].to_torch(), a[key].to_torch(), atol=ATOL, rtol=0)
    assert full_grads.keys() == shared_grads.keys() and full_grads
    for k, g in full_grads.items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(shared_grads[k], g, atol=ATOL, rtol=1e-4)


def test_reference_logprobs_share_prefixes_too(trainer):
    data = rl_batch(1)
    learner = trainer._learner
    learner.share_prefix = False
    full = [t.to_torch() for t in learner.reference_logprobs(data)]
    learner.share_prefix = True
    shared = [t.to_torch() for t in learner.reference_logprobs(data)]
    for a, b in zip(full, shared, strict=True):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


def test_sliding_window_and_other_architectures_share_exactly(tmp_path):
    """A sliding window counts distances in cache positions: every row's tokens stay
    contiguous after the shared prefix, so a window shorter than the rows sees what the full
    row would (a Mistral-style model with a 16-token window, rows of 14-34 tokens)."""
    from transformers import AutoModelForCausalLM, MistralConfig

    import rlkit

    tokenizer = models.load_tokenizer("rlkit-tiny")
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    service = rlkit.ServiceClient(device="cpu", dtype="float32")
    trainer = service.create_lora_training_client(str(tmp_path / "m"), rank=8, seed=0)
    data = rl_batch()
    rows = to_rows(data, get_loss("importance_sampling"), "x", trainer._learner.vocab_size)
    assert prefixes.plan(rows).length > config.sliding_window  # the window matters
    trainer.forward_backward(data, "importance_sampling").result()
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    full, full_grads = run(trainer, data, share=False)
    shared, shared_grads = run(trainer, data, share=True)
    for a, b in zip(full.loss_fn_outputs, shared.loss_fn_outputs, strict=True):
        torch.testing.assert_close(
            b["logprobs"].to_torch(), a["logprobs"].to_torch(), atol=ATOL, rtol=0
        )
    for k, g in full_grads.items():
        torch.testing.assert_close(shared_grads[k], g, atol=ATOL, rtol=1e-4)
