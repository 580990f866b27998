"""The placement pass: a model built on the meta device -> name table -> memory plan -> placed model.

Before loading: `name_table` walks the meta model (every decoder shares the CausalLM skeleton:
embed, layers[i].attn / norms / ffn, norm, lm_head) and sorts each parameter into a module group,
with how the file stores it (`stored_tensors` reads only headers). `plan_model` resolves the
placement rules over those names and returns the MemoryPlan, which the caller prints and checks.

At load: `materialize` gives each parameter storage on its target's device (routed experts bound
for the CPU engine stay in CPU RAM, the rest goes to the --device), `cpu_block_rename` keeps GGUF
blocks only for experts that stay on the CPU, and `bind_cpu_engine` moves the layers whose rule
says cpu-engine into the C++ engine once the weights are in.
"""

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tandem.errors import TandemError
from tandem.layers.moe import MoE
from tandem.placement.memory import (
    ROUTED,
    MemoryPlan,
    ParamInfo,
    StepShape,
    engine_staging_bytes,
    plan_memory,
)
from tandem.placement.rules import Placement, Target

_LAYER = re.compile(r"layers\.(\d+)\.")
_SLOT = re.compile(r"(.+)\[\d+\]")
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a model file, from its header."""

    name: str  # the file's name ("blk.3.ffn_down_exps.weight", "model.embed_tokens.weight")
    format: str  # "Q4_K", "F32" (GGUF) or a torch dtype name ("bfloat16", "float8_e4m3fn+scale")
    nbytes: int
    blocks: bool = False  # quantized blocks (GGUF), kept as they are by the CPU engine


def stored_tensors(checkpoint: Any) -> list[StoredTensor]:
    """The tensors of a GGUFCheckpoint or an HF Checkpoint, from their headers."""
    if hasattr(checkpoint, "qtype"):
        g = checkpoint
        return [StoredTensor(n, g.qtype(n), g.nbytes(n), g.is_quantized(n)) for n in g.names()]
    return [
        StoredTensor(n, "float8_e4m3fn+scale" if checkpoint.is_fp8(n) else str(checkpoint.dtype(n)).removeprefix("torch."),
                     checkpoint.nbytes(n))
        for n in checkpoint.names()
    ]


def experts_modules(net: nn.Module) -> list[str]:
    """Names of the MoE layers' routed-experts modules, in layer order."""
    return [f"{name}.experts" for name, m in net.named_modules() if isinstance(m, MoE)]


def _groups(net: nn.Module) -> dict[str, str]:
    """Module name -> group; a parameter takes the group of its longest named ancestor."""
    roles = {"embed": "embeddings", "norm": "output head", "lm_head": "output head"}
    for i, layer in enumerate(getattr(net, "layers", ())):
        p = f"layers.{i}"
        roles[p] = "attention"  # attention and the two norms
        if isinstance(layer.ffn, MoE):
            roles.update({f"{p}.ffn": "shared experts", f"{p}.ffn.router": "routers", f"{p}.ffn.experts": ROUTED})
        else:
            roles[f"{p}.ffn"] = "dense FFN"
    return roles


def _group_of(name: str, roles: dict[str, str]) -> str:
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:k]) in roles:
            return roles[".".join(parts[:k])]
    return "other"


def name_table(net: nn.Module, tensors: Iterable[StoredTensor], rename: Callable[[str], str | None],
               derived: dict | None = None) -> list[ParamInfo]:
    """One ParamInfo per parameter of the meta model `net` (dtype already set), with its file bytes.

    rename: the model's checkpoint -> tandem name table; derived: {name: (sources, shape, fn)} of
    tensors the model builds from others (their sources' bytes count for the derived tensor).
    """
    alias = {s: d for d, (sources, _, _) in (derived or {}).items() for s in sources}
    stored: dict[str, list[StoredTensor]] = {}
    # Loaded as float whatever the file stores: tensors built from others, and an embedding that
    # is also the output head (tied).
    as_float = {"embed.weight"} if getattr(net, "lm_head", True) is None else set()
    for t in tensors:
        ours = rename(alias.get(t.name, t.name))
        if ours:
            m = _SLOT.fullmatch(ours)
            stored.setdefault(m[1] if m else ours, []).append(t)
            if t.name in alias:
                as_float.add(m[1] if m else ours)
    roles = _groups(net)
    table = []
    for name, p in net.named_parameters():
        parts = stored.get(name, [])
        layer = _LAYER.match(name)
        table.append(ParamInfo(
            name=name,
            group=_group_of(name, roles),
            shape=tuple(p.shape),
            dtype=str(p.dtype).removeprefix("torch."),
            dtype_bytes=p.element_size(),
            layer=int(layer[1]) if layer else None,
            stored="+".join(sorted({t.format for t in parts})),
            stored_bytes=sum(t.nbytes for t in parts),
            blocks=bool(parts) and all(t.blocks for t in parts) and name not in as_float,
            stored_pieces=max(len(parts), 1),
        ))
    return table


