"""Read GGUF model files (llama.cpp's format), single or split, through the `gguf` package's mmap reader.

`GGUFCheckpoint.open(path)` takes a .gguf file, any part of a split model
(`name-00002-of-00005.gguf`: all parts are found and checked), or a directory holding one model's
GGUF file(s). It offers the interface the weight loader uses from `Checkpoint` (names, shape,
dtype, nbytes, total_bytes, get, close) plus `qtype(name)` and `raw(name)` for quantized tensors,
and `metadata`, the file's key/value pairs as a plain dict (config and tokenizer come from it).

Shapes are in torch order: GGUF lists dimensions innermost first, so a [out, in] weight is stored
as (in, out) and read back here as (out, in); a merged expert tensor is (E, out, in).
`get` dequantizes with `tandem.weights.quant`; `raw` is a zero-copy view of the file's blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

from tandem.errors import TandemError
from tandem.weights.quant import FORMATS, QuantFormat

SPLIT_NAME = re.compile(r"(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_BY_GGML_TYPE = {f.ggml_type: f for f in FORMATS.values() if f.ggml_type is not None}
# What the gguf reader raises on a malformed or truncated file (it has no error type of its own).
_READ_ERRORS = (ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError, OSError)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: where it lives and how it is stored."""

    path: Path
    format: QuantFormat
    shape: tuple[int, ...]  # torch order (outermost first)
    nbytes: int
    data: np.ndarray  # the reader's view of the mmapped bytes (no copy)


