"""Hot experts: the routed experts that routing uses most get a copy on the --device
(layers/hot_experts.py), chosen from router statistics of a calibration text.

Data path, after the model is loaded and its experts bound to the CPU engine:
calibration tokens -> one teacher-forced pass (Engine.score) with hooks on every router ->
counts [E] per MoE layer -> the N most used ids per layer -> their gate/up/down: on a GPU, from a
GGUF whose expert formats the GPU kernels decode (GPU_BLOCK_FORMATS), the file's blocks as stored
(expert_blocks; split into the decode kernels' row layout where GPU_SPLIT_FORMATS allow); else in
float: on a GPU with the dual path, copied out of the engine's memory and decoded there
(DualExperts.device_weights), otherwise read again from the model file (GGUF merged blocks
dequantized, or HF per-expert tensors) -> HotExperts wrapping the layer's backend. The CPU engine
keeps all experts (RAM unchanged); VRAM grows by N experts per layer, which the memory plan counts
(placement/memory.py, hot_experts). While serving, the layers count routing; `moved_hot_experts`
finds the layers whose traffic moved and `replace_hot_experts` gives them their new experts (between
requests: LLM.rebalance_hot_experts, which the server calls when its engine goes idle).
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tandem.errors import TandemError
from tandem.layers.block_experts import Blocks
from tandem.layers.dual_experts import DualExperts
from tandem.layers.hot_experts import HotExperts
from tandem.layers.moe import MoE
from tandem.ops.split_rows import split_rows, unsplit_rows
from tandem.placement.memory import GPU_BLOCK_FORMATS, GPU_SPLIT_FORMATS
from tandem.weights.gguf import torch_dequantizer

# Used when no --calibrate text is given: prose, code and numbers, so routing sees a mix.
DEFAULT_CALIBRATION = (
    "The history of the city begins with a small harbour on the river, where traders met to exchange "
    "grain, salt and cloth. def merge(a, b):\n    out = []\n    while a and b:\n        out.append(a.pop(0) "
    "if a[0] < b[0] else b.pop(0))\n    return out + a + b\n"
    "Question: what is 17 * 23? Answer: 391. The committee met on Tuesday to review the budget and the "
    "schedule for the new library, and agreed to publish the minutes in three languages."
)


def routing_counts(llm: Any, tokens: list[int]) -> dict[str, torch.Tensor]:
    """Experts-module name -> how often each expert was picked [E] over one pass of `tokens`."""
    counts: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in llm.model.named_modules():
        if isinstance(module, MoE):
            key = f"{name}.experts"
            counts[key] = torch.zeros(module.cfg.num_experts, dtype=torch.long)

            def hook(_m, _inp, out, key=key):
                ids = out[0].reshape(-1).long().cpu()
                counts[key] += torch.bincount(ids[ids >= 0], minlength=counts[key].numel())

            handles.append(module.router.register_forward_hook(hook))
    try:
        llm.engine.score(tokens)
    finally:
        for h in handles:
            h.remove()
    return counts


def calibration_tokens(llm: Any, path: str | Path | None) -> list[int]:
    if path is None:
        text = DEFAULT_CALIBRATION
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TandemError(f"cannot read the calibration text {path}: {e}") from None
        if not text.strip():
            raise TandemError(f"the calibration text {path} is empty")
    tokens = llm.tokenizer.encode(text)
    return tokens[: llm.max_context - 1]


def expert_weights(checkpoint: Any, ours: dict[str, str], module: str, ids: list[int],
                   dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate [N, I, H], up [N, I, H], down [N, H, I] of experts `ids` of `module`, read from the file;
    ours: tandem name -> the file's tensor name."""
    out = []
    for proj in ("gate", "up", "down"):
        target = f"{module}.w_{proj}"
        if target in ours:  # merged [E, ...] (GGUF)
            name = ours[target]
            if checkpoint.is_quantized(name):
                deq = torch_dequantizer(checkpoint.qtype(name))
                raw = checkpoint.raw(name)
                rows = [deq(raw[e]).reshape(checkpoint.shape(name)[1:]) for e in ids]
            else:
                full = checkpoint.get(name)
                rows = [full[e] for e in ids]
        else:  # one tensor per expert (HF)
            missing = [e for e in ids if f"{target}[{e}]" not in ours]
            if missing:
                raise TandemError(f"the model file has no {proj} weights for experts {missing} of {module}")
            rows = [checkpoint.get(ours[f"{target}[{e}]"]) for e in ids]
        out.append(torch.stack(rows).to(device=device, dtype=dtype))
    return tuple(out)


def block_names(checkpoint: Any, ours: dict[str, str], module: str) -> tuple[str, str, str] | None:
    """The file's merged gate/up/down tensors of `module` when all three are stored in formats the
    GPU kernels decode (GPU_BLOCK_FORMATS); else None."""
    names = tuple(ours.get(f"{module}.w_{proj}") for proj in ("gate", "up", "down"))
    if any(n is None or not checkpoint.is_quantized(n) or checkpoint.qtype(n) not in GPU_BLOCK_FORMATS
           for n in names):
        return None
    return names


