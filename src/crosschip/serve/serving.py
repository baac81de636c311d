"""OpenAI serving: request validation, tokenization, n choices, stop strings, logprobs, usage.

The layer between the thin HTTP router (`api.py`) and the engine (`engine_api.Engine`). Text-level
concerns live here: chat templates, incremental detokenization (`TextStreamer`), stop strings,
`n` > 1 as n engine requests (seed + i), and OpenAI's two logprobs shapes. The engine only ever
sees token ids and sampling options.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from crosschip.serve import protocol as P
from crosschip.serve.choices import Choice, Prompt, Run, guarded
from crosschip.serve.engine_api import Engine, GenerationRequest, SamplingOptions, TokenLogprob
from crosschip.serve.metrics import ServerMetrics
from crosschip.serve.protocol import bad_request
from crosschip.serve.text import StopTracker, TokenText, token_offsets


@dataclass(frozen=True)
class ServingConfig:
    model_name: str
    max_context: int
    request_timeout_s: float = 300.0
    max_n: int = 16  # choices per request (n x prompts); each is one engine sequence
    root: str | None = None  # the checkpoint directory served (the model card's `root`, as in vLLM)


def _request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _check_utf8(text: str, param: str) -> None:
    """JSON may carry lone surrogates (\\ud800) that are not encodable text: reject, don't crash."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{param} contains text that is not valid UTF-8 ({e.reason})", param) from e


class _ServingBase:
    """What both endpoints share: model check, sampling options, context check, choices."""

    def __init__(self, engine: Engine, tokenizer: Any, config: ServingConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = metrics
        self.token_text = TokenText(tokenizer)
        # Token ids a request may name: those the model has logits for and the tokenizer knows (a tokenizer may
        # count an added token the model's embedding lacks, or the reverse).
        self.vocab_size = min(len(tokenizer), int(getattr(engine, "vocab_size", len(tokenizer))))
        eos = tokenizer.eos_token_id
        self.stop_token_ids: tuple[int, ...] = () if eos is None else (int(eos),)

    def token_namer(self, as_ids: bool) -> Callable[[int], str]:
        """How logprobs name a token: its text, or "token_id:N" (`return_tokens_as_token_ids`)."""
        return P.token_id_string if as_ids else self.token_text.text

    def check_common(self, req: P.SamplingFields, model: str, num_prompts: int) -> None:
        # An empty name means the served model, as in vLLM (`_is_model_supported`, entrypoints/serve/engine/
        # serving.py): the schema allows "", and single-model clients send it.
        if model and model != self.config.model_name:  # 404, as OpenAI and vLLM answer an unknown model
            raise P.APIError(404, f"model {model!r} does not exist; this server serves {self.config.model_name!r}",
                             param="model", code="model_not_found")
        for name in ("max_tokens", "max_completion_tokens"):  # each bound by the context, as the schema says
            value = getattr(req, name, None)
            if value is not None and value > self.config.max_context:
                raise bad_request(f"{name} is {value}; this model's context is {self.config.max_context} tokens",
                                  name, code="context_length_exceeded")
        out_of_vocab = [k for k in (req.logit_bias or {}) if int(k) >= self.vocab_size]
        if out_of_vocab:  # vLLM refuses these too (v1 engine processor, `_validate_logit_bias`)
            raise bad_request(f"logit_bias names token {out_of_vocab[0]}, outside this model's vocabulary of "
                              f"{self.vocab_size}", "logit_bias")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        limit = self.config.max_n
        if req.n * num_prompts > limit:
            raise bad_request(
                f"n={req.n} x {num_prompts} prompt(s) exceeds this server's limit of {limit} choices", "n"
            )
        for s in req.stop_sequences():
            _check_utf8(s, "stop")

    def max_tokens(self, requested: int | None, prompt_len: int, prompt_param: str, score_only: bool = False) -> int:
        """Check prompt + max_tokens against the context; None means 'the rest of the context'.

        `score_only` (echo with max_tokens 0): the prompt may fill the context, as lm-eval's rolling windows do;
        the engine decodes one token that is dropped (and needs no cache slot)."""
        ctx = self.config.max_context
        if score_only and prompt_len <= ctx:
            return 1
        if prompt_len >= ctx:
            raise bad_request(
                f"the prompt is {prompt_len} tokens; this model's context is {ctx} tokens (the "
                f"prompt must leave room for at least 1 generated token)",
                prompt_param,
                code="context_length_exceeded",
            )
        if requested is None:
            return ctx - prompt_len
        if prompt_len + requested > ctx:
            raise bad_request(
                f"this model's context is {ctx} tokens; you requested {prompt_len + requested} "
                f"({prompt_len} in the prompt, {requested} max_tokens)",
                "max_tokens",
                code="context_length_exceeded",
            )
        return requested

    def sampling(
        self,
        req: P.SamplingFields,
        max_tokens: int,
        i: int,
        logprobs: int | None,
        prompt_logprobs: int | None,
        score_only: bool = False,
    ) -> SamplingOptions:
        top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k,
            seed=None if req.seed is None else req.seed + i,
            stop_token_ids=() if req.ignore_eos else self.stop_token_ids,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=tuple((int(k), float(v)) for k, v in (req.logit_bias or {}).items()),
            frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            score_only=score_only,
        )

    def make_choices(
        self,
        req: P.SamplingFields,
        prompts: list[Prompt],
        base_id: str,
        prompt_param: str,
        logprobs: int | None,
        prompt_logprobs: int | None,
        requested_max: int | None,
        score_only: bool = False,
    ) -> list[Choice]:
        choices = []
        for p_idx, prompt in enumerate(prompts):
            max_tokens = self.max_tokens(requested_max, len(prompt.ids), prompt_param, score_only)
            for i in range(req.n):
                index = p_idx * req.n + i
                options = self.sampling(req, max_tokens, i, logprobs, prompt_logprobs, score_only)
                request = GenerationRequest(
                    f"{base_id}-{index}", prompt.ids, options, timeout_s=self.config.request_timeout_s
                )
                tracker = StopTracker(self.tokenizer, prompt.ids, req.stop_sequences())
                choices.append(Choice(index, prompt, request, tracker))
        return choices

    def new_run(self, choices: list[Choice], prompt_param: str) -> Run:
        return Run(self.engine, self.metrics, choices, prompt_param, self.config.request_timeout_s)


    async def execute(self, req: Any, run: Run, rid: str) -> AsyncIterator[BaseModel] | None:
        """Start streaming `run` (returns the chunk iterator), or run it to the end (returns None)."""
        if req.stream:
            touched = await _admitted(run)
            return guarded(run, self._stream(req, run, touched, rid))  # type: ignore[attr-defined]
        try:
            await run.run_to_end()
        finally:
            await run.merger.close()
        return None


