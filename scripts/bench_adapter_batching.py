"""Does batching a sweep's arms into one pass (per-row adapters) pay on this machine?

The adapters launcher runs K arms' calls one after another on one base model, or, with
`hydra.launcher.batch=true`, as one pass over all arms' rows, each row through its own arm's
adapter. This script times the ways, side by side, on pair_sum's shapes (16 prompts x 8
completions per arm, 25 prompt tokens, 20-39 completion tokens, rlkit-small with LoRA rank 64):

- train: K arms' training passes (prefix sharing, logprobs, backward), one per arm with its
  adapter active, vs one pass over the K arms' rows with per-row adapters;
- decode: K arms' decode steps with the hf engine's merged sampling copies (one per arm: the
  adapter merged into the weights), vs one decode over all rows on the unmerged model with
  per-row adapters (merged weights cannot differ per row).

Per-row adapters two ways: rlkit's (`adapters.per_row`: each arm's rows one slice, the base
weights once for all rows; what the launcher uses) and peft's mixed batches (`adapter_names=`,
one name per row: a gather and a scatter per adapter and layer). It prints the medians and the
ratios (together / one after another; below 1: batching wins), and a bound: the same one batch
with every row through one arm's weights (the train pass with one adapter active, the decode on
one merged copy), what per-row adapters would cost if choosing each row's adapter were free.

    python scripts/bench_adapter_batching.py [--arms 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from rlkit.api.adapter import AdapterSpec
from rlkit.backend import adapters, models, prefixes
from rlkit.backend.batching import TokenRow, pad
from rlkit.backend.engines.hf import SamplingModel

MODEL = "rlkit-small"


def arm_rows(seed: int) -> list[TokenRow]:
    """One arm's training batch: 16 prompts x 8 completions (random bytes, pair_sum's sizes)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(16):
        prompt = torch.randint(3, 250, (25,), generator=g)
        for _ in range(8):
            n = int(torch.randint(20, 40, (1,), generator=g))
            tokens = torch.cat([prompt, torch.randint(3, 250, (n,), generator=g)])
            rows.append(TokenRow(tokens[:-1], tokens[1:], {}))
    return rows


def train_pass(model, seqs: list[TokenRow], pad_id: int, names: list[str] | None, peft_rows=False):
    """prefixes.forward's two passes (shared prompts, then each row's own tokens), with each
    row's adapter named in `names` (None: the active adapter), then backward: per-row adapters
    by rlkit's slices (`adapters.per_row`), or by peft's mixed batches (`peft_rows`)."""
    if names is None or not peft_rows:
        plan = prefixes.plan(seqs, names)
        logits = prefixes.forward(model, seqs, plan, pad_id, "cpu", names)
        logprobs = prefixes.row_logprobs(seqs, plan, logits, None)
        torch.stack([lp.sum() for lp in logprobs]).sum().backward()
        return
    plan = prefixes.plan(seqs)
    n = plan.length
    ids = torch.stack([seqs[r].tokens[:n] for r in plan.members])
    shared = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        use_cache=True,
        adapter_names=[names[r] for r in plan.members],
    )
    own = []
    for bucket in plan.buckets:
        tokens, _, own_mask = pad(prefixes._after(seqs, bucket, n), pad_id)
        mask = torch.cat([torch.ones((len(bucket), n), dtype=torch.long), own_mask], dim=1)
        positions = (n + torch.arange(tokens.shape[1]))[None, :].expand(len(bucket), -1)
        cache = prefixes._select(shared.past_key_values, [plan.cluster[r] for r in bucket], "cpu")
        out = model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            adapter_names=[names[r] for r in bucket],
        )
        own.append(out.logits)
    logprobs = prefixes.row_logprobs(seqs, plan, (shared.logits, own), None)
    torch.stack([lp.sum() for lp in logprobs]).sum().backward()


@torch.no_grad()
def decode(model, rows: int, steps: int, names: list[str] | None) -> None:
    """`steps` decode steps of `rows` rows after a 25-token prompt, with a KV cache."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (rows, 25), generator=g)
    extra = {} if names is None else {"adapter_names": names}
    out = model(input_ids=ids, use_cache=True, **extra)
    mask = torch.ones_like(ids)
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
        out = model(
            input_ids=token,
            attention_mask=mask,
            past_key_values=out.past_key_values,
            use_cache=True,
            **extra,
        )


def median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    k = args.arms
    names = ["default", *(f"arm_{i}" for i in range(1, k))]
    model = adapters.attach(models.load_model(MODEL), AdapterSpec(rank=64, seed=0))
    for i in range(1, k):
        adapters.add(model, AdapterSpec(rank=64, seed=i), names[i])
    pad_id = models.load_tokenizer(MODEL).pad_token_id
    batches = [arm_rows(i) for i in range(k)]
    rows = [r for b in batches for r in b]
    row_names = [names[i] for i, b in enumerate(batches) for _ in b]

    def train_apart():
        model.train()
        for name, batch in zip(names, batches, strict=True):
            model.set_adapter(name)
            train_pass(model, batch, pad_id, None)

    def train_bound():
        model.train()
        model.set_adapter(names[0])
        train_pass(model, rows, pad_id, None)

    def train_together(peft_rows=False):
        model.train()
        if peft_rows:
            model.eval()  # peft takes per-row adapters in eval mode only (no dropout here anyway)
            for name, p in model.named_parameters():
                p.requires_grad_(".lora_" in name)  # every arm's adapter trains
        train_pass(model, rows, pad_id, row_names, peft_rows)

    samplers = []
    for name in names:
        model.set_adapter(name)
        samplers.append(SamplingModel(model, merge=True).model)
    unmerged = copy.deepcopy(model).eval()
    per_arm = len(batches[0])
    decode_names = [name for name in names for _ in range(per_arm)]

    def decode_apart():
        for sampler in samplers:
            decode(sampler, per_arm, 31, None)

    def decode_together(peft_rows=False):
        if peft_rows:
            decode(unmerged, per_arm * k, 31, decode_names)
            return
        with adapters.per_row(unmerged, decode_names):
            decode(unmerged, per_arm * k, 31, None)

    def decode_bound():
        decode(samplers[0], per_arm * k, 31, None)

    print(f"{k} arms, {per_arm} rows each, {MODEL} + LoRA r64, {torch.get_num_threads()} threads")
    for label, apart, together, bound in [
        ("train pass", train_apart, train_together, train_bound),
        ("decode, 31 tokens", decode_apart, decode_together, decode_bound),
    ]:
        a, b, p, c = (
            median_s(fn, args.repeats)
            for fn in (apart, together, lambda f=together: f(peft_rows=True), bound)
        )
        print(
            f"{label}: one arm after another {a:.3f} s | one batch, rlkit's per-row adapters "
            f"{b:.3f} s (ratio {b / a:.2f}) | peft's per-row adapters {p:.3f} s (ratio "
            f"{p / a:.2f}) | all rows through one arm's weights {c:.3f} s (ratio {c / a:.2f}: "
            "the most batching could save)"
        )


if __name__ == "__main__":
    main()
