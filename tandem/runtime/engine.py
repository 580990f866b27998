"""The one Engine behind `tandem chat`, `tandem generate`, the Python API and the server.

step(): Scheduler.schedule() -> Batch -> Runner.run() -> logits -> sample (tokens, and logprobs
for requests that ask; structured output's rows masked to their grammar, runtime/grammar.py) ->
Scheduler.update() -> per-sequence detokenization, stop checks, finish.
Callers add requests and pull StepOutputs. A step mixes decodes of running sequences with prompt
chunks of new ones (continuous batching); only sequences that sampled a token this step produce a
StepOutput. A step whose model call or sampling raises finishes only the sequences it blames
(StepFailed); the rest run on.

Look-ahead (on with CUDA graphs): when a decode step will most likely be followed by a decode
step of the same sequences, that next step is queued on the device with the sampled tokens still
there (Runner.run_next), before they are copied to the host; the host's work between the steps then
overlaps the model. The next step() uses its logits rows for the sequences still running (one
that ended, by a stop token or an abort, just drops its row) and only waits for it; requests that
arrive meanwhile join one step later. A step that feeds anything else discards it.
"""

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tandem.errors import NaNLogits, TandemError
from tandem.runtime.grammar import Constraint, Grammars, new_bitmask
from tandem.runtime.kv_cache import PagedKVCache
from tandem.runtime.logprobs import TokenLogprobs
from tandem.runtime.runner import Runner
from tandem.runtime.sampling import NAN_LOGITS, Sampled, SamplingParams, make_generator, sample_async
from tandem.runtime.scheduler import Batch, Scheduler, Sequence
from tandem.runtime.tokenizer import StopStrings, Tokenizer

log = logging.getLogger(__name__)


class StepFailed(Exception):
    """Engine.step() raised `error` while running the model or sampling. The sequences in `failed`
    are finished (reason 'error'); every other one is unchanged and continues in the next step."""

    def __init__(self, error: Exception, failed: list[int]):
        super().__init__(f"a step failed ({type(error).__name__}: {error}); finished sequences {failed}")
        self.error, self.failed = error, failed


@dataclass(frozen=True)
class StepOutput:
    seq_id: int
    token: int
    text: str  # new text ready to show (may be empty while a stop string or UTF-8 char is pending)
    finish_reason: str | None  # None while running; 'stop' (eos, stop token or string), 'length', or
    # 'error': the model's logits for this sequence were NaN (token is NAN_LOGITS, text empty)
    is_prefill: bool  # the token came out of the step that finished the prompt (the first token)
    logprobs: TokenLogprobs | None = None  # when the request's params ask (None with reason 'error')
    # the token is the eos or stop token id that ended the sequence: no text of the answer (APIs show no logprob)
    ended_by_token: bool = False