def _echo_only(req: P.CompletionRequest) -> bool:
    """`echo` with `max_tokens: 0`: return the scored prompt and nothing generated."""
    return req.echo and req.max_tokens == 0


def _usage(req: P.CompletionRequest, run: Run) -> P.UsageInfo:
    usage = run.usage()
    if _echo_only(req):  # the one decoded token is not returned, so it is not billed either
        return P.UsageInfo(prompt_tokens=usage.prompt_tokens, total_tokens=usage.prompt_tokens)
    return usage


def _clamp(logprob: float) -> float:
    """JSON has no -inf; OpenAI uses -9999.0 for 'very unlikely'."""
    return logprob if logprob > -9999.0 else -9999.0


async def _admitted(run: Run) -> list[Choice]:
    """Wait for admission of every choice (see `Run.admit`); close the streams if that fails."""
    try:
        return await run.admit()
    except BaseException:
        await run.merger.close()
        raise


class OpenAIServingCompletion(_ServingBase):
    """POST /v1/completions: text or token-id prompts, echo with prompt logprobs, legacy logprobs."""

    async def create(self, req: P.CompletionRequest) -> P.CompletionResponse | AsyncIterator[BaseModel]:
        prompts = self._prompts(req.prompt, req.add_special_tokens)
        self.check_common(req, req.model, len(prompts))
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix", code="unsupported_parameter")
        if req.max_tokens == 0 and not req.echo:
            raise bad_request("max_tokens must be at least 1 (0 only with echo, to score the prompt)", "max_tokens")
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        rid = _request_id("cmpl")
        # max_tokens 0: the engine still decodes one token (as vLLM does), which is not returned.
        requested = 1 if _echo_only(req) else req.max_tokens
        choices = self.make_choices(req, prompts, rid, "prompt", req.logprobs, prompt_logprobs, requested,
                                    score_only=_echo_only(req))
        run = self.new_run(choices, "prompt")
        streamed = await self.execute(req, run, rid)
        if streamed is not None:
            return streamed
        out = [
            P.CompletionChoice(
                text=(c.prompt.text if req.echo else "") + ("" if _echo_only(req) else c.tracker.text),
                index=c.index,
                logprobs=self._logprobs(
                    c, req.echo, req.logprobs, span=range(0) if _echo_only(req) else None,
                    as_ids=req.return_tokens_as_token_ids,
                ),
                finish_reason="length" if _echo_only(req) else c.finish_reason,
            )
            for c in choices
        ]
        return P.CompletionResponse(id=rid, model=self.config.model_name, choices=out, usage=_usage(req, run))

    def _prompts(self, prompt: P.PromptField, add_special_tokens: bool) -> list[Prompt]:
        if isinstance(prompt, str):
            return [self._text_prompt(prompt, add_special_tokens)]
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        if all(isinstance(p, str) for p in prompt):
            return [self._text_prompt(p, add_special_tokens) for p in prompt]  # type: ignore[arg-type]
        if all(isinstance(p, int) for p in prompt):
            return [self._ids_prompt(prompt)]  # type: ignore[arg-type]
        return [self._ids_prompt(p) for p in prompt]  # type: ignore[arg-type]

    def _text_prompt(self, text: str, add_special_tokens: bool) -> Prompt:
        """Exactly `tokenizer(text)`, as vLLM and `transformers` users encode: BOS only if the tokenizer adds it.

        crosschip's tokenizer adds the BOS that training put before every document (data/tokenizer.py);
        `crosschip serve` warns at start when a crosschip-trained checkpoint's tokenizer does not.
        """
        _check_utf8(text, "prompt")
        ids = tuple(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        if not ids:
            raise bad_request("prompt must not be empty", "prompt")
        return Prompt(ids, text)

    def _ids_prompt(self, ids: Sequence[int]) -> Prompt:
        """Token ids are taken as given: nothing is added, and echo returns exactly them."""
        if not ids:
            raise bad_request("a token-id prompt must not be empty", "prompt")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"prompt token ids must be in [0, {self.vocab_size}); got {bad[0]}", "prompt")
        ids = tuple(int(t) for t in ids)
        return Prompt(ids, self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _top(self, entry: TokenLogprob, name: Callable[[int], str]) -> dict[str, float]:
        # OpenAI: the top-K plus the sampled token, so up to K + 1 entries.
        top = {name(t): _clamp(lp) for t, lp in entry.top}
        top.setdefault(name(entry.token_id), _clamp(entry.logprob))
        return top

    def _add(
        self,
        lp: P.CompletionLogprobs,
        token_id: int,
        entry: TokenLogprob | None,
        offset: int,
        name: Callable[[int], str],
    ) -> None:
        lp.tokens.append(name(token_id))
        lp.token_logprobs.append(None if entry is None else _clamp(entry.logprob))
        lp.top_logprobs.append(None if entry is None else self._top(entry, name))
        lp.text_offset.append(offset)

    def _prompt_logprobs(self, c: Choice, lp: P.CompletionLogprobs, name: Callable[[int], str]) -> None:
        """Every prompt token the engine scored, BOS included. The first has no logprob (nothing precedes
        it): `null` logprob and top_logprobs, as OpenAI and vLLM (`_create_completion_logprobs`) answer.

        Offsets index the echoed text: a special token that prints nothing (BOS) sits at the offset of the
        token after it. (vLLM instead adds up token-string lengths, so after "<s>" its offsets point past
        the text it returns.)
        """
        entries = list(c.prompt_logprobs or [])
        entries += [None] * (len(c.prompt.ids) - len(entries))
        offsets, _ = token_offsets(self.tokenizer, c.prompt.ids)
        for token_id, entry, offset in zip(c.prompt.ids, entries, offsets, strict=True):
            self._add(lp, token_id, entry, offset, name)

    def _logprobs(
        self,
        c: Choice,
        echo: bool,
        k: int | None,
        span: range | None = None,
        with_prompt: bool | None = None,
        as_ids: bool = False,
    ) -> P.CompletionLogprobs | None:
        if k is None:
            return None
        name = self.token_namer(as_ids)
        lp = P.CompletionLogprobs()
        if echo if with_prompt is None else with_prompt:
            self._prompt_logprobs(c, lp, name)
        base = len(c.prompt.text) if echo else 0
        for pos in span if span is not None else range(c.kept_tokens()):
            entry = c.logprobs[pos] if pos < len(c.logprobs) else None
            self._add(lp, c.token_ids[pos], entry, base + c.offsets[pos], name)
        return lp

    async def _stream(
        self, req: P.CompletionRequest, run: Run, touched: list[Choice], rid: str
    ) -> AsyncIterator[BaseModel]:
        def chunk(choices: list[P.CompletionChoice], usage: P.UsageInfo | None = None) -> BaseModel:
            return P.CompletionStreamResponse(
                id=rid, model=self.config.model_name, choices=choices, usage=usage
            )

        as_ids = req.return_tokens_as_token_ids
        if req.echo:
            for c in run.choices:
                lp = self._logprobs(c, True, req.logprobs, span=range(0), with_prompt=True, as_ids=as_ids)
                yield chunk([P.CompletionChoice(text=c.prompt.text, index=c.index, logprobs=lp)])
        async for c, text, span, finish in run.deltas(touched):
            if _echo_only(req):  # the decoded token is not returned; only the end of the choice is
                if not finish:
                    continue
                text, span, finish = "", range(0), "length"
            lp = self._logprobs(c, req.echo, req.logprobs, span=span, with_prompt=False, as_ids=as_ids)
            yield chunk([P.CompletionChoice(text=text, index=c.index, logprobs=lp, finish_reason=finish)])
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk([], _usage(req, run))


class OpenAIServingChat(_ServingBase):
    """POST /v1/chat/completions: the checkpoint's chat template, chat-shaped logprobs."""

    async def create(
        self, req: P.ChatCompletionRequest
    ) -> P.ChatCompletionResponse | AsyncIterator[BaseModel]:
        self.check_common(req, req.model, 1)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        prompt = self._render(req.messages, req.add_special_tokens)
        k = (req.top_logprobs or 0) if req.logprobs else None
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        rid = _request_id("chatcmpl")
        choices = self.make_choices(req, [prompt], rid, "messages", k, None, requested)
        run = self.new_run(choices, "messages")
        streamed = await self.execute(req, run, rid)
        if streamed is not None:
            return streamed
        out = [
            P.ChatCompletionChoice(
                index=c.index,
                message=P.ChatResponseMessage(content=c.tracker.text),
                logprobs=self._logprobs(c, k, range(c.kept_tokens()), req.return_tokens_as_token_ids),
                finish_reason=c.finish_reason,
            )
            for c in choices
        ]
        return P.ChatCompletionResponse(id=rid, model=self.config.model_name, choices=out, usage=run.usage())

    def _render(self, messages: list[P.ChatMessage], add_special_tokens: bool) -> Prompt:
        turns = []
        for i, m in enumerate(messages):
            text = m.text()
            _check_utf8(text, f"messages[{i}].content")
            # The crosschip template knows system/user/assistant/tool; OpenAI's "developer" is a system turn.
            turns.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model's tokenizer has no chat template; use /v1/completions", "messages")
        from jinja2 import TemplateError  # transformers renders chat templates with jinja2

        try:
            text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except (TemplateError, ValueError, TypeError, KeyError) as e:  # e.g. the template's raise_exception
            raise bad_request(f"the messages do not fit this model's chat template: {e}", "messages") from e
        # The template renders BOS itself: encoding adds none by default (vLLM's add_special_tokens=False
        # for chat, HF apply_chat_template(tokenize=True)), so BOS is not doubled.
        ids = tuple(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        return Prompt(ids, text)

    def _entry(self, token_id: int, logprob: float, name: Callable[[int], str]) -> P.TopLogprob:
        # `bytes` stays the token's real UTF-8 bytes also when `token` is rendered as "token_id:N".
        return P.TopLogprob(
            token=name(token_id),
            logprob=_clamp(logprob),
            bytes=list(self.token_text.bytes(token_id)),
        )

    def _logprobs(
        self, c: Choice, k: int | None, span: range, as_ids: bool = False
    ) -> P.ChatChoiceLogprobs | None:
        if k is None:
            return None
        name = self.token_namer(as_ids)
        content = []
        for pos in span:
            token_id = c.token_ids[pos]
            entry = c.logprobs[pos] if pos < len(c.logprobs) else None
            head = self._entry(token_id, entry.logprob if entry else float("nan"), name)
            top = [self._entry(t, lp, name) for t, lp in (entry.top if entry else ())]
            content.append(
                P.ChatTokenLogprob(token=head.token, logprob=head.logprob, bytes=head.bytes, top_logprobs=top)
            )
        return P.ChatChoiceLogprobs(content=content)

    async def _stream(
        self, req: P.ChatCompletionRequest, run: Run, touched: list[Choice], rid: str
    ) -> AsyncIterator[BaseModel]:
        k = (req.top_logprobs or 0) if req.logprobs else None

        def chunk(choices: list[P.ChatCompletionStreamChoice], usage: P.UsageInfo | None = None) -> BaseModel:
            return P.ChatCompletionStreamResponse(
                id=rid, model=self.config.model_name, choices=choices, usage=usage
            )

        for c in run.choices:  # OpenAI opens every choice with the role
            yield chunk(
                [
                    P.ChatCompletionStreamChoice(
                        index=c.index, delta=P.DeltaMessage(role="assistant", content="")
                    )
                ]
            )
        async for c, text, span, finish in run.deltas(touched):
            delta = P.DeltaMessage(content=text or None)
            lp = self._logprobs(c, k, span, req.return_tokens_as_token_ids)
            yield chunk(
                [P.ChatCompletionStreamChoice(index=c.index, delta=delta, finish_reason=finish, logprobs=lp)]
            )
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk([], run.usage())
