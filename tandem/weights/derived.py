"""A view of a checkpoint in which some tensors are built from others at read time.

A model describes each derived tensor as `name -> (sources, shape, combine)`, where `combine`
maps the source tensors (float, torch order) to the derived one; this package knows nothing of
models. The view hides the sources and shows the derived names in their place, so the weight
loader plans, checks and streams as usual. A derived tensor may replace its only source under
the same name (a transform). Examples: newer llama.cpp GGUFs store DeepSeek's kv_b projection as
two tensors (attn_k_b, attn_v_b) that the model re-joins; llama.cpp permutes Mixtral's q/k rows,
which the model permutes back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from tandem.errors import TandemError

Combine = Callable[[list[torch.Tensor]], torch.Tensor]
Derivation = tuple[Sequence[str], tuple[int, ...], Combine]


class DerivedCheckpoint:
    """`base` with `derived` tensors added and their sources hidden; everything else passes through."""

    def __init__(self, base: Any, derived: Mapping[str, Derivation]):
        self._base = base
        self._derived = {name: (tuple(srcs), tuple(shape), fn) for name, (srcs, shape, fn) in derived.items()}
        first_source = {}
        for name, (sources, _, _) in self._derived.items():
            if name in base and name not in sources:
                raise TandemError(f"derived tensor '{name}' is already in {base.model_dir}; it cannot be built twice")
            for source in sources:
                if source not in base:
                    raise TandemError(f"tensor '{source}' (needed for '{name}') is not in {base.model_dir}")
            first_source[sources[0]] = name
        hidden = {s for sources, _, _ in self._derived.values() for s in sources}
        # Each derived name takes the place of its first source, so reads stay in file order.
        self._names = [first_source.get(n, n) for n in base.names() if n not in hidden or n in first_source]
        self._visible = frozenset(self._names)

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._visible

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._derived[name][1] if name in self._derived else self._base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32 if name in self._derived else self._base.dtype(name)

    def nbytes(self, name: str) -> int:
        if name in self._derived:
            return sum(self._base.nbytes(s) for s in self._derived[name][0])
        return self._base.nbytes(name)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self._derived:
            return self._base.get(name, dtype)
        sources, shape, combine = self._derived[name]
        tensor = combine([self._base.get(s, torch.float32) for s in sources])
        if tuple(tensor.shape) != shape:
            raise AssertionError(f"derivation of '{name}' made shape {tuple(tensor.shape)}, declared {shape}")
        return tensor if dtype is None else tensor.to(dtype)

    def __getattr__(self, attr: str) -> Any:
        # model_dir, total_bytes, metadata, qtype, raw, close, ...: the base checkpoint's.
        return getattr(self._base, attr)

    def __enter__(self) -> DerivedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self._base.close()
