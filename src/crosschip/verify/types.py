"""The data that flows between verify's parts: per-sequence scores, greedy runs, and the Side protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class TokenScores:
    """One side's view of one teacher-forced sequence of ids [i_0 .. i_T].

    Position t holds the distribution after reading ids[: t + 1], i.e. the prediction of ids[t + 1],
    so every tensor has T = len(ids) - 1 rows. Log-probabilities are natural-log, float32, CPU.
    """

    target_ids: torch.Tensor  # int64 [T]: ids[1:], the tokens actually in the text
    token_logprobs: torch.Tensor  # float32 [T]: log p(target_ids[t] | ids[: t + 1])
    top_ids: torch.Tensor  # int64 [T, K]: the K most likely tokens, most likely first
    top_logprobs: torch.Tensor  # float32 [T, K]: their log-probabilities (descending)
    logprobs: torch.Tensor | None = None  # float32 [T, V] full log-softmax; None where a side only has top-K


@dataclass
class GreedyRun:
    """A greedy (temperature 0) continuation of one prompt, with the top-N alternatives at each step."""

    prompt_ids: list[int]
    tokens: list[int]  # generated ids, at most max_new_tokens (stops early at EOS)
    top: list[dict[int, float]]  # per generated position: {token id: logprob} of the N most likely
    text: str = ""  # the decoded continuation, when the side has a tokenizer


@dataclass
class SideInfo:
    """What a side is, for the report and the parity certificate."""

    label: str  # e.g. "runs/demo/run@cpu:fp32", "http://127.0.0.1:8000/v1#demo", "ckpt (emulated ascend-310p)"
    kind: str  # "checkpoint" or "endpoint"
    identity: dict[str, Any]  # weight-file sha256s, device, dtype, emulation, runtime versions / url, model
    full_distribution: bool  # score() fills TokenScores.logprobs
    emulated: str | None = None  # target profile name when the side emulates a chip's numerics
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why this side cannot give it


class Side(Protocol):
    """One side of a comparison: an in-process checkpoint or a live OpenAI-compatible endpoint."""

    info: SideInfo

    def score(self, sequences: list[list[int]], top_k: int) -> list[TokenScores]:
        """Teacher-forced scores of each token-id sequence (each at least 2 ids long)."""
        ...

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, top_n: int) -> GreedyRun:
        """Greedy continuation of a prompt with the top-N logprobs at each generated position."""
        ...

    def close(self) -> None: ...
