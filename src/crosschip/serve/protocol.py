"""OpenAI-compatible request, response, stream-chunk and error schemas (pydantic).

Field names and order follow the OpenAI API reference (as vLLM's `entrypoints/openai/protocol.py`
does), so the official `openai` client parses every response unchanged. Requests reject unknown
fields like OpenAI does ("Unrecognized request argument"), so a typo is an error, not a silent no-op.
Semantic checks that need the model (context length, model name) live in `serving.py`.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_LOGPROBS = 20  # OpenAI's cap for top_logprobs; completions' legacy `logprobs` shares it here
MAX_N = 128  # hard schema bound; the server applies a tighter, configurable one


class OpenAIModel(BaseModel):
    """Responses: extra fields allowed so internal additions never break serialization."""

    model_config = ConfigDict(extra="allow")


def _integral(value: Any) -> Any:
    """Integral floats as ints, all the way down: 102.0 is an integer in JSON Schema (2020-12, "a number with a
    zero fractional part"), and a strict float field takes an int just the same."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


class RequestModel(BaseModel):
    # strict: a value of another JSON type is refused as the schema says ("true" is not a boolean), not coerced.
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _json_integers(cls, data: Any) -> Any:
        return _integral(data)


# ---------------------------------------------------------------- errors


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


class APIError(Exception):
    """An error answered as an OpenAI error object with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()


def bad_request(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------- shared request parts


class StreamOptions(RequestModel):
    include_usage: bool = False


_Stop = Annotated[str, Field(min_length=1)]
StopField = Annotated[_Stop | Annotated[list[_Stop], Field(max_length=4)] | None,
                      Field(description="Up to 4 non-empty sequences where generation stops.")]


def _finite(value: float | None, name: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    return value


# OpenAI and vLLM: stream_options only with stream true; said in the schema, so that it is not a hidden rule.
_STREAM_OPTIONS_NEED_STREAM: dict[str, Any] = {
    "if": {"properties": {"stream_options": {"type": "object"}}, "required": ["stream_options"]},
    "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
}


class SamplingFields(RequestModel):
    """Fields shared by both endpoints, in OpenAI's order where OpenAI has them."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM]})

    frequency_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = 0.0  # OpenAI's range
    # Token id (as a string) -> bias added to its logit, as OpenAI and vLLM define it; the server's /openapi.json
    # narrows the keys to this model's vocabulary.
    logit_bias: dict[Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,9})$")],
                     Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = 0.0
    seed: int | None = None
    stop: StopField = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float | None, Field(ge=0.0)] = 1.0
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = 1.0
    user: str | None = None
    # Extensions (vLLM spells them the same): top_k -1 or 0 means off; ignore_eos generates through
    # end-of-sequence (benchmarks and tests need a known length).
    top_k: Annotated[int | None, Field(ge=-1)] = None
    ignore_eos: bool = False

    @field_validator("temperature", "top_p", "frequency_penalty", "presence_penalty")
    @classmethod
    def _check_finite(cls, value: float | None, info: Any) -> float | None:
        return _finite(value, info.field_name)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = _as_list(value)
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    def stop_sequences(self) -> list[str]:
        return _as_list(self.stop)


