"""Incremental detokenization and stop-string matching for streamed generation."""

from __future__ import annotations

import re
from typing import Sequence

from tokenizers import Tokenizer, decoders

REPLACEMENT_CHAR = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>\Z")  # a byte-fallback piece (SentencePiece)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character standing for each byte, to its byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = dict(zip(kept, kept))
    for byte in range(256):
        if byte not in chars:
            chars[byte] = 256 + len(chars) - len(kept)
    return {chr(char): byte for byte, char in chars.items()}


_BYTE_LEVEL = _byte_level_alphabet()


class TokenText:
    """What one token stands for, alone: ``bytes`` (a piece of a multi-byte character is
    its own bytes, not U+FFFD) and ``text``, those bytes as UTF-8, or OpenAI's
    ``bytes:\\xNN`` spelling where they are not whole characters. Byte-level BPE pieces and
    byte-fallback pieces map to their bytes, special tokens to their spelling; any other
    tokenizer's piece is what it decodes to alone."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._special = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)

    def bytes(self, token_id: int) -> bytes:
        if token_id in self._special:
            return self._special[token_id].encode("utf-8")
        piece = self._tokenizer.id_to_token(token_id) or ""
        if self._byte_level and piece and all(ch in _BYTE_LEVEL for ch in piece):
            return bytes(_BYTE_LEVEL[ch] for ch in piece)
        fallback = _BYTE_PIECE.match(piece)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        return self._tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def text(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)


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
