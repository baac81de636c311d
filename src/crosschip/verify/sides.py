"""The two kinds of verify side: a checkpoint run in-process, and a live OpenAI-compatible endpoint.

`--ref` / `--target` text is parsed by `parse_side`:
  CKPT[@DEVICE][:DTYPE]            e.g. runs/demo/run, ckpt@cuda:1:bf16, ckpt@npu:0, ckpt:fp16
  http(s)://HOST:PORT/v1[#MODEL]   crosschip serve, vLLM, vllm-ascend, MindIE, ...

A checkpoint side gives the full distribution at every position. An endpoint side is scored the
way lm-eval-harness scores OpenAI-compatible servers: a completions request with the token ids as
prompt, `echo=true`, `logprobs=K` and `max_tokens=1` returns the prompt's logprobs; vLLM's
`return_tokens_as_token_ids` makes every token an exact id ("token_id:123"). What an endpoint
cannot give is recorded in `info.unavailable` and raised as `MetricUnavailable`, so the caller can
compute the rest.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import torch

from crosschip.errors import CrosschipError
from crosschip.verify.types import GreedyRun, Side, SideInfo, TokenScores

DTYPES = ("fp32", "bf16", "fp16")
DEFAULT_DEVICE = "cpu"  # the fp32 CPU run is the golden reference; accelerators are asked for by name
BATCH_TOKENS = 4096  # padded tokens per teacher-forced forward (batch x longest sequence)
MAX_ENDPOINT_LOGPROBS = 20  # OpenAI's cap on (top_)logprobs; vLLM's default max_logprobs is the same
TEACHER_FORCED_METRICS = ("kl", "top1", "top5", "ppl_ratio")  # what echo + prompt logprobs feed
GREEDY_METRICS = ("greedy",)
TOKENIZATION_METRICS = ("tokenization",)
TOKEN_IDS_FIELD = "return_tokens_as_token_ids"
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")
_DTYPE_SUFFIX = re.compile(r":(fp32|bf16|fp16)$")
_SIDE_FORMS = "CKPT[@DEVICE][:DTYPE] (DEVICE like cpu, cuda:1, npu:0; DTYPE fp32, bf16 or fp16) or http://HOST:PORT/v1"


class MetricUnavailable(CrosschipError):
    """A side cannot give what some metrics need; they are also recorded in the side's `info.unavailable`."""

    def __init__(self, metrics: Sequence[str], problem: str, fix: str | None = None) -> None:
        self.metrics = tuple(metrics)
        super().__init__(problem, fix)


# ---------------------------------------------------------------- parsing --ref / --target


@dataclass(frozen=True)
class SideSpec:
    """A parsed side: a checkpoint (path, device, dtype) or an endpoint (url, model)."""

    kind: Literal["checkpoint", "endpoint"]
    path: Path | None
    device: str  # "" for endpoints
    dtype: str | None  # None: the caller's default
    url: str | None  # ends with /v1
    model: str | None  # None: the first model the endpoint lists

    def __str__(self) -> str:
        if self.kind == "endpoint":
            return f"{self.url}#{self.model}" if self.model else str(self.url)
        return f"{self.path}@{self.device}" + (f":{self.dtype}" if self.dtype else "")


def _parse_endpoint(text: str) -> SideSpec:
    url, _, model = text.partition("#")
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if not parts.hostname:
        raise CrosschipError(f"endpoint {text!r} has no host", "write http://HOST:PORT/v1[#MODEL]")
    if not path.endswith("/v1"):
        base = f"{parts.scheme}://{parts.netloc}"
        suggestion = base + (path[: path.index("/v1") + 3] if "/v1" in path else path + "/v1")
        raise CrosschipError(
            f"endpoint URL {url} does not end with /v1 (the OpenAI API root)",
            f"use {suggestion}" + (f"#{model}" if model else ""),
        )
    root = f"{parts.scheme}://{parts.netloc}{path}"
    return SideSpec("endpoint", None, "", None, root, model or None)


