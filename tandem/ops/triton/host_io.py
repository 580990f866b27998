"""The CPU experts' staging on a GPU stream, as kernels that read and write pinned host memory
directly (zero-copy: pinned memory is mapped into the GPU's address space), where copies would
each be a copy-engine node in the stream with its own start-up gap.

to_host    x [T, H] (fp32/bf16/fp16), ids [T, k] (int32/int64), w [T, k] (float) on the GPU ->
           the engine's pinned buffers bx [T, H] (fp32 or bf16), bids int32, bw fp32: one
           launch, one program per token, instead of three device-to-host copies (and casts).
from_host  the engine's pinned out [T, H] (fp32/bf16) -> a new GPU tensor of `dtype`, rounded
           as torch's .to(dtype) rounds (to nearest even), plus (optionally) a GPU tensor added as
           torch adds (the MoE block's shared experts): one launch instead of a host-to-device
           copy, a cast and an add. Loads are volatile (system scope, never served from a cache): the CPU
           wrote the rows since the last read. (Not cache_modifier=".cv": Triton's NVIDIA backend
           ignored .cv on loads until triton-lang/triton#9936, e.g. in 3.6.)

Decode-sized steps only (HOST_IO_MAX_TOKENS): every byte crosses PCIe as the SMs' own loads and
stores, which suits a few KB, not a prefill chunk (copies stay there). No host syncs; grids from
shapes only, so CUDA graphs capture them. Under Triton's interpreter every tensor is a CPU tensor
and the same code runs (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.ops.triton.fused import _FLOATS, _INTERPRETED, _on, _round, _warps

__all__ = ["HOST_IO_MAX_TOKENS", "from_host", "to_host"]

HOST_IO_MAX_TOKENS = 64


@triton.jit
def _to_host_kernel(
    x_ptr, x_st, ids_ptr, ids_st, w_ptr, w_st, bx_ptr, bids_ptr, bw_ptr, H, K,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):  # one pass for every hidden size up to BLOCK_H
        c = h0 + cols
        x = tl.load(x_ptr + t * x_st + c, mask=c < H)
        tl.store(bx_ptr + t * H + c, x.to(bx_ptr.dtype.element_ty), mask=c < H)
    j = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + t * ids_st + j, mask=j < K)
    tl.store(bids_ptr + t * K + j, ids.to(tl.int32), mask=j < K)
    w = tl.load(w_ptr + t * w_st + j, mask=j < K)
    tl.store(bw_ptr + t * K + j, w.to(tl.float32), mask=j < K)


@triton.jit
def _from_host_kernel(
    src_ptr, add_ptr, dst_ptr, H, add_st,
    BLOCK_H: tl.constexpr, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, HAS_ADD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        c = h0 + cols
        v = _round(tl.load(src_ptr + t * H + c, mask=c < H, volatile=True).to(tl.float32), DTYPE, EMULATE_BF16)
        if HAS_ADD:  # as torch adds two tensors of DTYPE: in fp32, rounded once
            v = _round(v + tl.load(add_ptr + t * add_st + c, mask=c < H).to(tl.float32), DTYPE, EMULATE_BF16)
        tl.store(dst_ptr + t * H + c, v.to(DTYPE), mask=c < H)


def to_host(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
            bx: torch.Tensor, bids: torch.Tensor, bw: torch.Tensor) -> None:
    """bx[:] = x (cast), bids[:] = ids (int32), bw[:] = w (fp32); bx/bids/bw pinned and contiguous."""
    n_tok, hidden = x.shape
    k = ids.shape[1]
    if not (ids.shape == w.shape == (n_tok, k) and bx.shape == x.shape and bids.shape == bw.shape == ids.shape):
        raise ValueError(f"to_host shapes do not fit: x {tuple(x.shape)}, ids {tuple(ids.shape)}, w {tuple(w.shape)}, "
                         f"bx {tuple(bx.shape)}, bids {tuple(bids.shape)}, bw {tuple(bw.shape)}")
    if bx.dtype not in (torch.float32, torch.bfloat16) or bids.dtype != torch.int32 or bw.dtype != torch.float32:
        raise ValueError(f"to_host writes fp32/bf16 x, int32 ids and fp32 w, got {bx.dtype}, {bids.dtype}, {bw.dtype}")
    _check_host(bx, bids, bw)
    if x.stride(1) != 1 or ids.stride(1) != 1 or w.stride(1) != 1:
        x, ids, w = x.contiguous(), ids.contiguous(), w.contiguous()
    if n_tok == 0:
        return
    block = min(4096, triton.next_power_of_2(hidden))
    with _on(x):
        _to_host_kernel[(n_tok,)](
            x, x.stride(0), ids, ids.stride(0), w, w.stride(0), bx, bids, bw, hidden, k,
            BLOCK_H=block, BLOCK_K=triton.next_power_of_2(k), num_warps=_warps(block),
        )  # fmt: skip


def from_host(src: torch.Tensor, dtype: torch.dtype, device: torch.device,
              add: torch.Tensor | None = None) -> torch.Tensor:
    """src (pinned [T, H] fp32/bf16, contiguous) as a new tensor of `dtype` on `device`; with `add`
    ([T, H] of `dtype` on `device`) that tensor plus `add`, rounded as torch's src.to(dtype) + add."""
    if src.dim() != 2 or src.dtype not in (torch.float32, torch.bfloat16) or dtype not in _FLOATS:
        raise ValueError(f"from_host reads fp32/bf16 [T, H] into fp32/bf16/fp16, got {src.dtype} "
                         f"{tuple(src.shape)} -> {dtype}")
    _check_host(src)
    out = torch.empty(src.shape, dtype=dtype, device=device)
    if add is not None and (add.shape != src.shape or add.dtype != dtype or add.device != out.device
                            or add.stride(1) != 1):
        raise ValueError(f"from_host adds a [T, H] {dtype} tensor with contiguous rows on {out.device}, got "
                         f"{add.dtype} {tuple(add.shape)} on {add.device}")
    if src.numel():
        block = min(4096, triton.next_power_of_2(src.shape[1]))
        with _on(out):
            _from_host_kernel[(src.shape[0],)](
                src, add if add is not None else out, out, src.shape[1], add.stride(0) if add is not None else 0,
                BLOCK_H=block, DTYPE=_FLOATS[dtype], EMULATE_BF16=_INTERPRETED, HAS_ADD=add is not None,
                num_warps=_warps(block),
            )  # fmt: skip
    return out


def _check_host(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or not (_INTERPRETED or t.is_pinned()):
            raise ValueError("host buffers must be contiguous pinned CPU tensors (the GPU maps them)")