def _as_list(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


# vLLM's extension, spelled the same: with logprobs, every token (and every top_logprobs key) is
# rendered as "token_id:{id}", so scorers get exact ids even for tokens whose text is not valid UTF-8
# or not unique (byte-level BPE fragments).
TokenIdsField = Annotated[bool, Field(description="Render logprob tokens as 'token_id:{id}' (vLLM extension).")]


def decimal_below(n: int) -> str:
    """A regular expression for the decimal integers 0 .. n-1 without leading zeros (n >= 1): the token ids of a
    vocabulary of n, for the schema of `logit_bias` keys."""
    top = str(n - 1)
    width = len(top)
    alts = ["[0-9]", *(f"[1-9][0-9]{{{d - 1}}}" for d in range(2, width))] if width > 1 else []
    for i, digit in enumerate(top):  # same width as n - 1: equal up to position i, then a smaller digit there
        low, high, rest = (1 if i == 0 and width > 1 else 0), int(digit) - 1, width - i - 1
        if high >= low:
            alts.append(f"{top[:i]}[{low}-{high}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    return "^(" + "|".join([*alts, top]) + ")$"


def _bound_integers(node: Any, maximum: int) -> None:
    """Give every integer schema below `node` this maximum (in place)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = maximum
        for child in node.values():
            _bound_integers(child, maximum)
    elif isinstance(node, list):
        for child in node:
            _bound_integers(child, maximum)


def narrow_schema(schema: dict[str, Any], max_n: int, max_context: int, vocab_size: int) -> dict[str, Any]:
    """The app's OpenAPI schema narrowed to one server's limits, so that what it refuses the schema excludes too:
    n up to --max-n choices, max_tokens within the context, token ids (prompts, logit_bias keys) in the vocabulary."""
    comps = schema["components"]["schemas"]
    _bound_integers(comps["CompletionRequest"]["properties"]["prompt"], vocab_size - 1)  # token-id prompts
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = comps[name]["properties"]
        props["n"]["maximum"] = max_n
        for key in ("max_tokens", "max_completion_tokens"):
            for alt in props.get(key, {}).get("anyOf", []):
                if alt.get("type") == "integer":
                    alt["maximum"] = max_context
        for alt in props["logit_bias"].get("anyOf", []):
            if alt.get("type") == "object":
                alt["propertyNames"] = {"pattern": decimal_below(vocab_size)}
    return schema


def token_id_string(token_id: int) -> str:
    """A token as `return_tokens_as_token_ids` renders it."""
    return f"token_id:{token_id}"


# ---------------------------------------------------------------- completions


# Never empty (nothing to run; vLLM refuses an empty prompt too): a text of at least one character, which a
# byte-level tokenizer always encodes to at least one token, or at least one token id.
_Text = Annotated[str, Field(min_length=1)]
_Ids = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
PromptField = _Text | Annotated[list[_Text], Field(min_length=1)] | _Ids | Annotated[list[_Ids], Field(min_length=1)]


# vLLM's extension, spelled the same, with its defaults: text prompts get the special tokens the tokenizer
# adds (BOS), rendered chat text does not (its template already has them).
AddSpecialField = Annotated[bool, Field(description="Let the tokenizer add its special tokens (vLLM extension).")]


# max_tokens 0 only with echo: score the prompt, generate nothing (vLLM's `echo_without_generation`).
_ZERO_TOKENS_NEED_ECHO: dict[str, Any] = {
    "if": {"properties": {"max_tokens": {"const": 0}}, "required": ["max_tokens"]},
    "then": {"properties": {"echo": {"const": True}}, "required": ["echo"]},
}


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "allOf": [_STREAM_OPTIONS_NEED_STREAM, _ZERO_TOKENS_NEED_ECHO]})

    model: str
    prompt: PromptField
    best_of: Annotated[int | None, Field(ge=1, le=1, description="1 only (vLLM 0.32 dropped best_of)")] = None
    echo: bool = False
    logprobs: Annotated[int | None, Field(ge=0, le=MAX_LOGPROBS)] = None
    # 0 only with echo: score the prompt, generate nothing (vLLM's `echo_without_generation`).
    max_tokens: Annotated[int | None, Field(ge=0)] = 16
    suffix: Annotated[str | None, Field(max_length=0, description="Not supported: empty or null only.")] = None
    return_tokens_as_token_ids: TokenIdsField = False
    add_special_tokens: AddSpecialField = True


class CompletionLogprobs(OpenAIModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class CompletionStreamResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------- chat


class ContentPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text: content parts are joined (only text parts are accepted)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


# OpenAI: "logprobs must be set to true if this parameter is used" (vLLM refuses it too); said in the schema.
_TOP_LOGPROBS_NEED_LOGPROBS: dict[str, Any] = {
    "if": {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]},
    "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
}


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "allOf": [_STREAM_OPTIONS_NEED_STREAM, _TOP_LOGPROBS_NEED_LOGPROBS]})

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str
    logprobs: bool = False
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_LOGPROBS)] = None
    return_tokens_as_token_ids: TokenIdsField = False
    add_special_tokens: AddSpecialField = False


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatCompletionChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None


class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionStreamResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------- models, health


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "crosschip"
    root: str | None = None  # the served checkpoint directory, as vLLM reports its --model path
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