def _split_device(rest: str) -> tuple[str, str]:
    """(path, device) of `CKPT[@DEVICE]`; a path may itself contain '@' when no device follows."""
    from crosschip.devices import parse_device

    path, at, device = rest.rpartition("@")
    if not at:
        return rest, DEFAULT_DEVICE
    try:
        return path, str(parse_device(device))
    except CrosschipError as e:
        if Path(rest).exists():  # e.g. "runs/exp@2024": the '@' belongs to the path
            return rest, DEFAULT_DEVICE
        raise CrosschipError(f"cannot parse side {rest!r}: {device!r} is not a device", f"write {_SIDE_FORMS}") from e


def parse_side(text: str) -> SideSpec:
    """Parse a `--ref` / `--target` value (see the module docstring); a checkpoint path must exist."""
    text = text.strip()
    if not text:
        raise CrosschipError("empty side", f"write {_SIDE_FORMS}")
    if text.lower().startswith(("http://", "https://")):
        return _parse_endpoint(text)
    match = _DTYPE_SUFFIX.search(text)
    dtype = match.group(1) if match else None
    path_text, device = _split_device(text[: match.start()] if match else text)
    path = Path(path_text)
    if not path.exists():
        raise CrosschipError(f"checkpoint {path} does not exist", f"pass an existing checkpoint as {_SIDE_FORMS}")
    return SideSpec("checkpoint", path, device, dtype, None, None)


# ---------------------------------------------------------------- shared helpers