class _Detok:
    """Per-sequence streaming text state."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]):
        self.decoder = tokenizer.stream_decoder()
        self.stops = StopStrings(stops)

    def finish(self) -> str:
        """The text still held back (partial UTF-8, a possible stop-string prefix) at the end."""
        return self.stops.feed(self.decoder.flush())[0] + self.stops.flush()


class _Ahead:
    """A decode step queued before the previous step's tokens reached the host (Engine.step)."""

    def __init__(self, batch: Batch, logits: torch.Tensor):
        self.seqs = list(batch.seqs)
        self.positions = [s.num_cached + 1 for s in batch.seqs]  # where each fed token sits
        self.tokens: list[int] | None = None  # the fed tokens, once on the host
        self.logits = logits

    def logits_for(self, batch: Batch) -> torch.Tensor | None:
        """Its logits rows for `batch`, if `batch` is a decode step of some of its sequences (in
        its order: the others ended) feeding what it fed where it fed it; else None."""
        if self.tokens is None or not batch.is_decode:
            return None
        row = {id(s): i for i, s in enumerate(self.seqs)}
        rows = [row.get(id(s), -1) for s in batch.seqs]
        if min(rows, default=-1) < 0 or rows != sorted(rows):
            return None
        for i, s, fed in zip(rows, batch.seqs, batch.new_tokens):
            if s.num_cached != self.positions[i] or fed[0] != self.tokens[i]:
                return None
        if len(rows) == len(self.seqs):
            return self.logits
        return self.logits[torch.tensor(rows, device=self.logits.device)]


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        *,
        max_context: int,
        max_batch: int = 8,
        block_size: int = 16,
        max_step_tokens: int = 512,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        cuda_graphs: bool = False,
        look_ahead: bool | None = None,
    ):
        self.model, self.tokenizer, self.max_context = model, tokenizer, max_context
        num_blocks = max_batch * -(-max_context // block_size)
        self.cache = PagedKVCache(model.cache_widths(), num_blocks, block_size, model.cache_dtype(dtype), device)
        self.scheduler = Scheduler(self.cache, max_batch, max_step_tokens)
        self.runner = Runner(model, self.cache, device, cuda_graphs=cuda_graphs, max_context=max_context)
        # Queue each decode step before the previous one's tokens reach the host, so the host's
        # work between steps (sampling's transfer, detokenizing, scheduling) overlaps the model's:
        # on by default with CUDA graphs (the host is then the gap between steps).
        self.look_ahead = cuda_graphs if look_ahead is None else look_ahead
        self._ahead: _Ahead | None = None
        self._ids = itertools.count()
        self._seqs: dict[int, Sequence] = {}
        self._detok: dict[int, _Detok] = {}
        # Structured output: the model's vocabulary (the logits' width) as the grammar engine sees it,
        # and each constrained sequence's place in its grammar.
        vocab = getattr(getattr(model, "cfg", None), "vocab_size", None) or tokenizer.vocab_size
        self.grammars = Grammars(tokenizer, vocab)
        self._constraints: dict[int, Constraint] = {}

    def add_request(self, prompt: list[int], params: SamplingParams) -> int:
        if not prompt:
            raise TandemError("the prompt is empty: give at least one token of text")
        if len(prompt) >= self.max_context:
            raise TandemError(
                f"the prompt has {len(prompt)} tokens but the context window is {self.max_context}; "
                "shorten the prompt or raise --max-context (up to the model's max_position_embeddings)"
            )
        vocab = self.tokenizer.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise TandemError(f"prompt token ids must be in 0..{vocab - 1}")
        if params.logit_bias and max(t for t, _ in params.logit_bias) >= vocab:
            raise TandemError(f"logit_bias token ids must be in 0..{vocab - 1}")
        constraint = self.grammars.constraint(params.grammar) if params.grammar is not None else None
        # Seeded requests sample on the logits' device, so their generator lives there too.
        seq = Sequence(next(self._ids), list(prompt), params, make_generator(params, self.runner.device))
        if constraint is not None:
            self._constraints[seq.seq_id] = constraint
        self._seqs[seq.seq_id] = seq
        self._detok[seq.seq_id] = _Detok(self.tokenizer, params.stop)
        self.scheduler.add(seq)
        return seq.seq_id

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, seq_id: int) -> None:
        seq = self._seqs.get(seq_id)
        self._forget(seq_id)
        if seq is not None and not seq.finished:
            self.scheduler.finish(seq, "abort")

    def _forget(self, seq_id: int) -> None:
        """Drop a finished or aborted sequence's per-request state."""
        self._seqs.pop(seq_id, None)
        self._detok.pop(seq_id, None)
        self._constraints.pop(seq_id, None)

    def step(self) -> list[StepOutput]:
        ahead, self._ahead = self._ahead, None
        batch = self.scheduler.schedule(admit=ahead is None)
        if batch is None:
            return []
        seqs = batch.sampling  # the rest fed a middle chunk of their prompt: no logits, no output
        first = [not s.output for s in seqs]
        try:
            logits = ahead.logits_for(batch) if ahead is not None else None
            if logits is None:
                logits = self.runner.run(batch)
            sampled = Sampled([], [])
            if seqs:
                pending = sample_async(
                    logits,
                    [s.params for s in seqs],
                    [s.generator for s in seqs],
                    [s.tokens for s in seqs],
                    [len(s.prompt) for s in seqs],
                    self._masks(seqs, logits.shape[1]),
                )
                if self._reserve_look_ahead(batch):
                    self._ahead = _Ahead(batch, self.runner.run_next(batch, pending.tokens))
                sampled = pending.result()
                if self._ahead is not None:
                    self._ahead.tokens = sampled.tokens
        except Exception as e:  # noqa: BLE001 - handed on in StepFailed
            self._ahead = None
            raise self._fail_step(batch, e) from e
        self.scheduler.update(batch, sampled.tokens)
        return [self._emit(*row) for row in zip(seqs, sampled.tokens, first, sampled.logprobs)]

    def _reserve_look_ahead(self, batch: Batch) -> bool:
        """Queue the next decode step before this one's tokens reach the host? Only when it will
        most likely be the next step: every running sequence decodes now and none ends by length,
        nobody waits to join, and the cache has a slot for each one's next token (taken here)."""
        running = self.scheduler.running
        if not self.look_ahead or self.scheduler.waiting or len(batch.seqs) != len(running) or not batch.is_decode:
            return False
        if any(len(s.output) + 1 >= s.params.max_new_tokens or len(s.tokens) + 1 >= self.max_context
               for s in batch.seqs):
            return False
        need = sum(self.cache.blocks_for(len(s.tokens) + 1) - len(s.block_table) for s in batch.seqs)
        if need > self.cache.free_blocks:
            return False
        for s in batch.seqs:
            self.cache.grow(s.block_table, len(s.tokens) + 1)
        return True

    def _masks(self, seqs: list[Sequence], vocab: int) -> tuple[list[int], torch.Tensor] | None:
        """Structured output: the rows whose sequences are constrained and the tokens each may pick."""
        rows = [i for i, s in enumerate(seqs) if s.seq_id in self._constraints]
        if not rows:
            return None
        bitmask = new_bitmask(len(rows), vocab)
        for j, i in enumerate(rows):
            self._constraints[seqs[i].seq_id].fill(bitmask, j)
        return rows, bitmask

    def _fail_step(self, batch: Batch, error: Exception) -> StepFailed:
        """Finish the sequences a failed step blames: those that fed prompt tokens in it (a new
        prompt is what brings new shapes and lengths), or all of them in a decode-only step. Their
        state is as before the step, so the others simply run again in the next one."""
        blamed = [s for s in batch.seqs if not s.prefilled] or list(batch.seqs)
        for seq in blamed:
            self.scheduler.finish(seq, "error")
            self._forget(seq.seq_id)
        return StepFailed(error, [s.seq_id for s in blamed])

    def _emit(self, seq: Sequence, token: int, is_prefill: bool, logprobs: TokenLogprobs | None) -> StepOutput:
        p, detok = seq.params, self._detok[seq.seq_id]
        reason, text, by_token = None, "", False
        if token == NAN_LOGITS:
            seq.output.pop()  # not a token
            reason = "error"
        elif (not p.ignore_eos or seq.seq_id in self._constraints) and (
                token in self.tokenizer.eos_ids or token in p.stop_token_ids):
            # a constrained sequence's eos ends it whatever ignore_eos says: its grammar allowed the end
            reason, text, by_token = "stop", detok.finish(), True
        else:
            text, hit = detok.stops.feed(detok.decoder.push(token))
            constraint = self._constraints.get(seq.seq_id)
            if constraint is not None and not constraint.advance(token):  # a token the mask did not allow: a bug
                log.error("sequence %d: token %d broke its output format (%s); finishing it with an error",
                          seq.seq_id, token, constraint.error)
                reason, text = "error", ""
            elif hit:
                reason = "stop"
            elif constraint is not None and constraint.done:  # the grammar allows nothing more but eos
                reason = "stop"
                text += detok.finish()
            elif len(seq.output) >= p.max_new_tokens or len(seq.tokens) >= self.max_context:
                reason = "length"
                text += detok.finish()
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._forget(seq.seq_id)
        return StepOutput(seq.seq_id, token, text, reason, is_prefill, logprobs, by_token)

    def score(self, tokens: list[int]) -> torch.Tensor:
        """fp32 logits [len(tokens), V] of one teacher-forced pass (for perplexity); runs alone."""
        if self.has_work():
            raise TandemError("cannot score while requests are running; wait for them to finish")
        if not 0 < len(tokens) <= self.max_context:
            raise TandemError(f"can score 1..{self.max_context} tokens at once, got {len(tokens)}")
        seq = Sequence(-1, list(tokens), SamplingParams())
        self.cache.grow(seq.block_table, len(tokens))
        try:
            return self.runner.run(Batch([seq], [seq.prompt], is_prefill=True), all_logits=True)
        finally:
            self.cache.release(seq.block_table)

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[StepOutput]:
        """Run one request to completion, yielding its outputs (other requests advance too).
        Raises NaNLogits if the model's logits for it go NaN."""
        seq_id = self.add_request(prompt, params)
        try:
            while True:
                try:
                    outputs = self.step()
                except StepFailed as e:
                    if seq_id in e.failed:
                        raise e.error from None
                    continue  # another request's prompt failed; this one runs on
                for out in outputs:
                    if out.seq_id == seq_id:
                        if out.finish_reason == "error":
                            raise NaNLogits()
                        yield out
                        if out.finish_reason is not None:
                            return
        finally:
            self.abort(seq_id)
