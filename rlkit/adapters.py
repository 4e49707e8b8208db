"""LoRA / DoRA adapters on a base model, through peft.

Which layers get an adapter is chosen by role, as in the hosted API (`train_attn`, `train_mlp`,
`train_unembed`), and found by looking at the model's own linear layers, so any decoder-only
architecture works, not only Qwen's layer names.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

ATTN_MARKERS = ("attn", "attention")
MLP_MARKERS = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class AdapterSpec:
    """Everything that decides an adapter's shape and its initial weights."""

    rank: int = 32
    # Scale of the update is alpha / rank; a fixed alpha keeps the learning rate rank-independent.
    alpha: float = 32.0
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    # Weight-decomposed LoRA (DoRA) instead of plain LoRA.
    use_dora: bool = False
    # Seed of the adapter's random initial A matrices (B starts at zero).
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not (self.train_attn or self.train_mlp or self.train_unembed):
            raise ValueError("at least one of train_attn, train_mlp, train_unembed must be True")

    def to_dict(self) -> dict:
        return asdict(self)


def target_modules(model: PreTrainedModel, spec: AdapterSpec) -> list[str]:
    """Names of the linear layers to adapt, chosen by their role in the network."""
    unembed = model.get_output_embeddings()
    names: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
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
        torch.manual_seed(spec.seed)
        return get_peft_model(model, config)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