def step_shape(net: nn.Module) -> StepShape:
    weights = [m.weight.shape for name, m in net.named_modules()
               if name.startswith("layers.") and isinstance(getattr(m, "weight", None), torch.Tensor)
               and m.weight.dim() == 2 and ".experts" not in name]
    linears = [shape[0] for shape in weights]
    heads = [layer.attn.cfg.num_heads for layer in net.layers]
    attns = [layer.attn for layer in net.layers if hasattr(layer.attn, "kv_chunk")]  # those that chunk their context
    act = net.embed.weight.element_size()
    moes = [m.cfg for m in net.modules() if isinstance(m, MoE)]
    return StepShape(
        hidden=net.embed.embedding_dim,
        vocab=net.embed.num_embeddings,
        heads=max(heads),
        widest=max(linears, default=net.embed.embedding_dim),
        act_bytes=act,
        kv_expand=max(_expand_bytes(layer.attn.cfg, act) for layer in net.layers),
        kv_chunk=min((m.kv_chunk for m in attns), default=0),
        chunk_state=max((m.cfg.num_heads * (m.cfg.v_head_dim + 1) * 4 for m in attns), default=0),
        engine_per_token=max((engine_staging_bytes(c.hidden_size, c.intermediate_size, c.top_k) for c in moes), default=0),
        widest_weight=max((shape[0] * shape[1] for shape in weights), default=0),
    )


def _expand_bytes(cfg, act: int) -> int:
    """Bytes per context token a prefill step materializes: the gathered cache rows (and their
    dtype copy); MLA also the latent's up-projection [nh, dn + dv] and the keys [nh, dn + dr]."""
    gathered = 2 * cfg.cache_width * act
    if not hasattr(cfg, "kv_lora_rank"):
        return gathered
    nh, dn = cfg.num_heads, cfg.qk_nope_head_dim
    return gathered + nh * (2 * dn + cfg.v_head_dim + cfg.qk_rope_head_dim) * act


def plan_model(
    net: nn.Module,
    tensors: Sequence[StoredTensor],
    rename: Callable[[str], str | None],
    placement: Placement,
    *,
    max_context: int,
    max_batch: int,
    block_size: int = 16,
    experts_format: str = "bf16",
    step_tokens: int = 512,
    hot_experts: int = 0,
    derived: dict | None = None,
    vram_budget: int | None = None,
    ram_budget: int | None = None,
    budget_sources: tuple[str, str] = ("", ""),
    kv_chunk: int | None = None,
    dual_buffer: int = 0,
) -> MemoryPlan:
    """The memory plan of meta model `net` (dtype set, routers fp32) loaded from `tensors`.
    kv_chunk: the context chunk its MLA layers' prefill will use (default: theirs)."""
    params = name_table(net, tensors, rename, derived)
    step = step_shape(net)
    if kv_chunk is not None and step.kv_chunk:
        step = dataclasses.replace(step, kv_chunk=kv_chunk)
    return plan_memory(
        params,
        placement,
        kv_bytes_per_token=sum(net.cache_widths()) * net.cache_dtype(net.embed.weight.dtype).itemsize,
        max_context=max_context,
        max_batch=max_batch,
        block_size=block_size,
        step=step,
        experts_format=experts_format,
        step_tokens=step_tokens,
        hot_experts=hot_experts,
        vram_budget=vram_budget,
        ram_budget=ram_budget,
        budget_sources=budget_sources,
        dual_buffer=dual_buffer,
    )


def experts_targets(net: nn.Module, placement: Placement) -> dict[str, Target]:
    """Routed-experts module -> its target; its projections must not be split across targets."""
    targets = {}
    for module in experts_modules(net):
        # TorchExperts' parameter names, which the rules see (a bound backend has none of its own).
        found = {placement.resolve(f"{module}.{w}", True) for w in EXPERT_WEIGHTS}
        if len(found) > 1:
            raise TandemError(f"the placement rules split {module} across {', '.join(sorted(t.label for t in found))}; "
                              "a layer's routed experts go to one target")
        targets[module] = found.pop()
    return targets


def _routed(name: str, modules: Sequence[str]) -> bool:
    return any(name.startswith(m + ".") for m in modules)


def materialize(net: nn.Module, placement: Placement) -> nn.Module:
    """Give every parameter of meta model `net` uninitialized storage on its target's device."""
    experts_targets(net, placement)  # fail on split layers before allocating anything
    routed = experts_modules(net)
    made: dict[int, nn.Parameter] = {}
    for mod_name, module in net.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:  # a tied parameter gets one storage
                full = f"{mod_name}.{pname}" if mod_name else pname
                device = placement.resolve(full, _routed(full, routed)).device
                made[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
            module._parameters[pname] = made[id(p)]
    return net


def cpu_block_rename(rename: Callable[[str], str | None], net: nn.Module, placement: Placement):
    """`rename` for binding GGUF blocks: experts placed on the GPU load as (dequantized) torch weights."""
    on_gpu = {m for m, t in experts_targets(net, placement).items() if t.on_gpu}

    def renamed(name: str) -> str | None:
        ours = rename(name)
        return None if ours and ours.rsplit(".", 1)[0] in on_gpu else ours

    return renamed


def bind_cpu_engine(net: nn.Module, placement: Placement, engine: Any, experts_format: str) -> int:
    """Move the routed experts whose target is cpu-engine into the C++ engine; returns the layers moved."""
    from tandem.runtime.experts import place_experts_on_cpu

    targets = experts_targets(net, placement)
    engine_layers = [m for m, t in targets.items() if t.backend == "engine"]
    if len(engine_layers) == len(targets):
        return place_experts_on_cpu(net, engine, experts_format)
    moved = 0
    for module in engine_layers:
        # The decoder layer holding this MoE, so the engine pass sees only this layer's experts.
        layer = module.rsplit(".", 2)[0]
        moved += place_experts_on_cpu(net.get_submodule(layer), engine, experts_format)
    return moved
