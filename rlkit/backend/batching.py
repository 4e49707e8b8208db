"""Check datums before they reach torch, and turn them into tensors.

Every problem is reported as an `InvalidDatumError` that names the datum's index and the field,
so a bad batch fails with a sentence rather than an index error deep inside a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlkit.api.errors import InvalidDatumError
from rlkit.api.losses import LossSpec
from rlkit.api.types import Datum, to_tensor_data, to_token_list


@dataclass
class TokenRow:
    """One datum as tensors (a row of the padded batch): input tokens (N,), target tokens (N,)
    and float loss inputs (N,), or both (N, K) with K targets per position (soft targets)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    inputs: dict[str, torch.Tensor]

    @property
    def length(self) -> int:
        return self.tokens.shape[0]


def _check_ids(where: str, ids: torch.Tensor, vocab_size: int) -> None:
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        pos = tuple(bad.nonzero()[0].tolist())
        at = ", ".join(map(str, pos))
        raise InvalidDatumError(
            f"{where}[{at}] = {int(ids[pos])} is outside the vocabulary [0, {vocab_size})"
        )


def _to_sequence(
    i: int,
    datum: Datum,
    spec: LossSpec,
    loss_fn: str,
    vocab_size: int,
    config: dict,
    context: int | None = None,
) -> TokenRow:
    where = f"datum {i}"
    if not hasattr(datum, "model_input") or not hasattr(datum, "loss_fn_inputs"):
        raise InvalidDatumError(f"{where} is a {type(datum).__name__}, not a Datum")
    tokens = torch.tensor(to_token_list(datum.model_input), dtype=torch.long)
    n = tokens.shape[0]
    if n == 0:
        raise InvalidDatumError(f"{where}: model_input is empty")
    if context is not None and n > context:
        # Positions past the context have no trained embedding: the loss would be garbage.
        raise InvalidDatumError(
            f"{where}: model_input has {n} tokens, more than the model's context of {context}"
        )
    _check_ids(f"{where}: model_input", tokens, vocab_size)

    required = spec.required_inputs(config)
    given = set(datum.loss_fn_inputs)
    if missing := sorted(required - given):
        why = " (with this loss_fn_config)" if required != {"target_tokens", *spec.inputs} else ""
        raise InvalidDatumError(f"{where}: loss {loss_fn!r} needs loss_fn_inputs {missing}{why}")
    allowed = required | set(spec.optional)
    if unknown := sorted(given - allowed):
        raise InvalidDatumError(
            f"{where}: loss {loss_fn!r} does not use loss_fn_inputs {unknown}; "
            f"it takes {sorted(required)}"
            + (f" and optionally {sorted(set(spec.optional) - required)}" if spec.optional else "")
        )

    tensors = {
        k: to_tensor_data(datum.loss_fn_inputs[k]).to_torch() for k in sorted(given & allowed)
    }
    # (n,), or (n, K) throughout where the loss takes K targets per position.
    shape = [n]
    targets = tensors["target_tokens"]
    if spec.soft_targets and targets.dim() == 2 and targets.shape[0] == n:
        shape = list(targets.shape)
    for key, value in tensors.items():
        if list(value.shape) != shape:
            expected = f"[{n}]" + (f" or [{n}, K]" if spec.soft_targets else "")
            raise InvalidDatumError(
                f"{where}: loss_fn_inputs[{key!r}] has shape {list(value.shape)}, "
                f"but model_input has length {n} (expected shape "
                f"{shape if len(shape) == 2 else expected})"
            )
    targets = tensors.pop("target_tokens")
    if targets.is_floating_point() and not torch.equal(targets, targets.round()):
        raise InvalidDatumError(f"{where}: target_tokens must be integers")
    targets = targets.long()
    _check_ids(f"{where}: target_tokens", targets, vocab_size)

    inputs = {}
    for key, value in tensors.items():
        value = value.float()
        if not torch.isfinite(value).all():
            pos = tuple((~torch.isfinite(value)).nonzero()[0].tolist())
            at = ", ".join(map(str, pos))
            raise InvalidDatumError(
                f"{where}: loss_fn_inputs[{key!r}][{at}] = {float(value[pos])} is not finite"
            )
        inputs[key] = value
    return TokenRow(tokens=tokens, targets=targets, inputs=inputs)


def to_rows(
    datums,
    spec: LossSpec,
    loss_fn: str,
    vocab_size: int,
    config: dict | None = None,
    context: int | None = None,
) -> list[TokenRow]:
    if not isinstance(datums, list | tuple):
        raise InvalidDatumError(f"expected a list of Datum, got {type(datums).__name__}")
    if not datums:
        raise InvalidDatumError("got an empty list of datums; pass at least one Datum")
    config = config or {}
    return [
        _to_sequence(i, d, spec, loss_fn, vocab_size, config, context) for i, d in enumerate(datums)
    ]


def microbatches(seqs: list[TokenRow], max_tokens: int) -> list[list[int]]:
    """Indices of `seqs` grouped so that each padded group holds at most `max_tokens` tokens."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, seq in enumerate(seqs):
        longest_if_added = max(longest, seq.length)
        if current and longest_if_added * (len(current) + 1) > max_tokens:
            groups.append(current)
            current, longest_if_added = [], seq.length
        current.append(i)
        longest = longest_if_added
    groups.append(current)
    return groups


def pad(seqs: list[TokenRow], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (tokens, targets, attention_mask), each (B, T); targets (B, T, K) where
    some row has K targets per position (a row with fewer: the rest token 0, never read)."""
    width = max(s.length for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    k = max((s.targets.shape[1] for s in seqs if s.targets.dim() == 2), default=0)
    targets = torch.zeros((len(seqs), width, *([k] if k else [])), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        tokens[row, : s.length] = s.tokens
        if k:
            theirs = s.targets if s.targets.dim() == 2 else s.targets[:, None]
            targets[row, : s.length, : theirs.shape[1]] = theirs
        else:
            targets[row, : s.length] = s.targets
        mask[row, : s.length] = 1
    return tokens, targets, mask
