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

import copy as _copy
from dataclasses import dataclass

import torch

from rlkit.backend.adapters import per_row as per_row_adapters
from rlkit.backend.batching import TokenRow, pad
from rlkit.backend.logprobs import target_logprobs

# Share only when the planned passes run at most this fraction of the plain pass's padded
# tokens (two passes instead of one cost a little on their own).
WORTH_IT = 0.9
# A pass over rows' own tokens costs about this many tokens' work on its own (the cache gather,
# per-layer calls); a bucket of shorter rows gets its own pass when that saves more padding.
PASS_COST = 32
MAX_CUTS = 256


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
    # The rows' own tokens run in one pass per bucket of rows of similar lengths (each padded to
    # its longest row, not to the longest of all).
    buckets: list[list[int]]

    def tokens_run(self, lengths: list[int]) -> int:
        """Tokens the passes run for rows of these lengths, padding included."""
        own = sum(len(b) * max(lengths[r] - self.length for r in b) for b in self.buckets)
        return len(self.members) * self.length + own


def _tokens_run(clusters: int, length: int, lengths: list[int]) -> int:
    return clusters * length + len(lengths) * (max(lengths) - length)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def plan(seqs: list[TokenRow], owners: list | None = None) -> PrefixPlan | None:
    """The cheapest split of `seqs` into clusters with a shared prefix, or None when sharing
    would not save work. Rows are sorted by their tokens, so rows with a common beginning are
    neighbours; a cluster is a run of neighbours whose common prefix is at least some length t,
    for the t (among the neighbours' common-prefix lengths) that leaves the fewest tokens to
    run: clusters x prefix, plus rows x longest remainder (padding included).

    `owners` (one per row, in non-decreasing order: rows of several adapters in one pass, see
    `forward`): rows of different owners never share a cluster, and every pass lists its rows
    owner by owner."""
    lengths = [s.length for s in seqs]
    if len(seqs) < 2 or min(lengths) < 2:
        return None
    tokens = [s.tokens.tolist() for s in seqs]
    owners = owners or [0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: (owners[i], tokens[i]))
    # Common prefix of each row with the one before it in sorted order (none across owners).
    shared = [0] + [
        _common(tokens[a], tokens[b]) if owners[a] == owners[b] else 0
        for a, b in zip(order, order[1:], strict=False)
    ]
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
    rest = [n - length for n in lengths]
    return PrefixPlan(cluster, length, [order[k] for k in starts], buckets(rest))


def buckets(lengths: list[int]) -> list[list[int]]:
    """Rows grouped into passes of similar lengths: the grouping of the rows sorted longest
    first into consecutive runs with the fewest tokens run (each run padded to its longest row,
    plus PASS_COST per run). Each bucket lists its rows in order."""
    order = sorted(range(len(lengths)), key=lambda r: (-lengths[r], r))
    n = len(order)
    # Runs end only where the length changes (splitting rows of one length saves nothing);
    # at most MAX_CUTS candidate ends keep the search small for thousands of rows.
    ends = [k for k in range(1, n) if lengths[order[k]] != lengths[order[k - 1]]] + [n]
    ends = ends[:: -(-len(ends) // MAX_CUTS)] if len(ends) > MAX_CUTS else ends
    if ends[-1] != n:
        ends.append(n)
    starts = [0, *ends[:-1]]
    cost = {n: 0}
    cut: dict[int, int] = {}
    for k in reversed(starts):  # cost[k]: the best for order[k:]
        cost[k], cut[k] = min(
            ((j - k) * lengths[order[k]] + PASS_COST + cost[j], j) for j in ends if j > k
        )
    out, k = [], 0
    while k < n:
        out.append(sorted(order[k : cut[k]]))
        k = cut[k]
    return out


def forward(
    model, seqs: list[TokenRow], plan: PrefixPlan, pad_id: int, device, adapters=None
) -> tuple:
    """The clusters' prefix logits (C, P, V), and per bucket of `plan.buckets` its rows' own
    tokens' logits after the prefix (rows, S, V, right-padded; positions continue after it).
    `adapters`: each row's adapter (the plan's owners; see rlkit.backend.adapters.per_row)."""

    def per_row(rows):
        return per_row_adapters(model, None if adapters is None else [adapters[r] for r in rows])

    n = plan.length
    prefix_ids = torch.stack([seqs[row].tokens[:n] for row in plan.members]).to(device)
    with per_row(plan.members):
        shared = model(
            input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids), use_cache=True
        )
    own = []
    for bucket in plan.buckets:
        ids, _, own_mask = pad(_after(seqs, bucket, n), pad_id)
        mask = torch.cat([torch.ones((len(bucket), n), dtype=torch.long), own_mask], dim=1)
        positions = (n + torch.arange(ids.shape[1]))[None, :].expand(len(bucket), -1)
        cache = _select(shared.past_key_values, [plan.cluster[r] for r in bucket], device)
        with per_row(bucket):
            out = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                past_key_values=cache,
                use_cache=True,
            )
        own.append(out.logits)
    return shared.logits, own


def _after(seqs: list[TokenRow], rows: list[int], n: int) -> list[TokenRow]:
    """The tokens and targets of `rows` after their first n (the shared prefix)."""
    return [TokenRow(seqs[r].tokens[n:], seqs[r].targets[n:], {}) for r in rows]


def _select(cache, rows: list[int], device):
    """A copy of the prefix cache holding `rows` of it, in that order (an autograd gather); the
    shared cache itself is left as it is for the next bucket."""
    copy = _copy.copy(cache)
    copy.layers = [_copy.copy(layer) for layer in cache.layers]
    copy.batch_select_indices(torch.tensor(rows, device=device))
    return copy


def row_logprobs(seqs, plan: PrefixPlan, logits: tuple, entropy: list | None) -> list:
    """Each row's logprobs of its own targets (and, into `entropy`, its per-position entropy),
    read off the shared prefix logits for its first tokens and off its own logits after."""
    shared, own = logits
    n = plan.length
    first = target_logprobs(
        shared,
        torch.stack([s.targets[:n] for s in seqs]),
        torch.full((len(seqs),), n),
        source=torch.tensor(plan.cluster),
    )  # (R, n)
    after: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
    h_after: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
    for bucket, x in zip(plan.buckets, own, strict=True):
        rest = torch.tensor([seqs[r].length - n for r in bucket])
        _, targets, _ = pad(_after(seqs, bucket, n), pad_id=0)
        lp = target_logprobs(x, targets, rest)
        h = token_entropy(x.float().log_softmax(-1)) if entropy is not None else None
        for i, r in enumerate(bucket):
            after[r] = lp[i, : rest[i]]
            if h is not None:
                h_after[r] = h[i, : rest[i]]
    if entropy is not None:
        h_shared = token_entropy(shared.float().log_softmax(-1))
        for r, c in enumerate(plan.cluster):
            entropy.append(torch.cat([h_shared[c], h_after[r]]))
    return [torch.cat([first[r], after[r]]) for r in range(len(seqs))]


def token_entropy(logp: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the distributions whose log-probabilities are `logp` (..., V)."""
    return -(logp.exp() * logp).sum(-1)
