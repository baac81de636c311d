"""Text-side helpers for serving: token strings/bytes for logprobs, and stop strings over a token stream.

Byte-level BPE tokens can be fragments of a UTF-8 character, so a token's *text* is not always
printable: OpenAI reports such tokens as `bytes:\\xe6\\x97` and gives the raw bytes in chat logprobs.
Stop strings are matched on the detokenized text (`TextStreamer`), holding back any tail that
could still become a stop string so a streamed response never shows part of one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from crosschip.generate import TextStreamer

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte-fallback pieces


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of each byte -> byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
    return "ByteLevel" in kinds


class TokenText:
    """Per-token raw bytes and display strings, cached (the vocabulary is fixed)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = self._compute_bytes(token_id)
        return cached

    def _compute_bytes(self, token_id: int) -> bytes:
        piece = self._tok.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if token_id in self._special:
            return piece.encode("utf-8")
        decoder = _byte_decoder()
        if self._byte_level and all(ch in decoder for ch in piece):
            return bytes(decoder[ch] for ch in piece)
        match = _BYTE_FALLBACK.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def text(self, token_id: int) -> str:
        """The token as text, or OpenAI's `bytes:\\xNN...` form when it is not valid UTF-8 on its own."""
        raw = self.bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def token_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[list[int], str]:
    """Char offset of each token in the decoded text, and that text (incremental, UTF-8 safe)."""
    streamer = TextStreamer(tokenizer)
    text, offsets = "", []
    for token_id in ids:
        offsets.append(len(text))
        text += streamer.push(token_id)
    return offsets, text + streamer.flush()


class StopTracker:
    """Incremental detokenization of one sequence with stop strings.

    `text` is everything decoded so far, cut before the first stop string once one appears
    (`stopped`). `release()` returns the new text that is safe to send: it withholds a tail that
    is a prefix of some stop string until the next tokens settle it.
    """

    def __init__(self, tokenizer: Any, context_ids: Sequence[int], stops: Sequence[str]) -> None:
        self._streamer = TextStreamer(tokenizer, context_ids=context_ids)
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self.released = 0
        self.stopped = False
        self.finished = False

    def push(self, token_id: int) -> int:
        """Add a token; returns its char offset in `text` (where its text starts)."""
        offset = len(self.text)
        self.text += self._streamer.push(token_id)
        self._scan(offset)
        return offset

    def finish(self) -> None:
        """No more tokens: flush an incomplete character, then the held-back tail is final."""
        offset = len(self.text)
        self.text += self._streamer.flush()
        self._scan(offset)
        self.finished = True

    def _scan(self, new_from: int) -> None:
        if not self._stops or self.stopped:
            return
        lo = max(0, new_from - self._longest + 1)  # a stop string may straddle old and new text
        hits = [i for s in self._stops if (i := self.text.find(s, lo)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _held(self) -> int:
        for k in range(min(len(self.text), self._longest - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0

    def release(self) -> str:
        end = len(self.text) if self.stopped or self.finished else len(self.text) - self._held()
        piece = self.text[self.released : end] if end > self.released else ""
        self.released = max(self.released, end)
        return piece
