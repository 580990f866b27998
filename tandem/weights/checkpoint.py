"""Read a Hugging Face model directory's safetensors weights, one tensor at a time.

`Checkpoint.open(dir)` reads only the small JSON headers and checks that every file is
present and whole, so a broken download fails in seconds rather than an hour into loading.
`get(name)` then reads one tensor through safetensors' mmap. FP8 block-scaled weights
(DeepSeek-V3/R1) come back dequantized; their `*_scale_inv` partners are hidden from `names()`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors import safe_open

from tandem.errors import TandemError
from tandem.weights.fp8 import dequant_fp8_blocks, fp8_scale_shape

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
DEFAULT_FP8_BLOCK = (128, 128)
# A real header is a few MB at most (DeepSeek-V3 shards: ~100 kB); more means a corrupt length.
MAX_HEADER_BYTES = 100 * 2**20

# safetensors dtype tags -> torch dtypes; read-only so no module state can change.
_DTYPES = MappingProxyType(
    {
        tag: getattr(torch, name)
        for tag, name in {
            "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
            "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
            "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
            "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
        }.items()
        if hasattr(torch, name)
    }
)
_FP8 = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives, from its file's header."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset inside the file's data region; orders reads
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors header and check the file is long enough; entries in file order."""
    redownload = "download it again"
    try:
        size = path.stat().st_size
        f = path.open("rb")
    except OSError as e:  # a directory, a dangling link, no permission
        raise TandemError(f"cannot read {path} ({e.strerror or e}) — {redownload}") from None
    with f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise TandemError(f"{path} is truncated: {size} bytes, too short for a safetensors header — {redownload}")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES:
            raise TandemError(f"{path} has a corrupt safetensors header (claims {header_len} bytes) — {redownload}")
        if 8 + header_len > size:
            raise TandemError(
                f"{path} is truncated: {size} bytes but its header alone needs {8 + header_len} — {redownload}"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        entries = _parse_entries(path, header)
    # JSONDecodeError and UnicodeDecodeError are ValueErrors; RecursionError: nesting too deep to parse
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise TandemError(f"{path} has a corrupt safetensors header ({e}) — {redownload}") from None
    expected = 8 + header_len + max((e.start + e.nbytes for e in entries.values()), default=0)
    if size < expected:
        raise TandemError(
            f"{path} is truncated: {size} bytes but its header declares {expected} — "
            f"the download is incomplete; {redownload}"
        )
    # safetensors refuses a file whose tensors leave a gap, overlap or stop short of its end, but
    # only once it is opened (hours into loading a big model); check here with the headers.
    end = 0
    for name, e in entries.items():
        if e.start != end:
            raise TandemError(
                f"{path} has a corrupt safetensors header (tensor '{name}' starts at byte {e.start} of the data, "
                f"expected {end}: tensors overlap or leave a gap) — {redownload}"
            )
        end = e.start + e.nbytes
    if size != 8 + header_len + end:
        raise TandemError(
            f"{path} has {size - 8 - header_len - end} bytes after its last tensor: the file is corrupt — {redownload}"
        )
    return entries


def _parse_entries(path: Path, header: dict[str, Any]) -> dict[str, TensorEntry]:
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise ValueError("__metadata__ is not an object of strings")  # safetensors refuses it on opening
            continue
        if not isinstance(info, dict):
            raise ValueError(f"tensor '{name}' is described by {info!r}, not an object")
        tag = info["dtype"]
        if not isinstance(tag, str):
            raise ValueError(f"tensor '{name}' has dtype {tag!r}, not a name like 'BF16'")
        if tag not in _DTYPES:
            raise TandemError(f"tensor '{name}' in {path} has dtype {tag}, which tandem cannot read yet")
        dtype = _DTYPES[tag]
        shape, offsets = info["shape"], info["data_offsets"]
        # Non-negative integers, as safetensors itself requires (it refuses 2.0 or "2" on opening).
        if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
            raise ValueError(f"tensor '{name}' has shape {shape!r}, not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
            raise ValueError(f"tensor '{name}' has data_offsets {offsets!r}, not two non-negative integers")
        shape = tuple(shape)
        start, end = offsets
        if end - start != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor '{name}' has offsets {start}..{end} that do not fit shape {shape} {tag}")
        entries.append((name, TensorEntry(path, dtype, shape, start, end - start)))
    entries.sort(key=lambda item: (item[1].start, item[1].nbytes))  # as safetensors orders them
    return dict(entries)


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError) as e:
        raise TandemError(f"cannot read {what} {path} ({e}) — fix or download it again") from None


def _fp8_block(model_dir: Path) -> tuple[int, int]:
    """The fp8 block size from config.json's quantization_config, else DeepSeek's 128x128."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        return DEFAULT_FP8_BLOCK
    config = _read_json(config_path, "config")
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    block = quant.get("weight_block_size") if isinstance(quant, dict) else None
    if block is None:
        return DEFAULT_FP8_BLOCK
    if not (isinstance(block, list) and len(block) == 2 and all(_is_size(b) and b > 0 for b in block)):
        raise TandemError(
            f"{config_path}: weight_block_size {block!r} should be two positive integers, like [128, 128]"
        )
    return block[0], block[1]


def _shard_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The files to read, and the index's name -> file map when there is one."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        index = _read_json(index_path, "index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise TandemError(f"{index_path} has no weight_map — download it again")
        for name, shard in weight_map.items():
            # A shard is a file beside the index: a bare name, never a path out of the directory.
            if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
                raise TandemError(
                    f"{index_path} puts tensor '{name}' in {shard!r}, which is not a weight file name "
                    "like 'model-00001-of-00002.safetensors' — download it again"
                )
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise TandemError(
                f"{len(missing)} of {len(shards)} weight files named in {index_path.name} are missing "
                f"from {model_dir}: {listed} — the download is incomplete; resume it"
            )
        return [model_dir / s for s in shards], weight_map
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE], None
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise TandemError(f"no *.safetensors weights in {model_dir} — point at a Hugging Face model directory")
    return files, None


class Checkpoint:
    """The tensors of one model directory; read one at a time with `get`. Use as a context manager."""

    def __init__(self, model_dir: Path, entries: dict[str, TensorEntry], fp8_block: tuple[int, int]):
        self.model_dir = model_dir
        self.fp8_block = fp8_block
        self._entries = entries  # every tensor, scales included, in read order
        # fp8 weight name -> its scale's name; those scales are hidden from names().
        self._scales = {
            name: name + SCALE_SUFFIX for name, e in entries.items() if e.dtype in _FP8
        }
        for name, scale in self._scales.items():
            if scale not in entries:
                raise TandemError(
                    f"fp8 tensor '{name}' has no '{scale}' beside it in {model_dir} — "
                    "the download is incomplete or this fp8 format is not supported"
                )
            if len(entries[name].shape) != 2:
                raise TandemError(
                    f"fp8 tensor '{name}' in {entries[name].path} has shape {entries[name].shape}, but block-scaled "
                    "fp8 weights are 2-D — the file is corrupt or this fp8 format is not supported"
                )
            if not entries[scale].dtype.is_floating_point or entries[scale].dtype in _FP8:
                raise TandemError(
                    f"fp8 scale '{scale}' in {entries[scale].path} is stored as "
                    f"{str(entries[scale].dtype).replace('torch.', '')}, not as float32/bfloat16 — the file is corrupt"
                )
            want = fp8_scale_shape(entries[name].shape, fp8_block)
            if entries[scale].shape != want:
                raise TandemError(
                    f"fp8 tensor '{name}' {entries[name].shape} has scale shape {entries[scale].shape}, but "
                    f"{fp8_block[0]}x{fp8_block[1]} blocks need {want} — check weight_block_size in config.json"
                )
        hidden = set(self._scales.values())
        self._names = tuple(n for n in entries if n not in hidden)
        self._visible = frozenset(self._names)  # O(1) lookups; checkpoints hold ~10^5 tensors
        self._handles: dict[Path, Any] = {}  # opened on first use, closed by close()

    @classmethod
    def open(cls, model_dir: str | Path) -> Checkpoint:
        """Find and check the weight files of `model_dir` (or one .safetensors file) by their headers."""
        path = Path(model_dir)
        if path.is_file() and path.suffix == ".safetensors":
            files, weight_map, model_dir = [path], None, path.parent
        elif path.is_dir():
            model_dir = path
            files, weight_map = _shard_files(path)
        else:
            raise TandemError(
                f"{path} is not a model directory — give the folder holding config.json and *.safetensors"
            )

        entries: dict[str, TensorEntry] = {}
        for file in files:
            header = read_header(file)
            if weight_map is not None:
                absent = [n for n, f in weight_map.items() if f == file.name and n not in header]
                if absent:
                    raise TandemError(
                        f"{INDEX_FILE} puts {len(absent)} tensor(s) in {file.name} that it does not hold "
                        f"(first: '{absent[0]}') — the index and the shards come from different downloads"
                    )
                header = {n: e for n, e in header.items() if weight_map.get(n) == file.name}
            for name, entry in header.items():
                if name in entries:
                    raise TandemError(
                        f"tensor '{name}' is in both {entries[name].path.name} and {file.name} — "
                        f"remove the stray file from {model_dir}"
                    )
                entries[name] = entry
        return cls(model_dir, entries, _fp8_block(model_dir))

    # --- what is inside (headers only) ---

    def names(self) -> list[str]:
        """Tensor names in file order, shard by shard, so reading them in turn streams each file."""
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._visible

    def __len__(self) -> int:
        return len(self._names)

    def _entry(self, name: str) -> TensorEntry:
        if name not in self:
            raise TandemError(f"tensor '{name}' is not in the checkpoint {self.model_dir}")
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """The dtype `get(name)` returns: float32 for fp8 weights, else as stored."""
        return torch.float32 if name in self._scales else self._entry(name).dtype

    def is_fp8(self, name: str) -> bool:
        self._entry(name)
        return name in self._scales

    def nbytes(self, name: str) -> int:
        """Bytes read from disk for `name`, its fp8 scale included."""
        scale = self._scales.get(name)
        return self._entry(name).nbytes + (self._entries[scale].nbytes if scale else 0)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    # --- reading ---

    def _read(self, name: str) -> torch.Tensor:
        path = self._entries[name].path
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise TandemError(f"cannot open {path} ({e}) — download it again") from None
        return self._handles[path].get_tensor(name)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor; fp8 weights come back dequantized to float32, or to `dtype` if given."""
        self._entry(name)
        scale = self._scales.get(name)
        if scale is not None:
            scale_inv = self._read(scale)
            if not bool(scale_inv.isfinite().all()):  # a few values per weight: cheap to check
                raise TandemError(f"fp8 scale '{scale}' in {self._entries[scale].path} holds NaN or infinite values "
                                  "— the file is corrupt; download it again")
            return dequant_fp8_blocks(self._read(name), scale_inv, self.fp8_block, dtype or torch.float32)
        tensor = self._read(name)
        return tensor if dtype is None or dtype == tensor.dtype else tensor.to(dtype)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.model_dir)!r}, {len(self)} tensors, {self.total_bytes / 2**30:.2f} GiB)"
