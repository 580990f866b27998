"""Quality measurement: perplexity of a model on a text, with a sliding window.

Each window of `window` tokens starts `stride` tokens after the previous one and scores only the
tokens the previous window did not, so every token is predicted once, with up to
window - stride tokens of context (the usual strided evaluation).
"""

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
