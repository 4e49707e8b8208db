"""Rollout engine on the transformers model itself: a batched decode loop with a KV cache.

Sampling runs on a copy of the adapted model whose adapter is merged into its weights: as fast
as the bare base model (a peft adapter on every layer costs several times that on small
models), and the training model is never touched. The copy doubles the model's memory; the
vLLM engine is the choice for models where that matters.

A quantized base (QLoRA, QDoRA) is the exception: merging an adapter into 4-bit or 8-bit
weights rounds it away, and the sampler would serve another policy than the one trained. There
the copy shares the training model's frozen (quantized) weights, holds its own adapter tensors
and keeps them unmerged: the forward pass is the trainer's own, at the cost of the adapter's
extra matmuls in every layer. An unmerged DoRA layer's per-channel scale, magnitude over the
norm of the (dequantized) weight plus the update, is computed once per snapshot instead of at
every decoded token (peft recomputes it at each forward pass; the trainer needs that, the
frozen sampler does not). Same functions, same inputs: the same bits.

Logprobs are the model's raw log-probabilities of each sampled token (temperature 1, before
top-k/top-p), the same quantity the trainer computes, so the two can be compared directly.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import warnings
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.dora import DoraLinearLayer
from peft.utils.integrations import dequantize_module_weight

from rlkit.api.types import SampledSequence, SamplingParams
from rlkit.backend import adapters, models
from rlkit.backend.adapters import per_row as per_row_adapters
from rlkit.backend.engines.base import Request, repeat_greedy, stop_criteria


class SamplingModel:
    """A frozen copy of a peft model that serves one adapter snapshot at a time, merged into
    its weights, or (`merge=False`) unmerged on the training model's own frozen weights.

    Merged, one copy serves every learner on a base model (`shared`): each snapshot names its
    adapter, and loading one re-merges from the pristine base weights, so which learner loaded
    last changes nothing in what the next one gets. K clients on one base hold one copy."""

    def __init__(self, peft_model, merge: bool = True) -> None:
        self.merge = merge
        self._source = peft_model
        # Unmerged, the frozen weights are never written: share them (deepcopy's memo maps each
        # to itself) and copy only the adapter.
        shared = {} if merge else {id(p): p for p in peft_model.parameters() if not p.requires_grad}
        self.model = copy.deepcopy(peft_model, shared).eval()
        self.model.requires_grad_(False)
        if merge:  # merging into a tied output layer would change the input embeddings too
            models.untie_embeddings(self.model.get_base_model())
        self._index()
        self._dora = [] if merge else _cache_dora_scales(self.model)
        self.loaded_key = None

    def _index(self) -> None:
        # The training model's base weights are frozen: the pristine source for every re-merge.
        self._originals = {
            name: m.get_base_layer().weight
            for name, m in self._source.named_modules()
            if isinstance(m, LoraLayer)
        }
        self._layers = {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLayer)}
        self._params = dict(self.model.named_parameters())

    @classmethod
    def shared(cls, learner) -> SamplingModel:
        """The merged copy of `learner`'s base model that every learner on it samples from,
        with `learner`'s adapter added to it if it has not been yet."""
        engines = learner.shared.engines
        if "hf" not in engines:
            engines["hf"] = cls(learner.model)
        sampler = engines["hf"]
        if learner.adapter_name not in sampler.model.peft_config:
            sampler._reset()  # peft adds adapters to unmerged layers only
            sampler.loaded_key = None
            adapters.add(sampler.model, learner.spec, learner.adapter_name)
            sampler.model.requires_grad_(False)
            sampler._index()
        return sampler

    def remove(self, adapter: str) -> None:
        """Drop a learner's adapter (it is gone from the training model)."""
        if self.loaded_key is not None and self.loaded_key[0] == adapter:
            self.loaded_key = None
        if adapter in self.model.peft_config and len(self.model.peft_config) > 1:
            self._reset()
            self.loaded_key = None
            with warnings.catch_warnings():  # `load` sets the adapter it serves
                warnings.filterwarnings("ignore", message=".*which is now deleted")
                self.model.delete_adapter(adapter)
            self._index()

    def _reset(self) -> None:
        for name, layer in self._layers.items():
            layer.get_base_layer().weight.copy_(self._originals[name])
            layer.merged_adapters = []

    @torch.no_grad()
    def load(self, key, snapshot: dict[str, torch.Tensor], adapter: str | None = None) -> None:
        """Serve `snapshot` (adapter tensors by parameter name, of `adapter`: by default the
        active one); a no-op if it already does."""
        if key == self.loaded_key:
            return
        self.loaded_key = None  # stays unset if anything below fails
        if self.merge:
            self._reset()
        if adapter is not None and self.model.active_adapter != adapter:
            self.model.set_adapter(adapter)
            self.model.requires_grad_(False)  # peft marks the active adapter trainable
        for layer in self._dora:
            layer.rlkit_scales.clear()
        for name, tensor in snapshot.items():
            self._params[name].copy_(tensor)
        if self.merge:
            for layer in self._layers.values():
                layer.merge()
        self.loaded_key = key