def expert_blocks(checkpoint: Any, names: tuple[str, str, str], ids: list[int],
                  device, split: bool | None = None) -> tuple[Blocks, Blocks, Blocks]:
    """Experts `ids` of the merged tensors `names` as the file stores them: Blocks uint8 [N, rows,
    row_bytes] on `device` (a copy of N experts' bytes; nothing is decoded), dequantized there by
    the GPU kernels (CPU: the reference codecs) when a step is too long for the fused kernels.
    split (None: when all three formats are GPU_SPLIT_FORMATS): the rows regrouped on the device
    for ops/triton/moe_q8.py's kernels (the same bytes, each row padded to 16)."""
    device = torch.device(device)
    index = torch.tensor(ids, dtype=torch.long)
    formats = [checkpoint.qtype(name) for name in names]
    if split is None:
        split = set(formats) <= GPU_SPLIT_FORMATS
    out = []
    for name, fmt in zip(names, formats):
        data = checkpoint.raw(name)[index].to(device)
        dequantize = _gpu_dequantizer(fmt) if device.type == "cuda" else torch_dequantizer(fmt)
        if split:
            data, dequantize = split_rows(data, fmt), _unsplitting(dequantize, fmt)
        out.append(Blocks(data, fmt, dequantize, split))
    return tuple(out)


def _unsplitting(dequantize: Callable[[torch.Tensor], torch.Tensor], fmt: str):
    def dequantize_split(raw: torch.Tensor) -> torch.Tensor:
        return dequantize(unsplit_rows(raw, fmt))

    return dequantize_split


def _gpu_dequantizer(fmt: str):
    def dequantize(raw: torch.Tensor) -> torch.Tensor:
        from tandem.ops.triton.quant import dequantize as kernel  # triton: imported on first use

        return kernel(raw, fmt)

    return dequantize


def hot_weights(backend: nn.Module, checkpoint: Any, ours: dict[str, str], module: str, ids: list[int],
                dtype: torch.dtype, device, blocks: bool | None = None, split: bool | None = None) -> tuple:
    """The copies of experts `ids` on `device`. blocks (None: on a GPU): the file's blocks where
    their formats allow (expert_blocks). Else float: on a GPU whose layer has the dual path,
    decoded there from the engine's memory (seconds for a model's worth, where the file's reference
    dequantizer on the host took ~80 ms an expert: 2 minutes for 64 hot experts of V2-Lite's 26
    layers); else read again from the model file. split: see expert_blocks."""
    on_gpu = torch.device(device).type == "cuda"
    names = block_names(checkpoint, ours, module) if (on_gpu if blocks is None else blocks) else None
    if names is not None:
        return expert_blocks(checkpoint, names, ids, device, split)
    if isinstance(backend, DualExperts) and on_gpu:
        return backend.device_weights(ids, dtype, device)
    return expert_weights(checkpoint, ours, module, ids, dtype, device)


def most_used(counts: torch.Tensor, n: int) -> list[int]:
    """The n most used expert ids by `counts` [E] (ties: lower id first), in ascending order."""
    return sorted(sorted(range(counts.numel()), key=lambda e: (-int(counts[e]), e))[:n])


def place_hot_experts(model: nn.Module, counts: dict[str, torch.Tensor], per_layer: int, checkpoint: Any,
                      rename: Callable[[str], str | None], dtype: torch.dtype, device,
                      blocks: bool | None = None, split: bool | None = None) -> dict[str, list[int]]:
    """Wrap each MoE layer's experts backend in HotExperts holding its `per_layer` most used experts
    (blocks: see hot_weights); returns module -> hot ids."""
    placed = {}
    modules = dict(model.named_modules())
    ours = {rename(n): n for n in checkpoint.names()}
    for key, c in counts.items():
        n = min(per_layer, c.numel())
        if n <= 0:
            continue
        hot = most_used(c, n)
        parent = modules[key.rsplit(".", 1)[0]]
        gate, up, down = hot_weights(parent.experts, checkpoint, ours, key, hot, dtype, device, blocks, split)
        parent.experts = HotExperts(parent.experts, c.numel(), hot, gate, up, down)
        placed[key] = hot
    return placed


def moved_hot_experts(model: nn.Module, *, min_gain: float = 0.05, min_count: int = 1024,
                      max_layers: int = 4) -> dict[str, list[int]]:
    """Where the routing counted online since the last call moved: a layer whose N most routed
    experts would have served at least `min_gain` more of its (token, expert) slots than its hot
    set did, over at least `min_count` slots; at most `max_layers` layers, the biggest gains first
    (reading and dequantizing experts takes a while). The counts of the layers considered restart
    from zero. Returns module -> the hot ids it should hold (nothing read from the model file)."""
    gains = []
    for name, module in model.named_modules():
        if not isinstance(module, HotExperts):
            continue
        counts = module.counts.cpu()
        total = int(counts.sum())
        if total < min_count:
            continue
        best = most_used(counts, len(module.hot_ids))
        gain = (int(counts[best].sum()) - int(counts[module.hot_ids].sum())) / total
        module.counts.zero_()
        if gain >= min_gain and best != module.hot_ids:
            gains.append((gain, name, best))
    return {name: best for _, name, best in sorted(gains, key=lambda g: -g[0])[:max_layers]}


def replace_hot_experts(model: nn.Module, moves: dict[str, list[int]], checkpoint: Any,
                        rename: Callable[[str], str | None], dtype: torch.dtype) -> None:
    """Give each HotExperts module in `moves` those experts, read again from the file (in place)."""
    modules = dict(model.named_modules())
    ours = {rename(n): n for n in checkpoint.names()}
    for name, hot in moves.items():
        layer = modules[name]
        layer.replace(hot, *hot_weights(layer.cold, checkpoint, ours, name, hot, dtype, layer.lookup.device,
                                        layer.blocks, layer.blocks and layer.w_gate.split))
