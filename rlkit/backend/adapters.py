"""LoRA / DoRA adapters on a base model, through peft.

Which layers get an adapter is chosen by role, as in the hosted API (`train_attn`, `train_mlp`,
`train_unembed`), and found by looking at the model's own linear layers, so any decoder-only
architecture works, not only Qwen's layer names.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from rlkit.api.adapter import AdapterSpec

ATTN_MARKERS = ("attn", "attention")
MLP_MARKERS = ("mlp", "feed_forward", "ffn")


def target_modules(model: PreTrainedModel, spec: AdapterSpec) -> list[str]:
    """Names of the linear layers to adapt, chosen by their role in the network."""
    unembed = model.get_output_embeddings()
    unembed = getattr(unembed, "base_layer", unembed)  # a model that has adapters already
    names: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".lora_" in name:
            continue
        name = name.removesuffix(".base_layer")  # an adapted layer: the layer it wraps
        leaf = name.rsplit(".", 1)[-1]
        path = name.lower()
        if module is unembed:
            wanted = spec.train_unembed
        elif any(m in path for m in ATTN_MARKERS):
            wanted = spec.train_attn
        elif any(m in path for m in MLP_MARKERS):
            wanted = spec.train_mlp
        else:
            wanted = False
        if wanted:
            names.add(leaf)
    if not names:
        raise ValueError(f"no linear layers of {type(model).__name__} match adapter spec {spec}")
    return sorted(names)


def attach(model: PreTrainedModel, spec: AdapterSpec) -> PeftModel:
    """`model` with a fresh adapter named "default", initialised from `spec.seed`."""
    peft_model = _seeded(lambda config: get_peft_model(model, config), model, spec)
    _sorted_sets(peft_model)
    return peft_model


def add(peft_model: PeftModel, spec: AdapterSpec, name: str) -> None:
    """One more adapter, `name`, on a model that has some: the same initial weights as
    `attach` gives for `spec` (the same layers, drawn in the same order from the same seed)."""
    _seeded(lambda config: peft_model.add_adapter(name, config), peft_model.get_base_model(), spec)
    _sorted_sets(peft_model)


def _seeded(make, model: PreTrainedModel, spec: AdapterSpec):
    """`make(config)` for `spec`'s adapter on `model`, its initial weights drawn from
    `spec.seed` (the global RNG is left as it was)."""
    config = LoraConfig(
        r=int(spec.rank),
        lora_alpha=spec.alpha,
        lora_dropout=0.0,
        target_modules=target_modules(model, spec),
        use_dora=spec.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft calls a transformers method that is deprecated in v5; not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        # An adapter on an output layer tied to the input embeddings: rlkit never merges into
        # the shared weight (the hf engine's copy and rlkit.export untie it first).
        warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")
        torch.manual_seed(spec.seed)
        return make(config)


def _sorted_sets(peft_model: PeftModel) -> None:
    # peft keeps target_modules as a set and writes it to adapter_config.json in hash order, a
    # different one in every process: sorted lists make the file the same in every run.
    for adapter_config in peft_model.peft_config.values():
        for key, value in vars(adapter_config).items():
            if isinstance(value, set):
                setattr(adapter_config, key, sorted(value))


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def can_batch(peft_model: PeftModel, names: list[str]) -> bool:
    """Whether rows of these adapters can run in one pass (`per_row`): plain LoRA on plain
    linear layers (a DoRA adapter's or a quantized layer's own forward is left alone)."""
    from peft.tuners.lora.layer import Linear

    return not any(
        type(module) is not Linear or any(name in module.lora_variant for name in names)
        for module in peft_model.modules()
        if isinstance(module, LoraLayer)
    )


@contextlib.contextmanager
def per_row(peft_model: PeftModel, row_adapters: list[str] | None):
    """Every adapted layer runs row i of its input through adapter `row_adapters[i]` (rows of
    one adapter must be neighbours: each adapter's rows are one slice, its matmuls those of its
    rows alone), the base weights once for all rows; None: as the model is. With gradients on,
    every named adapter trains meanwhile. See `can_batch` for which adapters can."""
    if row_adapters is None:
        yield
        return
    segments = [(name, len(list(run))) for name, run in itertools.groupby(row_adapters)]
    if len({name for name, _ in segments}) != len(segments):
        raise ValueError(f"rows of one adapter must be neighbours, got {row_adapters}")
    layers, lora_params = _lora_parts(peft_model)
    params = []
    if torch.is_grad_enabled():
        params = [p for name, p in lora_params if any(f".{a}." in name for a, _ in segments)]
    trains = [p.requires_grad for p in params]
    for layer in layers:
        layer.forward = functools.partial(_segments_forward, layer, segments)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
        for p, flag in zip(params, trains, strict=True):
            p.requires_grad_(flag)


def _lora_parts(peft_model: PeftModel) -> tuple[list, list]:
    """The model's LoRA layers and its adapters' (name, parameter) pairs, found once per set of
    adapters (a decode enters `per_row` at every token)."""
    key = tuple(peft_model.peft_config)
    cached = peft_model.__dict__.get("_rlkit_lora_parts")
    if cached is None or cached[0] != key:
        layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        params = [(n, p) for n, p in peft_model.named_parameters() if ".lora_" in n]
        cached = peft_model.__dict__["_rlkit_lora_parts"] = (key, layers, params)
    return cached[1], cached[2]


def _segments_forward(layer, segments: list[tuple[str, int]], x: torch.Tensor, *args, **kwargs):
    result = layer.base_layer(x, *args, **kwargs)
    sizes = [n for _, n in segments]
    if sum(sizes) != x.shape[0]:
        raise ValueError(f"per_row: {sum(sizes)} rows named, the pass has {x.shape[0]}")
    parts = []
    # One split (its backward is one concatenation; a slice's fills a zero tensor of all rows).
    for (name, n), rows in zip(segments, x.split(sizes), strict=True):
        if name not in layer.lora_A:  # this adapter leaves the layer as it is
            parts.append(result.new_zeros((n, *result.shape[1:])))
            continue
        rows = rows.to(layer.lora_A[name].weight.dtype)
        parts.append(layer.lora_B[name](layer.lora_A[name](rows)) * layer.scaling[name])
    return result + torch.cat(parts).to(result.dtype)
