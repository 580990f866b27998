"""Linear and embedding layers whose weights stay in their GGUF blocks on the GPU.

DeepSeek-V3 at Q4_K_M fits a 14 GB GPU only if its non-expert weights keep the file's ~4.5 bits
per weight there: `QuantLinear` and `QuantEmbedding` hold the raw blocks uint8 [out, row_bytes]
and the Triton kernels (tandem.ops.triton.quant) dequantize them inside the matmul / gather. No
float copy of a weight exists, so neither layer has a `weight`.

The blocks are a non-persistent buffer: `.to(device)` moves them, dtype casts leave them alone
(uint8), and `state_dict` does not list them (the loader fills them from the file, as is).
The kernels module is imported on first use, so importing this file does not import triton.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.errors import TandemError


def _kernels():
    # Deferred: importing triton is slow, and TRITON_INTERPRET must be settled before the kernels exist.
    from tandem.ops.triton import quant

    return quant


def _check_blocks(blocks: torch.Tensor, qtype: str, what: str) -> int:
    """Validate uint8 blocks [rows, row_bytes] of `qtype`; returns the weights per row (K)."""
    fmt = _kernels().format_of(qtype)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % fmt.block_bytes or not blocks.shape[1]:
        raise TandemError(
            f"{what} needs {fmt.name} blocks as uint8 [rows, a multiple of {fmt.block_bytes} bytes], "
            f"got {blocks.dtype} {tuple(blocks.shape)}"
        )
    return blocks.shape[1] // fmt.block_bytes * fmt.block_size


def _add_blocks(module: nn.Module, rows: int, k: int, qtype: str, device) -> None:
    """Give `module` its `weight_format` and an empty non-persistent `blocks` buffer [rows, row_bytes]."""
    quant = _kernels()
    module.weight_format = quant.format_of(qtype).name
    empty = torch.empty(rows, quant.row_bytes(qtype, k), dtype=torch.uint8, device=device)
    module.register_buffer("blocks", empty, persistent=False)


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W [out, in] kept as GGUF blocks; x [..., in] bf16/fp16/fp32 -> [..., out]."""

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        _add_blocks(self, out_features, in_features, qtype, device)
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None = None) -> QuantLinear:
        """A layer around existing blocks uint8 [out, row_bytes] (used as is, not copied); K from the row size."""
        k = _check_blocks(blocks, qtype, "QuantLinear")
        layer = cls(k, blocks.shape[0], qtype, bias=bias is not None, device="meta")
        layer.blocks = blocks
        if bias is not None:
            if bias.shape != (blocks.shape[0],):
                raise TandemError(f"QuantLinear bias must be [{blocks.shape[0]}], got {tuple(bias.shape)}")
            layer.bias = nn.Parameter(bias, requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = _kernels().quant_matmul(x.reshape(-1, self.in_features), self.blocks, self.weight_format, self.bias)
        return y.view(*lead, self.out_features)

    @property
    def nbytes(self) -> int:
        """Device bytes: the blocks plus the bias."""
        extra = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self.blocks.numel() + extra

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.weight_format}, "
            f"bias={self.bias is not None}"
        )


class QuantEmbedding(nn.Module):
    """Token embeddings kept as GGUF blocks: ids [...] -> [..., embedding_dim] in `dtype`.

    `dtype` follows casts of the module (`.to(torch.bfloat16)`) as an nn.Embedding's weight would:
    it is the dtype of an empty float buffer that the cast converts."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: str, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        _add_blocks(self, num_embeddings, embedding_dim, qtype, device)
        self.register_buffer("dtype_carrier", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_carrier.dtype

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, qtype: str, dtype=torch.bfloat16) -> QuantEmbedding:
        """A table around existing blocks uint8 [num_embeddings, row_bytes] (used as is, not copied)."""
        dim = _check_blocks(blocks, qtype, "QuantEmbedding")
        layer = cls(blocks.shape[0], dim, qtype, dtype=dtype, device="meta")
        layer.blocks = blocks
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = _kernels().embedding(ids.reshape(-1), self.blocks, self.weight_format, self.dtype)
        return rows.view(*ids.shape, self.embedding_dim)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.weight_format}, dtype={self.dtype}"
