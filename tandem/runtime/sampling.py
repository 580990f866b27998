"""Choosing the next token: sampling parameters, the model's defaults, and the sampler.

`sample(logits [B, V], params, generators, histories)` -> Sampled: B token ids, and for rows whose
params ask (`logprobs`), their log-probabilities (runtime/logprobs.py: the model's raw
distribution, before any of the steps below). Each row is processed in the order transformers
applies its logits processors, so results can be checked against it:

    logit bias -> repetition penalty (prompt + generated) -> presence / frequency penalty (generated only)
    -> temperature -> top-k -> top-p -> min-p -> softmax -> multinomial (per-request generator)

temperature 0 means greedy: argmax of the penalized logits. Each request samples with its own
`torch.Generator` (see `make_generator`), so a seeded request gives the same tokens whatever
else shares its batch. `sample_async` queues the same work and returns a PendingSample: the picks
as a device tensor (the engine feeds them to the next decode step before they reach the host,
runtime/engine.py) and `result()`, the one transfer to the host.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from tandem.errors import TandemError
from tandem.runtime.grammar import apply_masks, check_grammar
from tandem.runtime.logprobs import MAX_LOGPROBS, LogprobsPlan, TokenLogprobs
from tandem.ops.staging import to_device

log = logging.getLogger(__name__)


# Temperatures below this sample greedily (as vLLM): dividing logits by less overflows float32
# (1e-300 gives inf logits and NaN probabilities) and picks the argmax anyway.
MIN_TEMPERATURE = 1e-5
# repetition_penalty divides or multiplies logits: outside this range they overflow or vanish.
REPETITION_PENALTY_RANGE = (1e-2, 1e2)
# Stop strings per request and characters per stop string: each one is matched at every token on
# the engine's thread, so a request must not bring thousands (OpenAI allows 4).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
MAX_LOGIT_BIAS = 300  # token ids a request may bias (OpenAI's limit)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when it stops. Defaults: greedy, 256 new tokens."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy; below MIN_TEMPERATURE too
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; HF/CTRL style, over prompt + generated tokens
    presence_penalty: float = 0.0  # OpenAI style, over generated tokens
    frequency_penalty: float = 0.0  # OpenAI style, over generated tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; N = the chosen token's logprob and the N most likely
    grammar: str | None = None  # structured output: llguidance grammar text (runtime/grammar.py's json_grammar)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), OpenAI's; a dict is taken too

    def __post_init__(self) -> None:
        # Accept a single stop string or lists (as JSON requests carry them); store tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        for name in ("stop", "stop_token_ids"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias.items())))

        _require(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
                 f"max_new_tokens={self.max_new_tokens!r} is invalid: use an integer >= 1.")
        _require(_is_real(self.temperature) and self.temperature >= 0,
                 f"temperature={self.temperature!r} is out of range: use a number >= 0 (0 = greedy).")
        if self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)
        _require(_is_int(self.top_k) and self.top_k >= 0,
                 f"top_k={self.top_k!r} is out of range: use an integer >= 0 (0 = off).")
        _require(_is_real(self.top_p) and 0 < self.top_p <= 1,
                 f"top_p={self.top_p!r} is out of range: use a number in (0, 1] (1 = off).")
        _require(_is_real(self.min_p) and 0 <= self.min_p <= 1,
                 f"min_p={self.min_p!r} is out of range: use a number in [0, 1] (0 = off).")
        lo, hi = REPETITION_PENALTY_RANGE
        _require(_is_real(self.repetition_penalty) and lo <= self.repetition_penalty <= hi,
                 f"repetition_penalty={self.repetition_penalty!r} is out of range: use a number in [{lo:g}, {hi:g}] "
                 "(1 = off).")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(_is_real(value) and -2 <= value <= 2,
                     f"{name}={value!r} is out of range: use a number in [-2, 2] (0 = off).")
        _require(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
                 f"seed={self.seed!r} is invalid: use an integer in [0, 2**63) or leave it unset.")
        _require(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
                 f"stop={self.stop!r} is invalid: use a list of non-empty strings.")
        _require(len(self.stop) <= MAX_STOP_STRINGS and all(len(s) <= MAX_STOP_CHARS for s in self.stop),
                 f"stop has {len(self.stop)} string(s) of up to {max(map(len, self.stop), default=0)} characters: "
                 f"use at most {MAX_STOP_STRINGS}, each of at most {MAX_STOP_CHARS} characters.")
        _require(isinstance(self.stop_token_ids, tuple) and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
                 f"stop_token_ids={self.stop_token_ids!r} is invalid: use a list of token ids >= 0.")
        _require(isinstance(self.ignore_eos, bool), f"ignore_eos={self.ignore_eos!r} is invalid: use true or false.")
        _require(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
                 f"logprobs={self.logprobs!r} is out of range: use an integer in [0, {MAX_LOGPROBS}] (the number of "
                 "most likely alternatives to report beside the chosen token) or leave it unset.")
        _require(isinstance(self.logit_bias, tuple) and len(self.logit_bias) <= MAX_LOGIT_BIAS
                 and all(isinstance(e, tuple) and len(e) == 2 and _is_int(e[0]) and e[0] >= 0 and _is_real(e[1])
                         and -100 <= e[1] <= 100 for e in self.logit_bias)
                 and len({e[0] for e in self.logit_bias}) == len(self.logit_bias),
                 f"logit_bias={self.logit_bias!r} is invalid: use up to {MAX_LOGIT_BIAS} distinct token ids >= 0, "
                 "each with a bias in [-100, 100].")
        if self.grammar is not None:
            _require(isinstance(self.grammar, str), f"grammar={self.grammar!r} is invalid: use grammar text.")
            check_grammar(self.grammar)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def load_generation_defaults(model_dir: str | Path) -> dict[str, Any]:
    """SamplingParams fields recommended by the model's generation_config.json ({} if absent);
    an invalid value is left out with a warning naming the file (a broken file is an error).

    Reads temperature, top_p, top_k and repetition_penalty. An explicit `do_sample: false`
    means greedy (temperature 0). When do_sample is absent we still take the temperature,
    unlike transformers (whose do_sample defaults to false): the file states what the
    authors recommend, and that is what users of a chat engine expect.
    """
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TandemError(f"cannot parse {path} ({e}): re-download it or delete it to use tandem's defaults.") from e
    if not isinstance(config, dict):
        raise TandemError(f"{path} is not a JSON object: re-download it or delete it to use tandem's defaults.")

    defaults: dict[str, Any] = {}
    for name, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("repetition_penalty", float)):
        value = config.get(name)
        if _is_real(value):
            defaults[name] = kind(value)
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return valid_defaults({name: (name, value) for name, value in defaults.items()}, str(path))


def valid_defaults(found: dict[str, tuple[str, Any]], where: str) -> dict[str, Any]:
    """The sampling values a model file recommends (found: its key -> (SamplingParams field, value))
    that SamplingParams takes, each checked alone so a bad one leaves the others in use. A bad one
    is a recommendation only, the model runs without it: a warning naming `where`, the key and the
    value, not an error."""
    out: dict[str, Any] = {}
    for key, (field, value) in found.items():
        try:
            SamplingParams(**{field: value})
        except TandemError as e:
            log.warning("%s: %s = %r is not a valid %s (%s); ignored: tandem's default is used", where, key, value,
                        field, e)
            continue
        out[field] = value
    return out


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The request's own random generator, seeded from params.seed; None (global RNG) if unseeded.

    Create it once per request and pass it to every `sample` call, so the stream continues.
    """
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