def plan_batches(lengths: Sequence[int], max_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Consecutive groups of sequence indices whose padded size (count x longest) fits `max_tokens`.

    Order is kept, so batch outputs concatenate back in sequence order; a longer sequence than
    `max_tokens` gets a batch of its own.
    """
    batches: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        if batches and (len(batches[-1]) + 1) * max(longest, n) <= max_tokens:
            batches[-1].append(i)
            longest = max(longest, n)
        else:
            batches.append([i])
            longest = n
    return batches


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both int64 [B, L]: right padding leaves positions 0..n-1 unchanged."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def token_scores(ids: Sequence[int], logprobs: torch.Tensor, top_k: int) -> TokenScores:
    """TokenScores of one sequence from its full log-softmax rows (float32 [len(ids) - 1, V], CPU)."""
    target = torch.as_tensor(list(ids[1:]), dtype=torch.long)  # [T]
    top = torch.topk(logprobs, min(top_k, logprobs.shape[-1]), dim=-1)  # sorted, most likely first
    return TokenScores(
        target_ids=target,
        token_logprobs=logprobs.gather(1, target[:, None]).squeeze(1),
        top_ids=top.indices,
        top_logprobs=top.values,
        logprobs=logprobs,
    )


def _per_sequence(logits_batches: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """[L, V] logits of each sequence from a mix of [L, V] (one sequence) and [B, L, V] (a batch)."""
    for logits in logits_batches:
        if logits.ndim == 2:
            yield logits
        elif logits.ndim == 3:
            yield from logits.unbind(0)
        else:
            raise ValueError(f"logits must be [L, V] or [B, L, V], got {tuple(logits.shape)}")


def _check_sequences(sequences: Sequence[Sequence[int]]) -> None:
    short = [i for i, s in enumerate(sequences) if len(s) < 2]
    if short:
        raise CrosschipError(f"sequence {short[0]} has fewer than 2 tokens", "score sequences of 2 or more tokens")


# ---------------------------------------------------------------- in-process checkpoint


def _weight_sha256(ckpt: Any) -> dict[str, str]:
    """sha256 of each weight file: the manifest's (load_model verified it) or computed."""
    from crosschip.checkpoint import safe_member, sha256_file

    files = (ckpt.manifest or {}).get("files", {})
    out = {}
    for name in ckpt.files:
        known = files.get(name, {}).get("sha256") if isinstance(files.get(name), dict) else None
        out[name] = known or sha256_file(safe_member(ckpt.path, name, "weight map"))
    return out


def _stop_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids that end greedy decoding: the tokenizer's and the generation config's (vLLM honours both)."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


class CheckpointSide:
    """A checkpoint loaded in-process by crosschip (any device, any format `convert` writes).

    `apply(model)` runs once after loading (an emulation of a target chip's numerics, see
    emulate.py); its return value is kept as `.emulation`. Teacher-forced forwards are batched
    (right padding, at most `batch_tokens` padded tokens) and log-softmaxed in float32 on the CPU,
    so two sides' scores differ only by what their forwards compute.
    """

    def __init__(
        self,
        path: Path,
        device: str = DEFAULT_DEVICE,
        dtype: str = "fp32",
        *,
        apply: Callable[[Any], object] | None = None,
        emulated: str | None = None,
        batch_tokens: int = BATCH_TOKENS,
        verify: bool = True,
    ) -> None:
        from crosschip.checkpoint import load_model, load_tokenizer_if_present, runtime_versions, storage_format
        from crosschip.devices import resolve_device, torch_dtype
        from crosschip.models import attention_of
        from crosschip.verify.emulate import format_numerics

        self.device = resolve_device(device)
        self.dtype = dtype
        self.model, self.checkpoint = load_model(Path(path), self.device, torch_dtype(dtype), verify=verify)
        self.tokenizer = load_tokenizer_if_present(Path(path))
        self.batch_tokens = batch_tokens
        fmt, layout = storage_format(self.checkpoint)
        # An emulation brings the format's activation numerics itself; a plain load gets them here.
        self.emulation = apply(self.model) if apply is not None else format_numerics(self.model, fmt)
        self.stop_ids = _stop_ids(self.model, self.tokenizer)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0  # any valid id: padded positions are masked and dropped
        label = f"{path}@{self.device}:{dtype}" + (f" (emulated {emulated})" if emulated else "")
        identity = {
            "path": str(self.checkpoint.path),
            "sha256": _weight_sha256(self.checkpoint),
            "device": str(self.device),
            "dtype": dtype,
            "attention": attention_of(self.model),  # sdpa, or eager where the class has no sdpa (Gemma2)
            "format": fmt,
            "layout": layout,
            "emulation": emulated,
            "runtime": runtime_versions(),
        }
        self.info = SideInfo(label, "checkpoint", identity, full_distribution=True, emulated=emulated)

    @torch.inference_mode()
    def forward(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits [B, L, V] (model dtype, on the device) of one right-padded batch."""
        ids, mask = pad_right(sequences, self.pad_id)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
        return out.logits

    def score(self, sequences: list[list[int]], top_k: int) -> list[TokenScores]:
        _check_sequences(sequences)
        scores: list[TokenScores] = []
        for batch in plan_batches([len(s) for s in sequences], self.batch_tokens):
            chunk = [sequences[i] for i in batch]
            scores.extend(self.scores_from_logits(chunk, [self.forward(chunk)], top_k))
        return scores

    def scores_from_logits(
        self, sequences: list[list[int]], logits_batches: Sequence[torch.Tensor], top_k: int
    ) -> list[TokenScores]:
        """TokenScores from logits computed elsewhere (e.g. the layer pass), without another forward.

        `logits_batches` holds, in sequence order, [L, V] tensors (one sequence) and/or right-padded
        [B, L, V] batches (B sequences); L may exceed a sequence's length (padding is dropped).
        """
        rows = list(_per_sequence(logits_batches))
        if len(rows) != len(sequences):
            raise ValueError(f"{len(rows)} logit rows for {len(sequences)} sequences")
        out = []
        for ids, logits in zip(sequences, rows, strict=True):
            if logits.shape[0] < len(ids):
                raise ValueError(f"logits cover {logits.shape[0]} positions, the sequence has {len(ids)}")
            # [T, V]: position t predicts ids[t + 1]; the last position predicts past the text.
            logprobs = torch.log_softmax(logits[: len(ids) - 1].to("cpu", torch.float32), dim=-1)
            out.append(token_scores(ids, logprobs, top_k))
        return out

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int], max_new_tokens: int, top_n: int) -> GreedyRun:
        """Greedy decoding with a KV cache; stops at EOS (not included), top-N logprobs per step."""
        from crosschip.generate import cache_kwargs, new_cache

        cache_arg, extras = cache_kwargs(self.model)
        cache = new_cache(self.model)
        step = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)  # [1, T], then [1, 1]
        tokens: list[int] = []
        top: list[dict[int, float]] = []
        for i in range(max_new_tokens):
            out = self.model(input_ids=step, use_cache=True, **{cache_arg: cache}, **(extras if i == 0 else {}))
            logprobs = torch.log_softmax(out.logits[0, -1].to("cpu", torch.float32), dim=-1)  # [V]
            token = int(logprobs.argmax())
            if token in self.stop_ids:
                break
            best = torch.topk(logprobs, min(top_n, logprobs.shape[-1]))
            top.append(dict(zip(best.indices.tolist(), best.values.tolist(), strict=True)))
            tokens.append(token)
            step = torch.tensor([[token]], dtype=torch.long, device=self.device)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""
        return GreedyRun(list(prompt_ids), tokens, top, text)

    def close(self) -> None:
        """Drop the model so its memory can be reused by the next side."""
        self.__dict__.pop("model", None)
        self.emulation = None


# ---------------------------------------------------------------- live endpoint


def _server_message(e: Exception) -> str:
    """The server's own error message (OpenAI error body), else the exception text."""
    body = getattr(e, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return str(e)


def _token_id(token: str | None) -> int | None:
    match = _TOKEN_ID.match(token) if isinstance(token, str) else None
    return int(match.group(1)) if match else None


def _top_entries(top: dict[str, float] | None, k: int) -> list[tuple[int, float]] | None:
    """The k most likely (id, logprob) of one top_logprobs dict, most likely first; None if keys are not ids."""
    if top is None:
        return None
    pairs = []
    for key, value in top.items():
        token = _token_id(key)
        if token is None:
            return None
        pairs.append((token, float(value)))
    # Stable sort: OpenAI adds the actual token after the top-K, so on a tie the top-K entry stays first.
    return sorted(pairs, key=lambda p: -p[1])[:k]


def _ids_and_tops(
    tokens: Sequence[str], tops: Sequence[dict[str, float] | None], k: int
) -> tuple[list[int], list[list[tuple[int, float]]]] | None:
    """Token ids and top-k rows of a logprobs block, or None when the server did not render ids."""
    ids = [_token_id(t) for t in tokens]
    rows = [_top_entries(t, k) for t in tops]
    if any(t is None for t in ids) or any(r is None for r in rows):
        return None
    return [int(t) for t in ids if t is not None], [r for r in rows if r is not None]


class EndpointSide:
    """A live OpenAI-compatible endpoint, driven by the official `openai` client.

    `stop_ids`: EOS ids to drop from the end of a greedy run when the server returns them (vLLM does,
    crosschip serve does not); the caller may set them from the other side's tokenizer.
    """

    def __init__(self, url: str, model: str | None = None, *, api_key: str | None = None, timeout_s: float = 600.0):
        import openai

        self.url = url
        key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.client = openai.OpenAI(base_url=url, api_key=key, max_retries=1, timeout=timeout_s)
        self.tokenizer = None
        self.stop_ids: frozenset[int] = frozenset()
        try:
            card = self._model_card(model)
        except BaseException:
            self.client.close()
            raise
        self.model = model or str(card["id"])
        server = {k: v for k, v in card.items() if k not in ("id", "object", "created", "permission")}
        identity = {"url": url, "model": self.model, "server": server}
        self.info = SideInfo(f"{url}#{self.model}", "endpoint", identity, full_distribution=False)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one client call; connection and auth failures become CrosschipErrors (bad requests pass)."""
        import openai

        try:
            return fn()
        except openai.APIConnectionError as e:
            raise CrosschipError(f"cannot reach {self.url} ({what}: {e})", "start the server or fix the URL") from e
        except openai.AuthenticationError as e:
            raise CrosschipError(
                f"{self.url} rejected the API key ({_server_message(e)})", "set OPENAI_API_KEY to the server's key"
            ) from e

    def _model_card(self, model: str | None) -> dict[str, Any]:
        import openai

        try:
            cards = [m.model_dump() for m in self._call("GET /models", lambda: self.client.models.list().data)]
        except openai.APIStatusError as e:
            if model is not None:  # a server without /v1/models: trust the name given
                return {"id": model, "models_error": _server_message(e)}
            raise CrosschipError(
                f"{self.url}/models failed ({e.status_code}: {_server_message(e)}), so the model name is unknown",
                f"name the model: {self.url}#MODEL",
            ) from e
        ids = [str(c.get("id")) for c in cards]
        if not cards:
            raise CrosschipError(f"{self.url}/models lists no model", "check the server finished loading")
        if model is None:
            return cards[0]
        if model not in ids:
            raise CrosschipError(
                f"{self.url} does not serve {model!r} (it lists {', '.join(ids)})", f"use {self.url}#{ids[0]}"
            )
        return cards[ids.index(model)]

    def _unavailable(self, metrics: Sequence[str], why: str, fix: str) -> MetricUnavailable:
        for name in metrics:
            self.info.unavailable.setdefault(name, why)
        return MetricUnavailable(metrics, f"{self.info.label}: {why}", fix)

    def _complete(self, metrics: Sequence[str], **request: Any) -> Any:
        """One completions request; a 400 means the endpoint refuses what `metrics` need."""
        import openai

        extra = {TOKEN_IDS_FIELD: True}
        create = self.client.completions.create
        try:
            return self._call("POST /completions", lambda: create(model=self.model, extra_body=extra, **request))
        except openai.BadRequestError as e:
            message = _server_message(e)
            if getattr(e, "code", None) in ("context_length_exceeded", "model_not_found"):
                raise CrosschipError(f"{self.info.label}: {message}", "use shorter prompts or --max-new-tokens") from e
            raise self._unavailable(
                metrics, f"the endpoint refused the request ({message})", "use a server with vLLM's echo extensions"
            ) from e
        except openai.APIStatusError as e:
            raise CrosschipError(
                f"{self.info.label}: HTTP {e.status_code} ({_server_message(e)})", "check the server's log"
            ) from e

    def _top_k(self, top_k: int) -> int:
        if top_k <= MAX_ENDPOINT_LOGPROBS:
            return top_k
        self.info.unavailable.setdefault(
            f"top{top_k}", f"endpoints return at most {MAX_ENDPOINT_LOGPROBS} top logprobs; top-K uses K=20"
        )
        return MAX_ENDPOINT_LOGPROBS

    def score(self, sequences: list[list[int]], top_k: int) -> list[TokenScores]:
        """Prompt logprobs of each sequence (echo, max_tokens=1); top-K only, no full distribution."""
        _check_sequences(sequences)
        known = [self.info.unavailable[m] for m in TEACHER_FORCED_METRICS if m in self.info.unavailable]
        if known:  # refused before: do not ask again for every sequence
            raise MetricUnavailable(TEACHER_FORCED_METRICS, f"{self.info.label}: {known[0]}")
        k = self._top_k(top_k)
        return [self._score_one(seq, k) for seq in sequences]

    def _no_ids(self, metrics: Sequence[str]) -> MetricUnavailable:
        return self._unavailable(
            metrics,
            f"the endpoint does not return token ids ('{TOKEN_IDS_FIELD}' is ignored)",
            f"use a server that supports {TOKEN_IDS_FIELD} (vLLM, crosschip serve)",
        )

    def _score_one(self, seq: list[int], k: int) -> TokenScores:
        metrics, n = TEACHER_FORCED_METRICS, len(seq)
        response = self._complete(metrics, prompt=seq, echo=True, logprobs=k, max_tokens=1, temperature=0)
        lp = response.choices[0].logprobs if response.choices else None
        if lp is None or len(lp.tokens or []) < n or len(lp.token_logprobs or []) < n or len(lp.top_logprobs or []) < n:
            raise self._unavailable(metrics, "echo=true returned no prompt logprobs", "use a vLLM-compatible server")
        # Entry 0 (the first prompt token) has no logprob: nothing precedes it.
        parsed = _ids_and_tops(lp.tokens[:n], lp.top_logprobs[1:n], k)
        if parsed is None:
            raise self._no_ids(metrics)
        ids, tops = parsed
        if ids != seq:
            first = next(i for i, (a, b) in enumerate(zip(ids, seq, strict=True)) if a != b)
            raise CrosschipError(
                f"{self.info.label} echoed token {ids[first]} at position {first} where {seq[first]} was sent",
                "the server re-tokenizes token-id prompts; use one that takes them as given",
            )
        width = min(len(row) for row in tops)  # a server may return fewer than k for a tiny vocabulary
        return TokenScores(
            target_ids=torch.tensor(seq[1:], dtype=torch.long),
            token_logprobs=torch.tensor(lp.token_logprobs[1:n], dtype=torch.float32),
            top_ids=torch.tensor([[t for t, _ in row[:width]] for row in tops], dtype=torch.long).view(n - 1, width),
            top_logprobs=torch.tensor([[v for _, v in row[:width]] for row in tops]).view(n - 1, width).float(),
        )

    def echo_ids(self, text: str) -> tuple[list[int] | None, int | None]:
        """(ids the endpoint scored for a text prompt, its prompt token count); ids None without echoed ids."""
        response = self._complete(TOKENIZATION_METRICS, prompt=text, echo=True, logprobs=1, max_tokens=1,
                                  temperature=0)
        count = getattr(response.usage, "prompt_tokens", None) if response.usage is not None else None
        lp = response.choices[0].logprobs if response.choices else None
        if lp is None or not count or len(lp.tokens or []) < count:
            return None, count
        ids = [_token_id(t) for t in lp.tokens[:count]]
        return (None if any(t is None for t in ids) else [int(t) for t in ids if t is not None]), count

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, top_n: int) -> GreedyRun:
        """Greedy completion of the prompt ids; a trailing EOS in `stop_ids` is dropped."""
        n = min(top_n, MAX_ENDPOINT_LOGPROBS)
        request = {"prompt": prompt_ids, "max_tokens": max_new_tokens, "temperature": 0, "logprobs": n}
        choice = self._complete(GREEDY_METRICS, **request).choices[0]
        lp = choice.logprobs
        parsed = _ids_and_tops(lp.tokens or [], lp.top_logprobs or [], n) if lp is not None else None
        if parsed is None:
            raise self._no_ids(GREEDY_METRICS)
        tokens, tops = parsed
        while choice.finish_reason == "stop" and tokens and tokens[-1] in self.stop_ids:
            tokens.pop()
        top = [dict(row) for row in tops[: len(tokens)]]
        return GreedyRun(list(prompt_ids), tokens, top, choice.text or "")

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------- opening a side


def open_side(
    spec: SideSpec,
    *,
    dtype_default: str = "fp32",
    emulate: Callable[[Any], object] | None = None,
    emulated: str | None = None,
) -> Side:
    """Open a parsed side; `emulate(model)` (checkpoints only) applies a target chip's numerics after loading."""
    if spec.kind == "endpoint":
        if emulate is not None:
            raise CrosschipError(
                f"cannot emulate a chip on endpoint {spec}", "emulation runs a checkpoint in-process: pass CKPT"
            )
        return EndpointSide(str(spec.url), spec.model)
    assert spec.path is not None
    return CheckpointSide(spec.path, spec.device, spec.dtype or dtype_default, apply=emulate, emulated=emulated)
