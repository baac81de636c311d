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

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_LOGPROBS = 20  # OpenAI's cap for top_logprobs; completions' legacy `logprobs` shares it here
MAX_N = 128  # hard schema bound; the server applies a tighter, configurable one


class OpenAIModel(BaseModel):
    """Responses: extra fields allowed so internal additions never break serialization."""

    model_config = ConfigDict(extra="allow")


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


StopField = Annotated[str | list[str] | None, Field(description="Up to 4 sequences where generation stops.")]


def _finite(value: float | None, name: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    return value


class SamplingFields(RequestModel):
    """Fields shared by both endpoints, in OpenAI's order where OpenAI has them."""

    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: float | None = 0.0
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


def token_id_string(token_id: int) -> str:
    """A token as `return_tokens_as_token_ids` renders it."""
    return f"token_id:{token_id}"


# ---------------------------------------------------------------- completions


PromptField = str | list[str] | list[int] | list[list[int]]


# vLLM's extension, spelled the same, with its defaults: text prompts get the special tokens the tokenizer
# adds (BOS), rendered chat text does not (its template already has them).
AddSpecialField = Annotated[bool, Field(description="Let the tokenizer add its special tokens (vLLM extension).")]


class CompletionRequest(SamplingFields):
    model: str
    prompt: PromptField
    best_of: Annotated[int | None, Field(ge=1)] = None
    echo: bool = False
    logprobs: Annotated[int | None, Field(ge=0, le=MAX_LOGPROBS)] = None
    # 0 only with echo: score the prompt, generate nothing (vLLM's `echo_without_generation`).
    max_tokens: Annotated[int | None, Field(ge=0)] = 16
    suffix: str | None = None
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


class ChatCompletionRequest(SamplingFields):
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
