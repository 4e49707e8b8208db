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

# Share only when the planned forward passes cover at most this fraction of the padded tokens
# of the plain one (two passes instead of one cost a little on their own).
WORTH_IT = 0.9


@dataclass(frozen=True)
class PrefixPlan:
    """Row r runs tokens[prefix[cluster[r]]:] after its cluster's shared prefix; `members[c]`
    is a row of cluster c (its first prefix[c] tokens are the cluster's)."""

    cluster: list[int]
    prefix: list[int]
    members: list[int]


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _padded_tokens(lengths: list[int], cluster: list[int], prefix: list[int]) -> int:
    """Tokens the two passes run, padding included: clusters x longest prefix, plus rows x
    longest remainder."""
    rest = max(n - prefix[c] for n, c in zip(lengths, cluster, strict=True))
    return len(prefix) * max(prefix) + len(lengths) * rest


def plan(seqs: list[TokenRow]) -> PrefixPlan | None:
    """The cheapest split of `seqs` into clusters with a shared prefix, or None when sharing
    would not save work. Rows are sorted by their tokens, so rows with a common beginning are
    neighbours; a cluster is a run of neighbours whose common prefix is at least some length t,
    for the t (among the neighbours' common-prefix lengths) that leaves the fewest tokens."""
    lengths = [s.length for s in seqs]
    if len(seqs) < 2 or min(lengths) < 2:
        return None
    tokens = [s.tokens.tolist() for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: tokens[i])
    # Common prefix of each row with the one before it in sorted order, leaving every row at
    # least one token of its own (its first target is read off the shared pass otherwise).
    shared = [0] + [
        min(_common(tokens[a], tokens[b]), lengths[a] - 1, lengths[b] - 1)
        for a, b in zip(order, order[1:], strict=False)
    ]
    best, best_cost = None, WORTH_IT * len(seqs) * max(lengths)
    for t in sorted(set(shared[1:]) - {0}):
        runs: list[list[int]] = []  # positions in `order`
        for k in range(len(order)):
            if k == 0 or shared[k] < t:
                runs.append([k])
            else:
                runs[-1].append(k)
        # A run's common prefix is the least of its neighbours' (a lone row: its first token).
        prefix = [min((shared[k] for k in run[1:]), default=1) for run in runs]
        cluster = [0] * len(seqs)
        for c, run in enumerate(runs):
            for k in run:
                cluster[order[k]] = c
        cost = _padded_tokens(lengths, cluster, prefix)
        if cost < best_cost:
            members = [order[run[0]] for run in runs]
            best, best_cost = PrefixPlan(cluster, prefix, members), cost
    return best


def forward(model, seqs: list[TokenRow], plan: PrefixPlan, pad_id: int, device) -> tuple:
    """The rows' logits as two tensors: the clusters' prefixes (C, P, V) and each row's own
    tokens (R, S, V). Both passes are right-padded; the rows' positions continue after their
    cluster's prefix, and the padding between a prefix and a row's tokens is masked out."""
    width = max(plan.prefix)
    prefix_ids = torch.full((len(plan.prefix), width), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros((len(plan.prefix), width), dtype=torch.long)
    for c, (row, n) in enumerate(zip(plan.members, plan.prefix, strict=True)):
        prefix_ids[c, :n] = seqs[row].tokens[:n]
        prefix_mask[c, :n] = 1
    rest = [s.length - plan.prefix[c] for s, c in zip(seqs, plan.cluster, strict=True)]
    ids = torch.full((len(seqs), max(rest)), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), max(rest)), dtype=torch.long)
    for r, (s, c) in enumerate(zip(seqs, plan.cluster, strict=True)):
        ids[r, : rest[r]] = s.tokens[plan.prefix[c] :]
        mask[r, : rest[r]] = 1
    start = torch.tensor([plan.prefix[c] for c in plan.cluster])
    positions = start[:, None] + torch.arange(max(rest))[None, :]
    cluster = torch.tensor(plan.cluster)

    prefix_ids, prefix_mask = prefix_ids.to(device), prefix_mask.to(device)
    shared = model(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True)
    cache = shared.past_key_values
    cache.batch_select_indices(cluster.to(device))  # each row's copy (an autograd gather)
    own = model(
        input_ids=ids.to(device),
        attention_mask=torch.cat([prefix_mask[cluster.to(device)], mask.to(device)], dim=-1),
        position_ids=positions.to(device),
        past_key_values=cache,
        use_cache=True,
    )
    return shared.logits, own.logits


def row_logprobs(seqs, plan: PrefixPlan, logits: tuple, entropy: list | None) -> list:
    """Each row's logprobs of its own targets (and, into `entropy`, its per-position entropy),
    read off the shared prefix logits for its first tokens and off its own logits after."""
    shared, own = (x.float().log_softmax(-1) for x in logits)
    width = shared.shape[1]
    targets = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (s, c) in enumerate(zip(seqs, plan.cluster, strict=True)):
        targets[r, : plan.prefix[c]] = s.targets[: plan.prefix[c]]
    cluster = torch.tensor(plan.cluster, device=shared.device)
    positions = torch.arange(width, device=shared.device)
    first = shared[cluster[:, None], positions[None, :], targets.to(shared.device)]  # (R, P)
    out = []
    for r, (s, c) in enumerate(zip(seqs, plan.cluster, strict=True)):
        n = plan.prefix[c]
        after = s.targets[n:].to(own.device)
        out.append(
            torch.cat([first[r, :n], own[r, : s.length - n].gather(-1, after[:, None])[:, 0]])
        )
    if entropy is not None:
        h_shared = -(shared.exp() * shared).sum(-1)
        h_own = -(own.exp() * own).sum(-1)
        for r, (s, c) in enumerate(zip(seqs, plan.cluster, strict=True)):
            n = plan.prefix[c]
            entropy.append(torch.cat([h_shared[c, :n], h_own[r, : s.length - n]]))
    return out