def find_parts(path: str | Path) -> list[Path]:
    """The GGUF file(s) of one model: [file], or every part of a split model, in order."""
    path = Path(path)
    if path.is_dir():
        groups: dict[tuple[str, str], list[Path]] = {}
        for file in sorted(path.glob("*.gguf")):
            m = SPLIT_NAME.fullmatch(file.name)
            groups.setdefault((m["stem"], m["count"]) if m else (file.name, ""), []).append(file)
        if not groups:
            raise TandemError(f"no .gguf files in {path} — give a .gguf file or a folder holding one model's GGUF parts")
        if len(groups) > 1:
            names = ", ".join(files[0].name for files in groups.values())
            raise TandemError(f"{path} holds {len(groups)} GGUF models ({names}) — give the path of the one to run")
        path = next(iter(groups.values()))[0]
    elif not path.is_file():
        raise TandemError(f"model path {str(path)!r} does not exist")
    m = SPLIT_NAME.fullmatch(path.name)
    if m is None:
        return [path]
    count = int(m["count"])
    if count < 1:
        raise TandemError(f"{path.name} names a split of {count} parts — rename it or download it again")
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise TandemError(
            f"{len(missing)} of {count} parts of the split GGUF model {m['stem']} are missing from "
            f"{path.parent}: {shown} — download every part into the same folder"
        )
    return parts


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """A GGUF file's key/value pairs as plain Python values (str, int, float, bool, lists)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _open_reader(path: Path) -> GGUFReader:
    redownload = "the file is truncated or corrupt; download it again"
    if path.stat().st_size < 24:  # magic, version, tensor and key counts
        raise TandemError(f"{path} is too short to be a GGUF file ({path.stat().st_size} bytes) — {redownload}")
    with open(path, "rb") as f:
        head = f.read(8)
    version = int.from_bytes(head[4:], "little")
    if not version & 0xFFFF:  # a big-endian file (gguf-py reads those too)
        version = int.from_bytes(head[4:], "big")
    if head[:4] == b"GGUF" and version not in READER_SUPPORTED_VERSIONS:
        raise TandemError(f"{path} is GGUF version {version}; tandem reads versions "
                          f"{', '.join(map(str, READER_SUPPORTED_VERSIONS))} — convert it with a matching llama.cpp")
    try:
        # 'c' (copy-on-write) maps the file read-only on disk but gives writable arrays, so torch
        # can wrap them without copying or warning; nothing is ever written back.
        return GGUFReader(path, mode="c")
    except _READ_ERRORS as e:
        raise TandemError(f"cannot read {path} as GGUF ({e}) — {redownload}") from None


def _check_placement(path: Path, reader: GGUFReader) -> None:
    """Each tensor's bytes start on the file's alignment inside the data area, and no two overlap
    (llama.cpp's checks): a corrupt offset or type would otherwise read another tensor's bytes."""
    spans = []
    for t in reader.tensors:
        start = int(t.data_offset)
        if (start - reader.data_offset) % reader.alignment:
            raise TandemError(f"{path.name}: tensor '{t.name}' starts at byte {start}, not on the file's "
                              f"{reader.alignment}-byte alignment — the file is corrupt; download it again")
        spans.append((start, start + int(t.n_bytes), t.name))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise TandemError(f"{path.name}: tensors '{name}' and '{other}' overlap in the file (their types "
                              "or offsets are wrong) — the file is corrupt; download it again")


def _tensors_of(path: Path, reader: GGUFReader) -> dict[str, GGUFTensor]:
    _check_placement(path, reader)
    tensors, unsupported = {}, []
    for t in reader.tensors:
        fmt = _BY_GGML_TYPE.get(int(t.tensor_type))
        if fmt is None:
            unsupported.append(f"'{t.name}' ({t.tensor_type.name})")
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = GGUFTensor(path, fmt, shape, int(t.n_bytes), t.data)
    if unsupported:
        supported = ", ".join(FORMATS)
        raise TandemError(
            f"{path.name} stores {len(unsupported)} tensor(s) in quant types tandem cannot read yet "
            f"(first: {unsupported[0]}); supported: {supported} — use a GGUF quantized to one of those"
        )
    return tensors


def _split_info(meta: dict[str, Any]) -> tuple[int, int, int | None]:
    return int(meta.get("split.no", 0)), int(meta.get("split.count", 1)), meta.get("split.tensors.count")


class GGUFCheckpoint:
    """The tensors and metadata of one GGUF model (all its parts). Use as a context manager."""

    def __init__(self, parts: list[Path], metadata: dict[str, Any], tensors: dict[str, GGUFTensor]):
        self.parts = parts
        self.model_dir = parts[0]  # named in loader error messages
        self.metadata = metadata
        self._tensors = tensors

    @classmethod
    def open(cls, path: str | Path) -> GGUFCheckpoint:
        """Find all parts of the model at `path`, read their headers and check they belong together."""
        parts = find_parts(path)
        metadata: dict[str, Any] = {}
        tensors: dict[str, GGUFTensor] = {}
        mixed = "the parts come from different models or downloads; download the split again"
        for i, part in enumerate(parts):
            reader = _open_reader(part)
            try:
                meta = read_metadata(reader)
            except _READ_ERRORS as e:
                raise TandemError(f"cannot read the metadata of {part} ({e}) — download it again") from None
            no, count, _ = _split_info(meta)
            if count != len(parts):
                if len(parts) == 1:
                    raise TandemError(
                        f"{part.name} is part {no + 1} of a GGUF split into {count} files, but its name does not say "
                        f"so — keep llama.cpp's names (NAME-00001-of-{count:05d}.gguf) and give the first part"
                    )
                raise TandemError(f"{part.name} says the model has {count} parts, not {len(parts)} — {mixed}")
            if no != i:
                raise TandemError(f"{part.name} says it is part {no + 1}, not {i + 1} — {mixed}")
            if i == 0:
                metadata = meta
            for name, tensor in _tensors_of(part, reader).items():
                if name in tensors:
                    raise TandemError(f"tensor '{name}' is in both {tensors[name].path.name} and {part.name} — {mixed}")
                tensors[name] = tensor
        expected = _split_info(metadata)[2]
        if expected is not None and int(expected) != len(tensors):
            raise TandemError(
                f"the {len(parts)} parts of {parts[0].name} hold {len(tensors)} tensors but the first part "
                f"announces {expected} — {mixed}"
            )
        return cls(parts, metadata, tensors)

    # --- what is inside (headers only) ---

    def names(self) -> list[str]:
        """Tensor names in file order, part by part."""
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def _entry(self, name: str) -> GGUFTensor:
        if name not in self._tensors:
            raise TandemError(f"tensor '{name}' is not in the GGUF model {self.model_dir}")
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """The dtype `get(name)` returns by default: float32 (quantized tensors come back dequantized)."""
        self._entry(name)
        return torch.float32

    def qtype(self, name: str) -> str:
        """Storage format name, as in `tandem.weights.quant.FORMATS` ("Q4_K", "BF16", ...)."""
        return self._entry(name).format.name

    def is_quantized(self, name: str) -> bool:
        return self.qtype(name) not in FLOAT_TYPES

    def nbytes(self, name: str) -> int:
        return self._entry(name).nbytes

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self._tensors.values())

    # --- reading ---

    def raw(self, name: str) -> torch.Tensor:
        """The stored blocks, uint8 [..., rows, row_bytes] (leading dims as in `shape`); a view of the file."""
        t = self._entry(name)
        row_bytes = t.shape[-1] // t.format.block_size * t.format.block_bytes
        blocks = t.data.view(np.uint8).reshape(*t.shape[:-1], row_bytes)
        return torch.from_numpy(blocks)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor in torch order, dequantized to float32 (or to `dtype`)."""
        t = self._entry(name)
        dtype = dtype or torch.float32
        if t.format.name in FLOAT_TYPES:
            # Float storage: view the bytes as their own dtype and convert once (exact, and no
            # float32 detour that would double a bf16 embedding's transient memory).
            stored = torch.from_numpy(t.data.view(np.uint8).reshape(-1)).view(FLOAT_TYPES[t.format.name])
            return stored.reshape(t.shape).to(dtype)
        return torch.from_numpy(t.format.dequantize(self.raw(name).numpy()).reshape(t.shape)).to(dtype)

    def close(self) -> None:
        # Views handed out by raw() keep their mapping alive; dropping ours releases the rest.
        self._tensors = {}

    def __enter__(self) -> GGUFCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.model_dir)!r}, {len(self)} tensors, {self.total_bytes / 2**30:.2f} GiB)"


def torch_dequantizer(fmt_name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """One format's reference dequantizer on torch tensors: uint8 [..., row_bytes] -> float32 [..., K]."""
    decode = FORMATS[fmt_name].dequantize

    def dequantize(raw: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(decode(raw.numpy()))

    return dequantize