class RowsModel:
    """A frozen copy of a peft model with every learner's adapter on the base, unmerged, on the
    training model's own frozen weights (only the adapters are copied): each row of a batch
    decodes through its own learner's adapter (`adapters.per_row`), so the samples of several
    learners on one base run as one batch. Each adapter serves one snapshot at a time."""

    def __init__(self, peft_model) -> None:
        frozen = {id(p): p for n, p in peft_model.named_parameters() if ".lora_" not in n}
        self.model = copy.deepcopy(peft_model, frozen).eval()
        self._index()
        self.loaded: dict[str, object] = {}  # adapter -> the key of the snapshot it serves

    def _index(self) -> None:
        self.model.requires_grad_(False)
        self._params = dict(self.model.named_parameters())
        for p in self._params.values():
            p.grad = None

    @classmethod
    def shared(cls, learner) -> RowsModel:
        """The copy every learner on `learner`'s base samples from, with `learner`'s adapter."""
        engines = learner.shared.engines
        if "hf-rows" not in engines:
            engines["hf-rows"] = cls(learner.model)
        rows = engines["hf-rows"]
        if learner.adapter_name not in rows.model.peft_config:
            adapters.add(rows.model, learner.spec, learner.adapter_name)
            rows._index()
        return rows

    @torch.no_grad()
    def load(self, adapter: str, key, snapshot: dict[str, torch.Tensor]) -> None:
        if self.loaded.get(adapter) == key:
            return
        self.loaded.pop(adapter, None)  # stays unset if anything below fails
        for name, tensor in snapshot.items():
            self._params[name].copy_(tensor)
        self.loaded[adapter] = key

    def remove(self, adapter: str) -> None:
        self.loaded.pop(adapter, None)
        if adapter in self.model.peft_config and len(self.model.peft_config) > 1:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*which is now deleted")
                self.model.delete_adapter(adapter)
            self._index()


def _cache_dora_scales(model) -> list[DoraLinearLayer]:
    """Gives each DoRA layer of `model` (unmerged, frozen) a forward pass that computes its
    scale once per snapshot: `SamplingModel.load` clears `rlkit_scales`."""
    layers = [m for m in model.modules() if isinstance(m, DoraLinearLayer)]
    for layer in layers:
        layer.rlkit_scales = {}
        layer.forward = functools.partial(_dora_forward, layer)
    return layers


def _dora_forward(
    layer, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"
):
    """peft's DoraLinearLayer.forward in eval mode (where peft passes the base layer's output),
    with magnitude / ||W + scaling * B A|| cached per dtype."""
    if base_result is None:  # dropout in training mode: not the sampler's case
        return DoraLinearLayer.forward(
            layer,
            x,
            lora_A=lora_A,
            lora_B=lora_B,
            scaling=scaling,
            base_layer=base_layer,
            adapter_name=adapter_name,
        )
    scale = layer.rlkit_scales.get(x.dtype)
    if scale is None:
        lora_weight = layer.get_lora_weight(lora_A=lora_A, lora_B=lora_B, adapter_name=adapter_name)
        weight = dequantize_module_weight(base_layer).to(x.dtype)
        norm = layer.get_weight_norm(
            weight=weight,
            lora_weight=lora_weight.to(x.dtype).detach(),
            scaling=scaling,
            adapter_name=adapter_name,
        ).detach()
        scale = layer.rlkit_scales[x.dtype] = (layer.weight / norm).view(1, -1)
    if base_layer.bias is not None:
        base_result = base_result - base_layer.bias
    return (scale - 1) * base_result + scale * lora_B(lora_A(x)) * scaling


def _text(tokenizer, tokens) -> str:
    # Special tokens are not text: a stop string never matches inside `<|im_end|>`.
    return tokenizer.decode(tokens, skip_special_tokens=True)


