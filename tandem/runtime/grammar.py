"""Structured output: a request's text held to a JSON schema (or to any JSON value) by masking the
logits at every step to the tokens that keep the text valid.

The grammar engine is llguidance (compiled JSON schemas over the model's own tokenizer, a token
mask in ~50 us on one core). A request carries its grammar as llguidance's grammar text
(`json_grammar`), checked when the request is made; the Engine gives each constrained sequence a
`Constraint` (`Grammars.constraint`). Per step, for the constrained rows that sample:
    Constraint.fill(bitmask, row)  host, int32 [rows, ceil(V / 32)], one bit per token id
    -> apply_masks(logits, rows, bitmask)  one copy to the logits' device, masked_fill: no sync
    -> sample -> Constraint.advance(token) -> `done` once the grammar is complete (the sequence
       then finishes with reason 'stop', as at eos).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch

from tandem.errors import TandemError
from tandem.ops.staging import to_device



def _llguidance():
    try:
        import llguidance
    except ImportError:  # a dependency of tandem; missing only in a hand-made environment
        raise TandemError("structured output needs the llguidance package: pip install llguidance") from None
    return llguidance


# JSON as json.dumps writes it (", " and ": ", no other whitespace): free whitespace lets a model
# pad its output with newlines until max_tokens, which weak and random models do. A schema's own
# "x-guidance" options override these.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_grammar(schema: dict[str, Any] | None) -> str:
    """llguidance's grammar for JSON text that follows `schema` (None: any JSON object), checked;
    TandemError naming the problem when the schema cannot be compiled."""
    llg = _llguidance()
    if schema is not None and not isinstance(schema, dict):
        raise TandemError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                         defaults=JSON_STYLE)
    except (ValueError, TypeError) as e:
        raise TandemError(f"the JSON schema cannot be used: {e}") from None
    check_grammar(grammar)
    return grammar


def lark_grammar(lark: str) -> str:
    """llguidance's grammar for a Lark-style grammar text (llguidance's dialect: `%json {schema}`
    embeds a JSON schema, `<[id]>` is one token by id), checked."""
    grammar = _llguidance().LLMatcher.grammar_from_lark(lark)
    check_grammar(grammar)
    return grammar


def check_grammar(grammar: str) -> None:
    """TandemError when llguidance rejects the grammar (without a tokenizer: the rules only)."""
    error = _llguidance().LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise TandemError(f"the output format cannot be used: {error}")


def bitmask_width(vocab: int) -> int:
    return (vocab + 31) // 32


class Grammars:
    """The model's tokenizer as llguidance sees it (built once, on the first constrained request:
    about a second for a 100K vocabulary) and the grammars compiled over it, each kept as a start
    state that a request's Constraint copies (the last MAX_COMPILED grammars).

    Compiling takes milliseconds to (for a large schema) a second. `prepare` does it on the
    caller's thread, so a server compiles a request's grammar on a worker thread before the
    request reaches the engine's thread, whose steps every running stream waits on. Thread-safe."""

    MAX_COMPILED = 32

    def __init__(self, tokenizer, vocab: int):
        """tokenizer: tandem.runtime.tokenizer.Tokenizer; vocab: the logits' width (the model's
        vocabulary, which may exceed the tokenizer's: ids past it are never allowed)."""
        self._tokenizer, self.vocab = tokenizer, vocab
        self._ll = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # grammar text -> matcher at its start
        self._lock = threading.Lock()

    def _ll_tokenizer(self):  # under self._lock
        if self._ll is None:
            llg = _llguidance()
            eos = sorted(self._tokenizer.eos_ids)
            if not eos:
                raise TandemError("structured output needs the model's end-of-sequence token, and its tokenizer "
                                  "names none: set eos_token_id in generation_config.json")
            try:
                self._ll = llg.LLTokenizer(self._tokenizer.backend_json(), n_vocab=self.vocab, eos_token=eos)
            except (ValueError, RuntimeError) as e:
                raise TandemError(f"structured output cannot read this model's tokenizer: {e}") from None
        return self._ll

    def prepare(self, grammar: str) -> None:
        """Compile `grammar` now (once), so that constraint() only copies its start state."""
        self._start(grammar)

    def _start(self, grammar: str):
        with self._lock:
            matcher = self._compiled.get(grammar)
            if matcher is not None:
                self._compiled.move_to_end(grammar)
                return matcher
            ll = self._ll_tokenizer()
        matcher = _llguidance().LLMatcher(ll, grammar, log_level=0)  # the slow part, outside the lock
        if matcher.is_error():
            raise TandemError(f"the output format cannot be used: {matcher.get_error()}")
        with self._lock:
            self._compiled[grammar] = matcher
            while len(self._compiled) > self.MAX_COMPILED:
                self._compiled.popitem(last=False)
        return matcher

    def constraint(self, grammar: str) -> Constraint:
        return Constraint(self._start(grammar).deep_copy())


class Constraint:
    """One sequence's place in its grammar."""

    def __init__(self, matcher):
        self._matcher = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """bitmask[row] = the tokens allowed next (host int32, contiguous rows)."""
        target = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)

    def advance(self, token: int) -> bool:
        """The sampled token enters the grammar; False for a token the mask did not allow (only a
        bug can sample one: the sequence must then fail rather than emit invalid output)."""
        return self._matcher.consume_token(token)

    @property
    def error(self) -> str:
        return self._matcher.get_error()

    @property
    def done(self) -> bool:
        """The text is complete: the grammar allows nothing but the end of the sequence."""
        return self._matcher.is_stopped()


def apply_masks(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """logits[rows[i]] = -inf wherever bitmask[i] has a 0 bit (in place, on the logits' device)."""
    if not rows:
        return
    V = logits.shape[1]
    bits = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1)[:, :V].bool()
    index = to_device(rows, torch.int64, logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def new_bitmask(rows: int, vocab: int) -> torch.Tensor:
    """A host bitmask for `rows` constrained rows (pinned where a GPU will read it)."""
    return torch.zeros(rows, bitmask_width(vocab), dtype=torch.int32, pin_memory=torch.cuda.is_available())

