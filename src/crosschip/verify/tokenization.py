"""Tokenization parity: the target must turn the prompt text into the ids the reference was trained on.

Scoring sends token ids, so it cannot see a serving stack that tokenizes text differently, yet users send text:
a tokenizer that drops the BOS training put before every document gives every request another distribution
(one model: " the" at -1.322 without BOS, -1.233 with it). So verify also sends the prompt texts as text:
- an in-process target is checked through its own tokenizer files (`tokenizer(text)`, as transformers, vLLM
  and lm-eval call it);
- an endpoint through what it echoes (`echo`, `logprobs`, vLLM's `return_tokens_as_token_ids`), or, when it
  echoes no ids, through the prompt token count in `usage`.
The expected ids are the reference tokenizer's; for a crosschip-trained reference, whose packer put BOS before
every document, they start with BOS even where an older tokenizer did not add it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from crosschip.verify.prompts import encode_text

MAX_TEXTS = 16  # texts checked: tokenization is deterministic, a few paragraphs cover the rules


@dataclass
class TokenizationResult:
    """Whether the target tokenizes the prompt texts as the reference expects."""

    method: str  # "tokenizer", "endpoint echo", "endpoint usage" or "skipped"
    checked: int
    mismatched: int
    reason: str  # what differs, in words (BOS missing, first differing token); why skipped
    first: dict[str, Any] | None = None  # {text, position, expected, got}

    @property
    def passed(self) -> bool | None:
        return None if self.method == "skipped" else self.mismatched == 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def expected_ids(text: str, tokenizer: Any, bos_trained: bool) -> list[int]:
    """The ids the reference model saw for `text` in training (BOS first when its packer added it)."""
    if bos_trained:
        return encode_text(text, tokenizer)
    return [int(t) for t in tokenizer(text)["input_ids"]]


def _name(tokenizer: Any, token: int | None) -> str:
    if token is None:
        return "nothing"
    text = tokenizer.convert_ids_to_tokens(int(token)) if tokenizer is not None else None
    return f"id {token} ({text!r})" if text is not None else f"id {token}"


def describe(expected: Sequence[int], got: Sequence[int], tokenizer: Any) -> tuple[str, dict[str, Any]]:
    """What differs between two tokenizations of one text, in words, and where."""
    bos = getattr(tokenizer, "bos_token_id", None)
    expected, got = list(expected), list(got)
    if bos is not None and expected[:1] == [bos] and expected[1:] == got:
        return f"the target does not add BOS ({_name(tokenizer, bos)}) that the reference's tokenization starts " \
               "with", {"position": 0, "expected": bos, "got": got[0] if got else None}
    if bos is not None and got[:1] == [bos] and got[1:] == expected:
        return f"the target adds a BOS ({_name(tokenizer, bos)}) that the reference's tokenization does not " \
               "have", {"position": 0, "expected": expected[0] if expected else None, "got": bos}
    pos = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), min(len(expected),
                                                                                                len(got)))
    want = expected[pos] if pos < len(expected) else None
    have = got[pos] if pos < len(got) else None
    return (f"first difference at token {pos}: expected {_name(tokenizer, want)}, got {_name(tokenizer, have)}",
            {"position": pos, "expected": want, "got": have})


def compare_tokenizations(texts: Sequence[str], expected: Sequence[Sequence[int]], got: Sequence[Sequence[int]],
                          tokenizer: Any, method: str) -> TokenizationResult:
    """Count the texts whose ids differ and describe the first one."""
    mismatched, reason, first = 0, "identical ids for every text", None
    for i, (text, want, have) in enumerate(zip(texts, expected, got, strict=True)):
        if list(want) == list(have):
            continue
        mismatched += 1
        if first is None:
            reason, where = describe(want, have, tokenizer)
            first = {"text": i, "preview": text[:60], **where}
    return TokenizationResult(method, len(texts), mismatched, reason, first)


def compare_counts(texts: Sequence[str], expected: Sequence[Sequence[int]], counts: Sequence[int],
                   tokenizer: Any) -> TokenizationResult:
    """The fallback for an endpoint that echoes no ids: prompt token counts from `usage`."""
    mismatched, reason, first = 0, "the same prompt token count for every text", None
    bos = getattr(tokenizer, "bos_token_id", None)
    for i, (text, want, n) in enumerate(zip(texts, expected, counts, strict=True)):
        if len(want) == n:
            continue
        mismatched += 1
        if first is None:
            first = {"text": i, "preview": text[:60], "expected_count": len(want), "got_count": n}
            missing_bos = bos is not None and want[:1] == [bos] and n == len(want) - 1
            reason = (f"the endpoint counts {n} prompt tokens where the reference has {len(want)}"
                      + (" (BOS not added?)" if missing_bos else ""))
    return TokenizationResult("endpoint usage", len(texts), mismatched, reason, first)


def check_tokenizer(texts: Sequence[str], ref_tokenizer: Any, target_tokenizer: Any | None,
                    bos_trained: bool) -> TokenizationResult:
    """An in-process target's own tokenizer against the reference's expectation."""
    texts = list(texts)[:MAX_TEXTS]
    if target_tokenizer is None:
        return TokenizationResult("skipped", 0, 0, "the target has no tokenizer files (it takes the reference's)")
    expected = [expected_ids(t, ref_tokenizer, bos_trained) for t in texts]
    got = [[int(x) for x in target_tokenizer(t)["input_ids"]] for t in texts]
    return compare_tokenizations(texts, expected, got, ref_tokenizer, "tokenizer")


def check_endpoint(texts: Sequence[str], ref_tokenizer: Any, endpoint: Any, bos_trained: bool) -> TokenizationResult:
    """An endpoint's tokenization of the texts (sent as text) against the reference's expectation."""
    from crosschip.verify.sides import MetricUnavailable

    texts = list(texts)[:MAX_TEXTS]
    expected = [expected_ids(t, ref_tokenizer, bos_trained) for t in texts]
    try:
        echoed = [endpoint.echo_ids(t) for t in texts]
    except MetricUnavailable as e:
        return TokenizationResult("skipped", 0, 0, f"the endpoint refused text prompts with echo ({e})")
    if all(ids is not None for ids, _ in echoed):
        return compare_tokenizations(texts, expected, [ids for ids, _ in echoed], ref_tokenizer, "endpoint echo")
    if all(count for _, count in echoed):
        return compare_counts(texts, expected, [int(c) for _, c in echoed], ref_tokenizer)
    return TokenizationResult("skipped", 0, 0, "the endpoint echoes no token ids and reports no prompt token count")

