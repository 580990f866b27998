"""OpenAI `logprobs` objects from the runtime's TokenLogprobs (one per generated token).

Chat: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": null}`.
Completions (legacy): `{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`.

A token's string is its text decoded alone (`Tokenizer.decode([id])`) and `bytes` that text's
UTF-8 bytes. A token holding only part of a multi-byte character decodes to U+FFFD; for it,
`bytes` are the raw bytes from the vocabulary (byte-level BPE symbols, or SentencePiece's
`<0xNN>` byte tokens) and the string escapes them (`"\\xe2\\x80"`), as the OpenAI API does, so
that joining the `bytes` of consecutive tokens gives the text's UTF-8. Logprobs that are not
finite (overflowed logits) are reported as -9999.0, OpenAI's "very unlikely": JSON has no -inf.
"""

from __future__ import annotations

import codecs
import math
import re
from typing import Any

from tandem.runtime.logprobs import TokenLogprobs
from tandem.runtime.tokenizer import Tokenizer

UNLIKELY = -9999.0
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


class TokenPieces:
    """token id -> (string, raw bytes), remembered per id. Use from one thread (the event loop)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._known: dict[int, tuple[str, bytes]] = {}
        self._byte_level = _byte_level_symbols()

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        piece = self._known.get(token_id)
        if piece is None:
            piece = self._known[token_id] = self._piece(token_id)
        return piece

    def _piece(self, token_id: int) -> tuple[str, bytes]:
        text = self._tokenizer.decode([token_id])
        if "\ufffd" in text:
            raw = self._vocabulary_bytes(token_id)
            # Trust the vocabulary's bytes only when they decode to what the tokenizer printed.
            if raw is not None and raw.decode("utf-8", errors="replace") == text:
                return raw.decode("utf-8", errors="backslashreplace"), raw
        return text, text.encode("utf-8")

    def _vocabulary_bytes(self, token_id: int) -> bytes | None:
        symbol = self._tokenizer.id_to_token(token_id)
        if symbol is None:
            return None
        if match := _BYTE_TOKEN.fullmatch(symbol):
            return bytes([int(match.group(1), 16)])
        if symbol and all(c in self._byte_level for c in symbol):
            return bytes(self._byte_level[c] for c in symbol)
        return None


def chat_logprobs(pieces: TokenPieces, entries: list[TokenLogprobs]) -> dict[str, Any]:
    """`choices[i].logprobs` of a chat completion (or of one chunk: its tokens only)."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = pieces(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(raw)}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]}
                        for e in entries],
            "refusal": None}


class CompletionLogprobs:
    """`choices[i].logprobs` of a legacy completion, chunk after chunk: text_offset counts characters
    of the generated text from its start, continuing over the chunks of one stream."""

    def __init__(self, pieces: TokenPieces):
        self._pieces = pieces
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = 0

    def __call__(self, entries: list[TokenLogprobs]) -> dict[str, Any]:
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for e in entries:
            text, raw = self._pieces(e.token)
            tokens.append(text)
            token_logprobs.append(_finite(e.logprob))
            # The N most likely, and the chosen token whether or not among them (up to N + 1 entries).
            top: dict[str, float] = {}
            for token_id, logprob in (*e.top, (e.token, e.logprob)):
                top.setdefault(self._pieces(token_id)[0], _finite(logprob))
            tops.append(top)
            offsets.append(self._start(raw))
            self._offset += len(self._utf8.decode(raw))
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


    def _start(self, raw: bytes) -> int:
        """The character offset where a token of these bytes starts: a token that continues a
        character begun by the tokens before it gets that character's offset; otherwise bytes
        still held back never completed a character and show as U+FFFD before it."""
        held = self._utf8.getstate()[0]
        if held and (not raw or 0x80 <= raw[0] <= 0xBF):
            return self._offset
        return self._offset + len(held.decode("utf-8", errors="replace"))


def _finite(value: float) -> float:
    return value if math.isfinite(value) else UNLIKELY


def _byte_level_symbols() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): printable Latin-1 bytes stand for themselves, the
    other bytes for the characters from U+0100 on, in byte order. symbol -> byte."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[chr(byte)] = byte
        else:
            symbols[chr(0x100 + shifted)] = byte
            shifted += 1
    return symbols
