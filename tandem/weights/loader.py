"""Copy a checkpoint into a model's preallocated tensors, one tensor at a time.

The model hands over its parameters by name and a `rename` function from checkpoint names
to those names (this package never imports `tandem.models`). `rename` may return
`"base[i]"`: slot i of the stacked tensor `params["base"]` [E, ...], so per-expert checkpoint
tensors fill one [E, ...] tensor. The whole mapping is checked against the headers before
any data is read, so a config/weights mismatch fails at once, listing every problem.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from tandem.errors import TandemError
from tandem.weights.checkpoint import Checkpoint

# "layers.3.mlp.experts.w_gate[17]" -> ("layers.3.mlp.experts.w_gate", 17)
_SLOT = re.compile(r"(.+)\[(\d+)\]")
SHOWN = 5  # problems listed per kind; the rest are counted


@dataclass(frozen=True)
class _Copy:
    source: str  # checkpoint name
    base: str  # key in params
    slot: int | None  # index into a stacked tensor, or None for the whole tensor


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def _capped(lines: list[str], kind: str) -> list[str]:
    extra = len(lines) - SHOWN
    return lines[:SHOWN] + ([f"... and {extra} more {kind}"] if extra > 0 else [])


def _plan(
    checkpoint: Checkpoint,
    params: Mapping[str, torch.Tensor],
    rename: Callable[[str], str | None],
    ignore: Sequence[str],
) -> list[_Copy]:
    """Map every checkpoint tensor to its destination, or raise one TandemError listing all problems."""
    patterns = [re.compile(p) for p in ignore]
    copies: list[_Copy] = []
    mismatches: list[str] = []
    out_of_range: list[str] = []
    duplicates: list[str] = []
    unexpected: list[str] = []
    homeless: list[str] = []  # renamed to a parameter the model does not have
    # Who writes where, to catch two tensors filling one place and to find places nobody fills.
    whole: dict[str, str] = {}  # base -> checkpoint name
    slots: dict[str, dict[int, str]] = {}  # base -> slot -> checkpoint name

    for name in checkpoint.names():
        if any(p.fullmatch(name) for p in patterns):
            continue
        target = rename(name)
        if target is None:
            unexpected.append(f"'{name}'")
            continue
        match = _SLOT.fullmatch(target)
        base, slot = (match[1], int(match[2])) if match else (target, None)
        if base not in params:
            homeless.append(f"'{name}' -> '{target}'")
            continue
        dest = params[base]
        if slot is not None and (dest.dim() == 0 or slot >= dest.shape[0]):
            out_of_range.append(
                f"checkpoint tensor '{name}' goes to '{target}' but '{base}' holds only "
                f"{dest.shape[0] if dest.dim() else 0} slots — does config.json belong to these weights?"
            )
            continue
        taken = slots.get(base, {})
        earlier = whole.get(base) or (next(iter(taken.values()), None) if slot is None else taken.get(slot))
        if earlier is not None:
            duplicates.append(f"checkpoint tensors '{earlier}' and '{name}' both write into '{target}'")
            continue
        if slot is None:
            whole[base] = name
        else:
            slots.setdefault(base, {})[slot] = name
        expected = tuple(dest.shape if slot is None else dest.shape[1:])
        if checkpoint.shape(name) != expected:
            mismatches.append(
                f"config/weights mismatch: checkpoint tensor '{name}' has shape {checkpoint.shape(name)} "
                f"but the model expects {expected} for '{target}' — does config.json belong to these weights?"
            )
            continue
        if dest.dtype.is_floating_point and not checkpoint.dtype(name).is_floating_point:
            mismatches.append(
                f"checkpoint tensor '{name}' is stored as {str(checkpoint.dtype(name)).replace('torch.', '')} but "
                f"'{target}' holds floating-point weights — the file is corrupt or not this model's"
            )
            continue
        copies.append(_Copy(name, base, slot))

    missing = []
    for base, tensor in params.items():
        if base in whole:
            continue
        if base not in slots:
            missing.append(f"'{base}'")
        else:
            missing += [f"'{base}[{i}]'" for i in range(tensor.shape[0]) if i not in slots[base]]

    problems = (
        _capped(mismatches, "shape mismatches")
        + _capped(out_of_range, "slots out of range")
        + _capped(duplicates, "duplicate writes")
    )
    if homeless:
        problems.append(
            f"checkpoint tensors map to parameters the model does not have ({len(homeless)}): "
            f"{_listed(homeless)} — does config.json belong to these weights?"
        )
    if unexpected:
        problems.append(
            f"unexpected tensors in the checkpoint ({len(unexpected)}): {_listed(unexpected)} — "
            "the model has no place for them; check the model type, or ignore them"
        )
    if missing:
        problems.append(
            f"missing tensors ({len(missing)}): {_listed(missing)} — the checkpoint does not hold them; "
            "is the download complete, and does config.json belong to these weights?"
        )
    if problems:
        # One problem stays on one line (the CLI's error format); several get a line each.
        sep = "\n  " if len(problems) > 1 else " "
        raise TandemError(f"cannot load weights from {checkpoint.model_dir}:{sep}" + "\n  ".join(problems))
    return copies


def load_state(
    checkpoint: Checkpoint,
    params: dict[str, torch.Tensor],
    rename: Callable[[str], str | None],
    ignore: Sequence[str] = (),
    progress: bool = True,
) -> None:
    """Fill `params` from `checkpoint`, converting dtypes; every tensor must be written exactly once.

    `rename(checkpoint_name)` returns our name, `"name[i]"` for slot i of a stacked tensor, or None
    for a tensor the model does not use (an error unless a regex in `ignore` fullmatches it).
    Reads stream in checkpoint order, so extra memory is one tensor at a time.
    """
    copies = _plan(checkpoint, params, rename, ignore)
    total = sum(checkpoint.nbytes(c.source) for c in copies)
    with torch.no_grad(), tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading weights", disable=not progress
    ) as bar:
        for copy in copies:
            dest = params[copy.base] if copy.slot is None else params[copy.base][copy.slot]
            tensor = checkpoint.get(copy.source)
            dest.copy_(tensor)
            del tensor  # drop it before reading the next one: peak extra memory is one tensor
            bar.update(checkpoint.nbytes(copy.source))
