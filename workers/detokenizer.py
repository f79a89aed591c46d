"""Incremental detokenization and stop-string matching for streamed generation."""

from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces.

    ``push`` returns only text that is complete: while the decoded tail ends with U+FFFD (a
    multi-byte character still missing bytes) it returns ``""`` and holds the tokens back.
    Decoding re-reads a short window from ``prefix_offset`` so that tokenizers whose pieces
    depend on their neighbours (leading spaces, byte fallback) decode as they would in full.
    ``text`` is everything returned so far. ``flush`` ends the stream: it returns what is still
    held back, decoded as the tokenizer decodes it (U+FFFD for a character whose bytes never
    all came), so that ``text`` is the decode of every token pushed.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        new = self._held_text()
        if not new or new.endswith(REPLACEMENT_CHAR):
            return ""
        return self._give(new)

    def flush(self) -> str:
        return self._give(self._held_text())

    def _held_text(self) -> str:
        """The text of the tokens pushed since the last piece given out, as decoded in the
        window from ``prefix_offset``."""
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset])
        return self._tokenizer.decode(self._ids[self._prefix_offset:])[len(prefix):]

    def _give(self, new: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += new
        return new


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest occurrence of any stop string at or after ``start``, or -1."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found, default=-1)


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper start of some stop string:
    the text a stream must hold back because the next token may complete a stop."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
