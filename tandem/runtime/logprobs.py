"""Log-probabilities of generated tokens: the chosen token's and the N most likely (N = 0..20).

Which distribution: the model's own, unmodified. log_softmax over the whole vocabulary of the
fp32 logits `sample()` receives, before repetition / presence / frequency penalties,
temperature, top-k, top-p and min-p (vLLM's default, its "raw_logprobs"). A logprob thus says
what the model predicts, whatever sampling settings a request uses; under greedy decoding
without penalties the chosen token is the first of the top list.

Data path: sample() -> LogprobsPlan.of(params) (None when no row asks: no extra work at all) ->
plan.values(raw_logits, tokens) on the logits' device (only the rows that ask) -> appended to
the sampled tokens, so one host transfer brings both -> plan.unpack() -> one TokenLogprobs per
row (None for rows that did not ask, or whose logits were NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tandem.ops.staging import to_device

MAX_LOGPROBS = 20  # top alternatives a request may ask for (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated position: the chosen token, its log-probability under the model's raw
    distribution, and the `N` most likely tokens there as (token id, logprob), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class LogprobsPlan:
    """Which rows of a batch want logprobs, and how many alternatives each."""

    rows: tuple[int, ...]  # batch rows that ask, ascending
    tops: tuple[int, ...]  # N of each of those rows
    width: int  # alternatives computed per row: the largest N, at most the vocabulary

    @classmethod
    def of(cls, wanted: Sequence[int | None], vocab: int) -> LogprobsPlan | None:
        """wanted[i]: row i's N, or None when it does not ask. None when no row asks."""
        rows = tuple(i for i, n in enumerate(wanted) if n is not None)
        if not rows:
            return None
        tops = tuple(wanted[i] for i in rows)
        return cls(rows, tops, min(max(tops), vocab))

    def values(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Flat float64 on logits' device: [W] chosen logprobs, [W * width] top logprobs, [W * width]
        top ids (W = len(rows); float64 holds every token id exactly). logits [B, V] fp32 as the
        model gave them; tokens [B] the sampled ids (NAN_LOGITS rows are dropped by unpack)."""
        index = self._index(logits.shape[0], logits.device)
        if index is not None:
            logits, tokens = logits.index_select(0, index), tokens.index_select(0, index)
        logprobs = logits.log_softmax(dim=-1)  # [W, V]
        chosen = logprobs.gather(1, tokens.clamp(min=0)[:, None])[:, 0]  # [W]
        parts = [chosen.double()]
        if self.width:
            top = logprobs.topk(self.width, dim=-1)  # sorted, most likely first
            parts += [top.values.double().flatten(), top.indices.double().flatten()]
        return torch.cat(parts)

    def unpack(self, values: list[float], tokens: list[int]) -> list[TokenLogprobs | None]:
        """values: `self.values(...)` as a host list; tokens: the batch's sampled ids (host)."""
        w, width = len(self.rows), self.width
        out: list[TokenLogprobs | None] = [None] * len(tokens)
        for j, (row, n) in enumerate(zip(self.rows, self.tops)):
            if tokens[row] < 0:  # NaN logits: the sequence fails, there is nothing to report
                continue
            k, start, ids = min(n, width), w + j * width, w + (w + j) * width
            top = tuple((int(t), v) for t, v in zip(values[ids : ids + k], values[start : start + k]))
            out[row] = TokenLogprobs(tokens[row], values[j], top)
        return out

    def _index(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """The asking rows as a device index; None when every row asks. Staged in pinned memory
        on a GPU so that the copy does not wait for the stream (no host sync)."""
        return None if len(self.rows) == batch else to_device(self.rows, torch.int64, device)
