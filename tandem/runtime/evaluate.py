"""Quality measurement: perplexity of a model on a text, with a sliding window.

Each window of `window` tokens starts `stride` tokens after the previous one and scores only the
tokens the previous window did not, so every token is predicted once, with up to
window - stride tokens of context (the usual strided evaluation).
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from tandem.errors import TandemError


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored


@torch.inference_mode()
def perplexity(engine, ids: list[int], window: int, stride: int | None = None, progress: bool = True) -> Perplexity:
    stride = stride or window // 2
    if not 0 < stride <= window:
        raise TandemError(f"stride must be in 1..window ({window}), got {stride}")
    if len(ids) < 2:
        raise TandemError("the text is too short to measure perplexity: it needs at least 2 tokens")
    total, count, scored_to = 0.0, 0, 1  # token 0 has no context and is never scored
    starts = range(0, max(len(ids) - 1, 1), stride)
    for start in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        chunk = ids[start : start + window]
        if len(chunk) < 2 or start + len(chunk) <= scored_to:
            break
        logits = engine.score(chunk)
        first = max(scored_to - start, 1)  # positions in the chunk not yet scored
        targets = torch.tensor(chunk[first:], device=logits.device)
        total += torch.nn.functional.cross_entropy(logits[first - 1 : -1], targets, reduction="sum").item()
        count += len(targets)
        scored_to = start + len(chunk)
    return Perplexity(math.exp(total / count), total / count, count)


def set_experts_per_token(model: torch.nn.Module, k: int) -> None:
    """Route every token to k experts instead of the config's top-k (a speed/quality trade-off)."""
    from tandem.layers.moe import Router

    for module in model.modules():
        if isinstance(module, Router):
            module.cfg = dataclasses.replace(module.cfg, top_k=k)  # MoEConfig validates k


@dataclass(frozen=True)
class Variant:
    name: str
    weights: str  # "model" (the checkpoint as given) or a GGUF qtype to convert to first
    llm: dict  # LLM keyword arguments
    experts_per_token: int | None = None  # None: the model's own top-k


def quality_variants(top_k: int) -> list[Variant]:
    """The rows of `tandem eval compare`: weight formats, then fewer active experts."""
    rows = [
        Variant("fp32 (baseline)", "model", dict(dtype="float32", experts="torch")),
        Variant("bf16", "model", dict(dtype="bfloat16")),
        Variant("GGUF Q8_0", "Q8_0", dict(dtype="float32")),
        Variant("GGUF Q6_K", "Q6_K", dict(dtype="float32")),
        Variant("GGUF Q4_K_M", "Q4_K_M", dict(dtype="float32")),
        Variant("experts INT8 (online)", "model", dict(dtype="float32", experts_format="int8")),
        Variant("experts INT4 (online)", "model", dict(dtype="float32", experts_format="int4")),
    ]
    for fewer in (1, 2):
        if top_k - fewer >= 1:
            rows.append(Variant(f"top-{top_k - fewer} experts (of {top_k})", "model", dict(dtype="float32"), top_k - fewer))
    return rows
