"""The CPU engine's weights, read on the GPU in the engine's own layout: the first piece of the
dual-path prefill (issue 10), where a layer's experts are split between the CPU engine and the GPU
and the GPU's share is copied from the engine's memory, with no second copy in another layout.

The layout (csrc/kernels/tiled.h): per expert, rows in groups of R (16 on AVX-512 / AMX), a group
one contiguous region holding R rows' blocks as planes: inside a plane the unit is the tile-row,
R rows x 4 bytes, i.e. 4 consecutive codes of every row. Codes and scales per format:
  Q8_0  per 32-block i: int8 plane (code = q + 128) of 8 tile-rows; fp16 d[i][R] after all blocks
  Q5_0  per 32-block i: nibble plane (4 tile-rows: tile-row t holds granule 2t in low nibbles,
        2t + 1 in high; a granule is 4 consecutive weights) + bit plane (1 tile-row: bit g of byte
        4n + k % 4 is bit 4 of granule g's code); fp16 d[i][R] after all blocks; w = d (code - 16)
  Q4_K  per 256-super-block: fp16 d[R], fp16 dmin[R], 12 planes of R packed scale bytes (byte b of
        row n at b R + n, packed as in the file), nibble plane of 32 tile-rows;
        w = (d sc_j) code - (dmin m_j), j = k / 32
  Q6_K  per 256-super-block: 16 planes of R int8 scales, nibble plane (32 tile-rows), crumb plane
        (16 tile-rows: bits 2 (g % 4) .. +1 of byte 4n + k % 4 are bits 4-5 of granule g's code);
        fp16 d[i][R] after all super-blocks; w = (d sc_{k/16}) (code - 32)
The Q4_K_M mix of routed experts uses exactly these four. Float checkpoints' experts, quantized
or repacked at load (a DeepSeek FP8 checkpoint's become INT8 / INT4):
  BF16  tile-row j holds w[n][2j], w[n][2j + 1] (K padded to 32)
  INT8  fp32 scale[R], then an int8 plane (code = q + 128; K padded to 64); w = scale (code - 128)
  INT4  per 64-block: fp32 d[R], nibble plane of 8 tile-rows; w = d (code - 8)

dequantize(slab [E, groups, group_bytes] uint8, fmt, rows, cols) -> fp32 [E, rows, cols], one
program per (expert, group, block): bit-equal to the file format's reference dequantizer in
Triton's interpreter (same fp32 operations in the same order); on a GPU a fused multiply-add
may round the last operation once instead of twice. With `out` (any float dtype, any strides,
e.g. one node's column slice of a layer's weights) it writes there instead, rounding the fp32
weights to out's dtype to nearest even as torch's cast does: no fp32 copy in between.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.ops.triton.fused import _INTERPRETED, _check_device, _round

__all__ = ["FORMATS", "dequantize"]

# name -> (weights per block, constexpr id, rows must hold whole blocks)
FORMATS = {"Q8_0": (32, 0, True), "Q5_0": (32, 1, True), "Q4_K": (256, 2, True), "Q6_K": (256, 3, True),
           "BF16": (32, 4, False), "INT8": (64, 5, False), "INT4": (64, 6, True)}


@triton.jit
def _f16(ptr):
    """fp16 at byte address ptr (any alignment), as fp32."""
    lo = tl.load(ptr).to(tl.uint16)
    hi = tl.load(ptr + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequant_kernel(slab_ptr, out_ptr, rows, cols, groups, group_bytes, out_se, out_sr, out_sc,
                    R: tl.constexpr, BLK: tl.constexpr, FMT: tl.constexpr, EMULATE_BF16: tl.constexpr):  # fmt: skip
    eg, i = tl.program_id(0), tl.program_id(1)  # (expert * groups + group), block
    n = tl.arange(0, R)[:, None]  # row in the group
    k = tl.arange(0, BLK)[None, :]  # weight in the block
    g = slab_ptr + eg.to(tl.int64) * group_bytes
    TR: tl.constexpr = 4 * R  # bytes of one tile-row
    lane = 4 * n + k % 4  # byte of (row n, weight k) inside a tile-row
    gran = k // 4
    if FMT == 0:  # Q8_0
        code = tl.load(g + i * (32 * R) + gran * TR + lane).to(tl.int32)
        d = _f16(g + cols * R + i * (2 * R) + 2 * n)
        w = (code - 128).to(tl.float32) * d
    elif FMT == 1:  # Q5_0
        c = g + i * (20 * R)
        low = (tl.load(c + (gran // 2) * TR + lane).to(tl.int32) >> (4 * (gran % 2))) & 15
        high = (tl.load(c + 16 * R + (gran // 8) * TR + lane).to(tl.int32) >> (gran % 8)) & 1
        d = _f16(g + (cols // 32) * (20 * R) + i * (2 * R) + 2 * n)
        w = ((low | (high << 4)) - 16).to(tl.float32) * d
    elif FMT == 2:  # Q4_K
        c = g + i * (144 * R)
        d = _f16(c + 2 * n)
        dmin = _f16(c + 2 * R + 2 * n)
        j = k // 32  # sub-block
        scales = c + 4 * R + n
        a = tl.load(scales + j * R).to(tl.int32)  # byte j
        b = tl.load(scales + (j + 4) * R).to(tl.int32)  # byte j + 4
        lo = tl.load(scales + tl.maximum(j - 4, 0) * R).to(tl.int32)  # byte j - 4 (j >= 4)
        sc = tl.where(j < 4, a & 63, (b & 15) | ((lo >> 6) << 4))
        m = tl.where(j < 4, b & 63, (b >> 4) | ((a >> 6) << 4))
        code = (tl.load(c + 16 * R + (gran // 2) * TR + lane).to(tl.int32) >> (4 * (gran % 2))) & 15
        step = d * sc.to(tl.float32)
        offset = dmin * m.to(tl.float32)
        w = step * code.to(tl.float32) - offset
    elif FMT == 3:  # Q6_K
        c = g + i * (208 * R)
        sc = tl.load(c + (k // 16) * R + n).to(tl.int8, bitcast=True).to(tl.float32)
        low = (tl.load(c + 16 * R + (gran // 2) * TR + lane).to(tl.int32) >> (4 * (gran % 2))) & 15
        high = (tl.load(c + 144 * R + (gran // 4) * TR + lane).to(tl.int32) >> (2 * (gran % 4))) & 3
        d = _f16(g + (cols // 256) * (208 * R) + i * (2 * R) + 2 * n)
        w = (d * sc) * ((low | (high << 4)) - 32).to(tl.float32)
    elif FMT == 4:  # BF16, 32 columns per program
        at = g + (i * 16 + k // 2) * TR + 4 * n + 2 * (k % 2)
        bits = tl.load(at).to(tl.uint32) | (tl.load(at + 1).to(tl.uint32) << 8)
        w = (bits << 16).to(tl.float32, bitcast=True)
    elif FMT == 5:  # INT8, 64 columns per program
        scale = tl.load((g + 4 * n).to(tl.pointer_type(tl.float32), bitcast=True))
        code = tl.load(g + 4 * R + (i * 16 + gran) * TR + lane).to(tl.int32)
        w = scale * (code - 128).to(tl.float32)
    else:  # INT4
        c = g + i * (36 * R)
        d = tl.load((c + 4 * n).to(tl.pointer_type(tl.float32), bitcast=True))
        code = (tl.load(c + 4 * R + (gran // 2) * TR + lane).to(tl.int32) >> (4 * (gran % 2))) & 15
        w = d * (code - 8).to(tl.float32)
    row = (eg % groups) * R + n
    expert = eg // groups
    col = i * BLK + k
    out = out_ptr + expert.to(tl.int64) * out_se + row.to(tl.int64) * out_sr + col.to(tl.int64) * out_sc
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out, _round(w, out_dtype, EMULATE_BF16).to(out_dtype), mask=(row < rows) & (col < cols))


def dequantize(slab: torch.Tensor, fmt: str, rows: int, cols: int, row_group: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [E, rows, cols] from one projection's engine slab uint8 [E, groups, group_bytes]
    (ops.cpu.Engine.weight_slab), laid out with `row_group` rows per group; or written into `out`
    ([E, rows, cols], fp32 / bf16 / fp16, any strides; returned)."""
    if fmt not in FORMATS:
        raise ValueError(f"tiled dequantize reads {', '.join(FORMATS)}; got {fmt!r}")
    blk, fid, whole = FORMATS[fmt]
    if slab.dtype != torch.uint8 or slab.dim() != 3 or not slab.is_contiguous():
        raise ValueError(f"slab must be contiguous uint8 [E, groups, group_bytes], got {slab.dtype} {tuple(slab.shape)}")
    if row_group < 2 or row_group & (row_group - 1):
        raise ValueError(f"the tiled layout has a power-of-two row group >= 2 (AVX2: 8, AVX-512 / AMX: 16); got "
                         f"{row_group} (an engine on generic kernels keeps the file's rows)")
    if whole and cols % blk:
        raise ValueError(f"{fmt} rows hold whole blocks of {blk} weights; got {cols} columns")
    experts, groups, group_bytes = slab.shape
    if groups != triton.cdiv(rows, row_group):
        raise ValueError(f"{rows} rows in groups of {row_group} make {triton.cdiv(rows, row_group)} groups, "
                         f"the slab has {groups}")
    if out is None:
        out = torch.empty((experts, rows, cols), dtype=torch.float32, device=slab.device)
    elif out.shape != (experts, rows, cols) or out.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"out must be fp32/bf16/fp16 [{experts}, {rows}, {cols}], got {out.dtype} {tuple(out.shape)}")
    _check_device(slab, out)
    if out.numel():
        _dequant_kernel[(experts * groups, triton.cdiv(cols, blk))](
            slab, out, rows, cols, groups, group_bytes, *out.stride(),
            R=row_group, BLK=blk, FMT=fid, EMULATE_BF16=_INTERPRETED,
        )  # fmt: skip
    return out