NAN_LOGITS = -1  # sample()'s token for a row of logits holding NaN


@dataclass(frozen=True)
class Sampled:
    tokens: list[int]  # one per row; NAN_LOGITS for a row holding NaN
    logprobs: list[TokenLogprobs | None]  # one per row; None where the row's params did not ask


class PendingSample:
    """A step's picks, queued on the logits' device and not yet on the host: `tokens` [B] int64
    (NAN_LOGITS for a broken row) can feed the next step's model call before `result()` waits.
    On a GPU their copy to the host is queued at once (pinned memory, an event): work queued after
    it, such as that next step, does not delay it."""

    def __init__(self, tokens: torch.Tensor, plan: LogprobsPlan | None, values: torch.Tensor):
        self.tokens, self._plan, self._values, self._copied = tokens, plan, values, None
        if values.is_cuda:
            self._values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._values.copy_(values, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(values.device))

    def result(self) -> Sampled:
        """The picks on the host (one transfer: tokens, and the logprobs rows that asked)."""
        if self._copied is not None:
            self._copied.synchronize()
        batch = self.tokens.shape[0]
        if self._plan is None:
            return Sampled(self._values.tolist(), [None] * batch)
        host = self._values.tolist()
        tokens = [int(t) for t in host[:batch]]
        return Sampled(tokens, self._plan.unpack(host[batch:], tokens))


def sample(*args, **kwargs) -> Sampled:
    """sample_async(same arguments).result(): the picks on the host."""
    return sample_async(*args, **kwargs).result()


