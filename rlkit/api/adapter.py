"""The adapter's settings, declared once: the client API, checkpoints and the run config
(`adapter.*`, whose schema is derived from these fields) all use this class."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# torch.manual_seed takes a signed 64-bit integer.
MAX_SEED = 2**63 - 1


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
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63 - 1], got {self.seed}")
        if not (self.train_attn or self.train_mlp or self.train_unembed):
            raise ValueError("at least one of train_attn, train_mlp, train_unembed must be True")

    def to_dict(self) -> dict:
        return asdict(self)
