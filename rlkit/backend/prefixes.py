"""Rows that begin with the same tokens share one forward pass over them.

An RL step trains on several completions of each prompt, and every one of those rows repeats
the prompt (in pair_sum, 72 of a row's ~110 tokens). Here the shared beginning runs once per
cluster of rows, keeping its key/value cache; each row then runs only its own tokens, attending
to that cache. Autograd flows back through the cache into the shared pass, so every row's
logprobs and gradients are those of the whole row (up to float rounding): only the work shrinks.

The split is planned from the input tokens alone (targets and loss inputs may differ between
rows of a cluster: each row reads its own targets off the shared logits), and only where it
saves work; the learner's `share_prefix` switch turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlkit.backend.batching import TokenRow

# Share only when the planned passes run at most this fraction of the plain pass's padded
# tokens (two passes instead of one cost a little on their own).
WORTH_IT = 0.9


@dataclass(frozen=True)
class PrefixPlan:
    """Every row runs its first `length` tokens as part of its cluster's shared pass, and the
    rest after it; `members[c]` is a row of cluster c (its first `length` tokens are the
    cluster's). One length for all clusters keeps each row's tokens contiguous in the cache,
    as a full-row pass has them: sliding-window attention and absolute position embeddings
    see the same distances."""

    cluster: list[int]
    length: int
    members: list[int]

    def tokens_run(self, lengths: list[int]) -> int:
        """Tokens the two passes run for rows of these lengths, padding included."""
        return _tokens_run(len(self.members), self.length, lengths)


def _tokens_run(clusters: int, length: int, lengths: list[int]) -> int:
    return clusters * length + len(lengths) * (max(lengths) - length)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def plan(seqs: list[TokenRow]) -> PrefixPlan | None:
    """The cheapest split of `seqs` into clusters with a shared prefix, or None when sharing
    would not save work. Rows are sorted by their tokens, so rows with a common beginning are
    neighbours; a cluster is a run of neighbours whose common prefix is at least some length t,
    for the t (among the neighbours' common-prefix lengths) that leaves the fewest tokens to
    run: clusters x prefix, plus rows x longest remainder (padding included)."""
    lengths = [s.length for s in seqs]
    if len(seqs) < 2 or min(lengths) < 2:
        return None
    tokens = [s.tokens.tolist() for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: tokens[i])
    # Common prefix of each row with the one before it in sorted order.
    shared = [0] + [_common(tokens[a], tokens[b]) for a, b in zip(order, order[1:], strict=False)]
    # Every row keeps at least one token of its own (its first target is read off the shared
    # pass otherwise).
    longest_allowed = min(lengths) - 1
    best, best_cost = None, WORTH_IT * len(seqs) * max(lengths)
    for t in sorted(set(shared[1:]) - {0}):
        starts = [k for k in range(len(order)) if k == 0 or shared[k] < t]
        # The shared length: the least common prefix inside any cluster of two or more rows.
        length = min([longest_allowed, *(v for v in shared[1:] if v >= t)])
        cost = _tokens_run(len(starts), length, lengths)
        if length > 0 and cost < best_cost:
            best, best_cost = (starts, length), cost
    if best is None:
        return None
    starts, length = best
    cluster = [0] * len(seqs)
    for c, (start, end) in enumerate(zip(starts, [*starts[1:], len(order)], strict=True)):
        for k in range(start, end):
            cluster[order[k]] = c
    return PrefixPlan(cluster, length, [order[k] for k in starts])


def forward(model, seqs: list[TokenRow], plan: PrefixPlan, pad_id: int, device) -> tuple:
    """The rows' logits as two tensors: the clusters' prefixes (C, P, V) and each row's own
    tokens after them (R, S, V, right-padded; positions continue after the prefix)."""
    n = plan.length
    prefix_ids = torch.stack([seqs[row].tokens[:n] for row in plan.members])
    rest = [s.length - n for s in seqs]
    ids = torch.full((len(seqs), max(rest)), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n + max(rest)), dtype=torch.long)
    mask[:, :n] = 1
    for r, s in enumerate(seqs):
        ids[r, : rest[r]] = s.tokens[n:]
        mask[r, n : n + rest[r]] = 1
    positions = (n + torch.arange(max(rest)))[None, :].expand(len(seqs), -1)

    prefix_ids = prefix_ids.to(device)
    shared = model(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids), use_cache=True)
    cache = shared.past_key_values
    cache.batch_select_indices(torch.tensor(plan.cluster, device=device))  # an autograd gather
    own = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        past_key_values=cache,
        use_cache=True,
    )
    return shared.logits, own.logits


def row_logprobs(seqs, plan: PrefixPlan, logits: tuple, entropy: list | None) -> list:
    """Each row's logprobs of its own targets (and, into `entropy`, its per-position entropy),
    read off the shared prefix logits for its first tokens and off its own logits after."""
    shared, own = (x.float().log_softmax(-1) for x in logits)
    n = plan.length
    targets = torch.stack([s.targets[:n] for s in seqs]).to(shared.device)
    cluster = torch.tensor(plan.cluster, device=shared.device)
    positions = torch.arange(n, device=shared.device)
    first = shared[cluster[:, None], positions[None, :], targets]  # (R, P)
    # One gather over every row, then slices of the small (R, T) result: indexing each row of
    # the (R, T, V) tensor costs a zero-filled (R, T, V) gradient per row in the backward pass
    # (39% of a step at a 49k vocabulary, measured).
    after = torch.zeros(own.shape[:2], dtype=torch.long, device=own.device)
    for r, s in enumerate(seqs):
        after[r, : s.length - n] = s.targets[n:]
    own_lp = own.gather(-1, after[..., None])[..., 0]  # (R, T)
    out = [torch.cat([first[r], own_lp[r, : s.length - n]]) for r, s in enumerate(seqs)]
    if entropy is not None:
        h_shared, h_own = token_entropy(shared), token_entropy(own)
        for r, (s, c) in enumerate(zip(seqs, plan.cluster, strict=True)):
            entropy.append(torch.cat([h_shared[c], h_own[r, : s.length - n]]))
    return out


def token_entropy(logp: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the distributions whose log-probabilities are `logp` (..., V)."""
    return -(logp.exp() * logp).sum(-1)