def row_seed(seed: int, row: int) -> int:
    """The seed of completion `row` of a request seeded `seed`: its draws depend on these two
    alone, not on the other requests decoded in the same batch."""
    digest = hashlib.sha256(f"{seed}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class _Row:
    """One completion being decoded."""

    request: int
    params: SamplingParams
    max_tokens: int
    stop_ids: set[int]
    stop_strings: list[str]
    generator: torch.Generator | None  # None: greedy
    topk: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    stop_reason: str = ""

    def add(self, token: int, logprob: float, tokenizer) -> bool:
        """Append a token; True when the row is finished."""
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if token in self.stop_ids or (
            self.stop_strings and any(s in _text(tokenizer, self.tokens) for s in self.stop_strings)
        ):
            self.stop_reason = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.stop_reason = "length"
        return bool(self.stop_reason)


def _filtered(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), as transformers applies them; on the last
    dimension (one row of logits or a batch of them)."""
    x = logits / params.temperature
    if params.top_k != -1 and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1:
        ordered, order = torch.sort(x, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - params.top_p
        drop[..., -1] = False  # always keep the most likely token
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return x


def _draw(logits: torch.Tensor, logprobs: torch.Tensor, rows: list[_Row]) -> list[int]:
    """Each row's next token: a greedy row's argmax; any other row's one uniform number from its
    own generator, read through the inverse cumulative distribution of its filtered logits
    (exactly a draw from it). One draw per token keeps a row's tokens independent of its batch,
    and rows with the same settings share their filters' and softmax's passes."""
    chosen = logits.argmax(-1).tolist()
    settings: dict[tuple, list[int]] = {}
    for b, row in enumerate(rows):
        if row.generator is not None:
            key = (row.params.temperature, row.params.top_k, row.params.top_p)
            settings.setdefault(key, []).append(b)
    for (temperature, top_k, top_p), batch in settings.items():
        every = len(batch) == len(rows)
        index = torch.tensor(batch, device=logits.device)
        if temperature == 1 and top_k == -1 and top_p == 1:  # the policy's own distribution
            probs = (logprobs if every else logprobs[index]).exp()
        else:
            x = logits if every else logits[index]
            probs = _filtered(x, rows[batch[0]].params).softmax(-1)
        u = torch.cat(
            [
                torch.rand(1, dtype=torch.float64, generator=rows[b].generator, device=probs.device)
                for b in batch
            ]
        )
        for b, token in zip(batch, _inverse_cdf(probs, u).tolist(), strict=True):
            chosen[b] = token
    return chosen


def topk_lists(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Each row's k most likely tokens, [(token id, logprob), ...] from the most likely."""
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return [
        list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)
    ]


def _record_topk(logprobs: torch.Tensor, rows: list[_Row]) -> None:
    """Append the top-k of this position to the rows that asked for it (one topk for all)."""
    wanted = [b for b, row in enumerate(rows) if row.topk]
    if not wanted:
        return
    k = max(rows[b].topk for b in wanted)
    tops = topk_lists(logprobs[torch.tensor(wanted, device=logprobs.device)], k)
    for b, top in zip(wanted, tops, strict=True):
        rows[b].top.append(top[: rows[b].topk])


