"""Split DeepSeek-R1 style output, `<think>reasoning</think>answer`, into reasoning and content.

Works on streamed text pieces: a tag may arrive split over several pieces, so text that could be
the start of a tag is held back until the next piece settles it. A `<think>` counts only at the
very start of the output (after whitespace); templates that already wrote `<think>` into the
prompt start the splitter inside the reasoning. The tags themselves are never emitted.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """True when the rendered prompt ends inside an open <think> block (R1-0528 style templates)."""
    return prompt_text.rstrip().endswith(OPEN)


class ReasoningSplitter:
    """feed(piece) -> (reasoning, content) ready to show; flush() releases what is held back."""

    def __init__(self, in_reasoning: bool = False):
        self._state = "reasoning" if in_reasoning else "start"
        self._held = ""

    @property
    def in_reasoning(self) -> bool:
        return self._state == "reasoning"

    def feed(self, piece: str) -> tuple[str, str]:
        text = self._held + piece
        self._held = ""
        if self._state == "start":
            stripped = text.lstrip()
            if stripped.startswith(OPEN):
                self._state = "reasoning"
                text = stripped[len(OPEN):]
            elif OPEN.startswith(stripped):  # empty or a partial "<thi": wait for more
                self._held = text
                return "", ""
            else:
                self._state = "content"
        if self._state == "content":
            return "", text
        # In the reasoning: find the closing tag, or hold back a suffix that may begin it.
        end = text.find(CLOSE)
        if end >= 0:
            self._state = "content"
            return text[:end], text[end + len(CLOSE):]
        keep = _partial_suffix(text, CLOSE)
        self._held = text[len(text) - keep:]
        return text[: len(text) - keep], ""

    def flush(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        return (held, "") if self._state == "reasoning" else ("", held)


def _partial_suffix(text: str, tag: str) -> int:
    # Longest suffix of `text` that is a proper prefix of `tag`.
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
