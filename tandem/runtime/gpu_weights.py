"""Quantized GPU weights bound at load: the GGUF blocks of linear layers and the token embedding
go to the GPU as they are stored, read by the fused dequant-matmul kernels (layers/quant_linear.py
over ops/triton/quant.py), so DeepSeek-V3 Q4_K_M's non-expert weights take ~12 GB, not ~34.

A pass over the model built on the meta device, before it gets storage (like `bind_block_experts`):
each `Linear` (and the `nn.Embedding`, unless the output head shares it) whose weight the file
stores as blocks of a format in `GPU_BLOCK_FORMATS` and whose placement target is a GPU is replaced
by a QuantLinear / QuantEmbedding holding those blocks on that GPU. Tensors a model derives from
several file tensors (DeepSeek's kv_b, Mixtral's un-permuted q/k) load as float like the rest;
the memory plan (placement/memory.py) counts exactly this split. An MLP whose gate and up
projections both became blocks of one format then gets them as one QuantLinear ([gate | up] rows,
the same bytes): a decode step runs one GEMV there instead of two; so does an MLA layer's pair
that reads x, [q (or q_a) | kv_a].
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tandem.layers.attention import MLAttention
from tandem.layers.linear import MLP, Linear
from tandem.placement.memory import GPU_BLOCK_FORMATS
from tandem.placement.rules import Placement


def bind_gpu_blocks(net: nn.Module, checkpoint: Any, rename: Callable[[str], str | None], placement: Placement,
                    derived: dict | None = None) -> list[str]:
    """Swap in quantized GPU modules; returns the checkpoint names now served as blocks."""
    from tandem.layers.quant_linear import QuantEmbedding, QuantLinear

    file_name = {}
    for name in checkpoint.names():
        ours = rename(name)
        if ours and name not in (derived or {}):
            file_name[ours] = name
    tied = getattr(net, "lm_head", None) is None
    kept = []
    for path, module in list(net.named_modules()):
        is_embed = isinstance(module, nn.Embedding)
        if not isinstance(module, Linear) and not (is_embed and not tied):
            continue
        src = file_name.get(f"{path}.weight")
        if src is None or not checkpoint.is_quantized(src) or checkpoint.qtype(src) not in GPU_BLOCK_FORMATS:
            continue
        if tuple(checkpoint.shape(src)) != tuple(module.weight.shape):
            continue  # the weight loader reports the mismatch with the other mapping problems
        target = placement.resolve(f"{path}.weight", False)
        if not target.on_gpu:
            continue
        blocks = checkpoint.raw(src).to(target.device)  # [out, row_bytes]: the file's bytes, once
        qtype = checkpoint.qtype(src)
        if is_embed:
            new = QuantEmbedding.from_blocks(blocks, qtype, dtype=module.weight.dtype)
        else:  # a bias stays a (meta) parameter: it gets storage and loads with the other weights
            new = QuantLinear.from_blocks(blocks, qtype, bias=module.bias)
        parent, _, attr = path.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, attr, new)
        kept.append(src)
    for module in net.modules():
        if isinstance(module, MLP) and module.gate_up is None:
            merged = _merged(module.gate_proj, module.up_proj)
            if merged is not None:
                module.merge_gate_up(merged)
        elif isinstance(module, MLAttention) and module.q_kv_a is None:
            merged = _merged(module.q_in, module.kv_a_proj_with_mqa)
            if merged is not None:
                module.merge_q_kv_a(merged)
    return kept


def _merged(*layers: nn.Module) -> nn.Module | None:
    """One QuantLinear whose rows are the layers' rows in order (the same bytes), if every layer is
    a QuantLinear without bias, all of one format on one device; else None."""
    from tandem.layers.quant_linear import QuantLinear

    if not all(isinstance(m, QuantLinear) and m.bias is None for m in layers):
        return None
    if len({m.weight_format for m in layers}) != 1 or len({m.blocks.device for m in layers}) != 1:
        return None
    return QuantLinear.from_blocks(torch.cat([m.blocks for m in layers]), layers[0].weight_format)