def sample_async(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    histories: Sequence[Sequence[int]],
    prompt_lens: Sequence[int] | None = None,
    masks: tuple[list[int], torch.Tensor] | None = None,
) -> PendingSample:
    """Pick one token per row of `logits` [B, V]; NAN_LOGITS for a row holding NaN (the model's
    output is broken: bad weights, or activations that overflowed into NaN), so its request can fail alone.
    Rows whose params set `logprobs` also get their TokenLogprobs; when none does, nothing extra runs.

    histories[i]: request i's prompt + generated token ids. The repetition penalty looks at all
    of them; presence and frequency penalties only at the generated ones, `histories[i][prompt_lens[i]:]`
    (the whole history when prompt_lens is None). generators[i] must live on logits' device.
    masks: (rows, bitmask) of structured output (runtime/grammar.py): those rows may only pick the
    tokens their bitmask row allows; applied first, to a copy (logprobs stay the raw model's).
    """
    batch, vocab = logits.shape
    if not len(params) == len(generators) == len(histories) == batch:
        raise ValueError(f"sample: {batch} logits rows but {len(params)} params, {len(generators)} generators, "
                         f"{len(histories)} histories")
    if prompt_lens is not None and len(prompt_lens) != batch:
        raise ValueError(f"sample: {batch} logits rows but {len(prompt_lens)} prompt_lens")

    logits = raw = logits.float()  # a copy only if it is not float32 already; penalties copy rows they change
    if masks is not None and masks[0]:
        logits = logits.clone()
        apply_masks(logits, *masks)
    rows, changed = [], False
    for i, p in enumerate(params):
        row = view = logits[i]
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias)
            row = row.index_add(0, to_device(ids, torch.int64, row.device), to_device(bias, row.dtype, row.device))
        if p.repetition_penalty != 1.0 and histories[i]:
            row = _repetition_penalty(row, histories[i], p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and histories[i]:
            generated = histories[i][prompt_lens[i]:] if prompt_lens is not None else histories[i]
            row = _presence_frequency_penalty(row, generated, p.presence_penalty, p.frequency_penalty)
        rows.append(row)
        changed = changed or row is not view
    if changed:
        logits = torch.stack(rows)  # [B, V]; without penalties the logits are used as they are

    chosen = logits.argmax(dim=-1)  # [B]; right for greedy rows, overwritten for sampled ones
    # argmax propagates NaN (it lands on a row's first NaN), so one gather finds the broken rows;
    # a +inf logit is an overflowed top logit, whose argmax is a fine draw.
    broken_rows = logits.gather(1, chosen[:, None])[:, 0].isnan()  # [B]
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        sub = [params[i] for i in sampled]
        temps = torch.tensor([p.temperature for p in sub], device=logits.device)
        scores = _filter(logits[sampled] / temps[:, None], sub)  # [S, V]
        probs = scores.softmax(dim=-1)
        # A row whose logits overflowed (inf / NaN probabilities) draws its argmax instead of
        # failing the whole batch's step (no host sync: the row becomes one-hot).
        broken = ~torch.isfinite(probs).all(dim=-1, keepdim=True)
        probs = probs.masked_fill_(broken, 0.0).scatter_add_(1, chosen[sampled][:, None], broken.to(probs.dtype))
        for j, i in enumerate(sampled):
            chosen[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    chosen = chosen.masked_fill_(broken_rows, NAN_LOGITS)
    plan = LogprobsPlan.of([p.logprobs for p in params], vocab)
    if plan is None:
        return PendingSample(chosen, None, chosen)  # one transfer for tokens and flags
    # One transfer for tokens, flags and logprobs (float64 holds every token id exactly).
    return PendingSample(chosen, plan, torch.cat([chosen.double(), plan.values(raw, chosen)]))


def _repetition_penalty(row: torch.Tensor, history: Sequence[int], penalty: float) -> torch.Tensor:
    # CTRL / transformers: each seen token once; positive logits shrink, negative ones grow.
    ids = torch.tensor(history, device=row.device).unique()
    seen = row[ids]
    row = row.clone()
    row[ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return row


def _presence_frequency_penalty(row: torch.Tensor, generated: Sequence[int], presence: float,
                                frequency: float) -> torch.Tensor:
    if not generated:
        return row
    counts = torch.bincount(torch.tensor(generated, device=row.device), minlength=row.shape[0])  # [V]
    return row - frequency * counts - presence * (counts > 0)


def _filter(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """top-k, then top-p, then min-p on temperature-scaled scores [S, V]; removed entries become -inf."""
    vocab = scores.shape[-1]
    device = scores.device
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(k < vocab for k in top_k):
        kth = scores.topk(max(top_k), dim=-1).values  # [S, max_k], descending
        index = torch.tensor(top_k, device=device)[:, None] - 1
        # Ties with the k-th value are kept, as in transformers.
        scores = scores.masked_fill(scores < kth.gather(1, index), -math.inf)

    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
        ascending, order = scores.sort(dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        # Drop the low tail whose total mass stays within 1 - top_p; never the most likely token.
        drop = (cumulative <= 1 - top_p) & (top_p < 1.0)
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -math.inf)

    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
        probs = scores.softmax(dim=-1)
        # min_p <= 1, so the most likely token always survives.
        drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
        scores = scores.masked_fill(drop, -math.inf)
    return scores


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise TandemError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (10**400)
        return False