# Cumulative sums run in float32 inside blocks of this many tokens and in float64 across blocks.
BLOCK = 256


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of `probs` (rows, vocabulary; unnormalized, >= 0), the token where the cumulative
    sum first exceeds `u` (in [0, 1), float64) times the row's total. A token's share is resolved
    relative to its block's mass (float32), blocks relative to the total (float64): a float64
    cumulative sum over the whole vocabulary cost 6x more (the conversion alone, measured)."""
    rows, vocab = probs.shape
    if vocab % BLOCK:
        probs = torch.nn.functional.pad(probs, (0, BLOCK - vocab % BLOCK))
    inner = probs.view(rows, -1, BLOCK).cumsum(-1)
    across = inner[..., -1].double().cumsum(-1)  # (rows, blocks)
    target = u * across[:, -1]
    block = torch.searchsorted(across, target[:, None], right=True)[:, 0]
    block = block.clamp(max=across.shape[1] - 1)
    before = across.gather(1, (block - 1).clamp(min=0)[:, None])[:, 0] * (block > 0)
    within = inner[torch.arange(rows, device=probs.device), block].double()  # (rows, BLOCK)
    offset = torch.searchsorted(within, (target - before)[:, None], right=True)[:, 0]
    token = block * BLOCK + offset.clamp(max=BLOCK - 1)
    # Rounding could land a target a hair past its block's last token, on one of probability 0
    # (as likely as 1 in 2^50): the row's most likely token instead.
    zero = probs.gather(1, token[:, None])[:, 0] == 0
    return torch.where(zero, probs.argmax(-1), token) if bool(zero.any()) else token


@torch.no_grad()
def sample_batch(
    model, tokenizer, requests: list[Request], adapters: list[str] | None = None
) -> list[list[SampledSequence]]:
    """Every completion of every request, decoded together: one forward pass per token for the
    whole batch (finished rows leave it). Row j of a request draws from its own generator,
    seeded by `row_seed(request.seed, j)`, so a request's draws do not depend on its batch.
    `adapters`: each request's adapter (a RowsModel's; one adapter's requests neighbours)."""
    device = next(model.parameters()).device

    def per_row(rows: list[int]):
        return per_row_adapters(model, None if adapters is None else [adapters[r] for r in rows])

    rows: list[_Row] = []
    for i, r in enumerate(requests):
        stop_ids, stop_strings = stop_criteria(r.params, tokenizer.eos_token_id)
        greedy = r.params.temperature == 0
        for j in range(1 if greedy else r.num_samples):
            generator = None
            if not greedy:
                generator = torch.Generator(device=device).manual_seed(row_seed(r.seed, j))
            rows.append(_Row(i, r.params, r.max_tokens, stop_ids, stop_strings, generator, r.topk))

    # Each request's prompt runs once (left-padded: every next token sits in the last column),
    # then its cache, logits and mask are copied to each of its rows.
    width = max(len(r.prompt) for r in requests)
    ids = torch.full((len(requests), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
        mask[i, width - len(r.prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with per_row(list(range(len(requests)))):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    index = torch.tensor([row.request for row in rows], device=device)
    cache, logits = out.past_key_values, out.logits[index, -1]
    cache.batch_select_indices(index)
    mask, positions = mask[index], positions[index]
    live = list(range(len(rows)))  # rows still decoding, in batch order
    position = positions[:, -1]
    while True:
        logits = logits.float()
        logprobs = logits.log_softmax(-1)  # the raw policy's, before temperature and filters
        chosen = _draw(logits, logprobs, [rows[k] for k in live])
        _record_topk(logprobs, [rows[k] for k in live])
        done = [
            rows[k].add(token, float(logprobs[b, token]), tokenizer)
            for b, (k, token) in enumerate(zip(live, chosen, strict=True))
        ]
        keep = [b for b, d in enumerate(done) if not d]
        if not keep:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, position = mask[index], position[index]
            chosen = [chosen[b] for b in keep]
            live = [live[b] for b in keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
        position = position + 1
        with per_row([rows[k].request for k in live]):
            out = model(
                input_ids=torch.tensor(chosen, device=device)[:, None],
                attention_mask=mask,
                position_ids=position[:, None],
                past_key_values=cache,
                use_cache=True,
            )
        cache, logits = out.past_key_values, out.logits[:, -1]

    results: list[list[SampledSequence]] = [[] for _ in requests]
    for row in rows:
        top = row.top if row.topk else None
        results[row.request].append(SampledSequence(row.stop_reason, row.tokens, row.logprobs, top))
    return [
        repeat_greedy(seqs[0], r.num_samples) if r.params.temperature == 0 else seqs
        for seqs, r in zip(results, requests, strict=True)
    ]


class HFEngine:
    """The `hf` engine: a batched decode loop on a merged copy of the adapted model (on a
    quantized base: an unmerged one, see the module's docstring)."""

    name = "hf"
    # Serves a quantized base exactly (the learner falls back to this engine for those).
    serves_quantized = True
    # Serves top-k logprobs (sample(topk_sample_logprobs=k, topk_prompt_logprobs=k)).
    serves_topk = True

    @dataclass(frozen=True)
    class Options:
        # Most completions decoded together (a step's requests are split into batches of at
        # most this many rows; a request is never split).
        batch_rows: int = 256

        def __post_init__(self) -> None:
            if self.batch_rows < 1:
                raise ValueError(f"batch_rows must be >= 1, got {self.batch_rows}")

    @classmethod
    def build(cls, learner, options: Options | None = None) -> HFEngine:
        options = options or cls.Options()
        if learner.shared.batches() and adapters.can_batch(learner.model, [learner.adapter_name]):
            # Its samples batched with the other learners' on the base: per-row adapters.
            rows = RowsModel.shared(learner)
            return cls(learner.model, learner.tokenizer, False, options.batch_rows, rows=rows)
        merge = not learner.quant.enabled  # unmerged: a copy of the adapters only, its own
        return cls(
            learner.model,
            learner.tokenizer,
            merge,
            options.batch_rows,
            sampler=SamplingModel.shared(learner) if merge else None,
        )

    def __init__(
        self,
        peft_model,
        tokenizer,
        merge: bool = True,
        batch_rows: int = 256,
        *,
        sampler: SamplingModel | None = None,
        rows: RowsModel | None = None,
    ) -> None:
        """Serves `peft_model`'s active adapter, from a copy of its own, from `sampler` (the
        base's shared merged copy) or from `rows` (the base's copy with every learner's adapter
        unmerged, whose samples batch together: `sample_together`)."""
        self._rows = rows
        self._sampler = None if rows is not None else sampler or SamplingModel(peft_model, merge)
        self.model = rows.model if rows is not None else self._sampler.model
        self.tokenizer = tokenizer
        self.batch_rows = batch_rows
        self.adapter = peft_model.active_adapter

    @property
    def loaded_key(self) -> int | None:
        if self._rows is not None:
            return self._rows.loaded.get(self.adapter)
        loaded = self._sampler.loaded_key
        return loaded[1] if loaded is not None and loaded[0] == self.adapter else None

    def load(self, key: int, snapshot: dict[str, torch.Tensor]) -> None:
        if self._rows is not None:
            self._rows.load(self.adapter, key, snapshot)
        else:
            self._sampler.load((self.adapter, key), snapshot, self.adapter)

    def close(self) -> None:
        """This learner is gone: its adapter leaves the shared copy."""
        (self._rows or self._sampler).remove(self.adapter)

    def _own_rows(self, n: int) -> list[str] | None:
        return None if self._rows is None else [self.adapter] * n

    def sample(self, requests: list[Request]) -> list[list[SampledSequence]]:
        # All queued requests in one decode loop, `batch_rows` completions at a time; each
        # completion's seed decides its draws alone.
        return self.sample_together([(self, requests)])[0]

    def batches_with(self, other) -> bool:
        """Whether `other`'s requests decode in one batch with this engine's."""
        return self._rows is not None and getattr(other, "_rows", None) is self._rows

    def sample_together(self, parts: list[tuple[HFEngine, list[Request]]]) -> list:
        """Each part's (engine, requests) results; the parts' requests decoded together, each
        row through its engine's adapter (engines that `batches_with` this one), in batches
        of at most the engines' `batch_rows` summed."""
        requests = [r for _, part in parts for r in part]
        names = [engine.adapter for engine, part in parts for _ in part]
        budget = sum(engine.batch_rows for engine, _ in parts)
        out: list[list[SampledSequence]] = []
        start = 0
        for chunk in _chunks(requests, budget):
            rows = names[start : start + len(chunk)] if self._rows is not None else None
            out += sample_batch(self.model, self.tokenizer, chunk, rows)
            start += len(chunk)
        results, start = [], 0
        for _, part in parts:
            results.append(out[start : start + len(part)])
            start += len(part)
        return results

    @torch.no_grad()
    def _prompt_distributions(self, prompt: list[int]) -> torch.Tensor:
        """The policy's log-probabilities over the vocabulary at each prompt position after the
        first: (len(prompt) - 1, vocabulary)."""
        model = self.model
        device = next(model.parameters()).device
        with per_row_adapters(model, self._own_rows(1)):
            logits = model(input_ids=torch.tensor([prompt[:-1]], device=device)).logits[0]
        return logits.float().log_softmax(-1)

    def prompt_logprobs(self, prompt: list[int]) -> list[float | None]:
        targets = torch.tensor(prompt[1:])[:, None]
        logprobs = self._prompt_distributions(prompt)
        return [None, *logprobs.gather(-1, targets.to(logprobs.device))[:, 0].tolist()]

    def prompt_topk_logprobs(self, prompt: list[int], k: int) -> list:
        """Each prompt position's k most likely tokens (None for the first)."""
        return [None, *topk_lists(self._prompt_distributions(prompt), k)]


def _chunks(requests: list[Request], rows: int) -> list[list[Request]]:
    """Consecutive requests, at most `rows` completions per chunk (a larger request alone)."""
    chunks: list[list[Request]] = [[]]
    count = 0
    for r in requests:
        n = 1 if r.params.temperature == 0 else r.num_samples
        if chunks[-1] and count + n > rows:
            chunks.append([])
            count = 0
        chunks[-1].append(r)
        count += n
    return chunks
