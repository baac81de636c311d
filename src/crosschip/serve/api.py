"""The HTTP layer: a FastAPI app over the OpenAI serving classes, and `run_server` (uvicorn).

The router is thin: parse (pydantic), hand to `serving.py`, turn the result into JSON or
server-sent events. Every error leaves as an OpenAI error object
(`{"error": {"message", "type", "param", "code"}}`); nothing a client sends can crash the server.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crosschip.errors import CrosschipError
from crosschip.serve import protocol as P
from crosschip.serve.engine_api import Engine
from crosschip.serve.metrics import CONTENT_TYPE, ServerMetrics
from crosschip.serve.protocol import APIError
from crosschip.serve.serving import OpenAIServingChat, OpenAIServingCompletion, ServingConfig

log = logging.getLogger("crosschip.serve")
DEFAULT_TIMEOUT_S = 600.0
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": P.ErrorResponse} for code in (400, 401, 404, 429, 503, 504)
}


# With `stream: true` both completion endpoints answer server-sent events (`data: {json}` lines, then
# `data: [DONE]`), as OpenAI and vLLM do; the schema says so beside the JSON body.
_STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "description": "one JSON chunk, or [DONE] at the end"}}}}},
          "description": "The response, or with stream true its server-sent events"},
}


class PrometheusResponse(Response):
    """What /metrics returns, so that /openapi.json documents Prometheus text rather than JSON."""

    media_type = CONTENT_TYPE


class HealthResponse(BaseModel):
    status: str
    model: str


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)


def _error(*args: Any, **kwargs: Any) -> JSONResponse:
    """An OpenAI error response; takes `APIError`'s arguments."""
    return _error_response(APIError(*args, **kwargs))


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """Pydantic/JSON errors -> 400 naming the first offending field (OpenAI answers 400, not 422)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return _error(400, f"the request body is not valid JSON ({detail} at byte {loc[0] if loc else '?'})")
    if first.get("type") == "missing" and not loc:
        return _error(400, "the request body is empty; send a JSON object")
    # Union members add their type name to the path (prompt.str, prompt.list[int]); keep the field.
    param = ".".join(p for p in loc if not (p[:1].isalpha() and ("[" in p or p in {"str", "int", "float"}
                                                                 or p.startswith("constrained-"))))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "string_unicode":  # a lone surrogate (\ud800): no UTF-8 encodes it
        msg = "not valid UTF-8 text (it holds a lone surrogate)"
    message = f"{param}: {msg}" if param else msg
    extra = f" ({len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return _error(400, message + extra, param=param or None, code="invalid_value")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)  # a bug: keep the server up, tell the client
        return _error(500, f"internal server error ({type(exc).__name__})", type_="server_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "the request body could not be decoded (it must be UTF-8 JSON)"
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, message, type_=kind, headers=getattr(exc, "headers", None))


class _MetricsMiddleware:
    """Counts /v1 requests by final status and how many are in flight (pure ASGI: streams untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight -= 1
            self.metrics.requests.inc(status=str(status[0]))


class _Utf8BodyMiddleware:
    """Rejects a /v1 POST body that is not UTF-8 with a 400 error object (JSON must be UTF-8, RFC 8259).

    Python's json would otherwise guess UTF-16/32 from the first bytes and report a misleading error.
    The body is buffered once and replayed to the app; later receives (disconnect) pass through.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            response = _error(
                400,
                f"the request body is not valid UTF-8 (byte {e.start}); send UTF-8 JSON",
                code="invalid_encoding",
            )
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _cancel_on_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`, cancelling it if the client goes away first (its engine sequences are then aborted).

    Streaming responses get the same from Starlette, which cancels the body iterator on disconnect.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=499)  # nobody is listening; uvicorn drops it
    return task.result()


async def _sse(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except APIError as e:  # after the 200 went out, an error can only travel in the stream
        yield f"data: {json.dumps(e.body())}\n\n"
    except Exception as e:  # noqa: BLE001 - a bug must not cut the stream without a word
        log.error("error while streaming", exc_info=e)
        body = APIError(500, f"internal server error ({type(e).__name__})", type_="server_error").body()
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


def _respond(result: Any) -> Response:
    if isinstance(result, Response):
        return result
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_sse(result), media_type="text/event-stream", headers=headers)


def _auth_dependency(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "invalid or missing API key (send 'Authorization: Bearer <key>')",
                code="invalid_api_key",
                type_="authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def _v1_router(
    engine: Engine,
    completion: OpenAIServingCompletion,
    chat: OpenAIServingChat,
    config: ServingConfig,
    api_key: str | None,
) -> APIRouter:
    router = APIRouter(
        prefix="/v1", dependencies=[Depends(_auth_dependency(api_key))], responses=_ERROR_RESPONSES
    )

    @router.get("/models", response_model=P.ModelList)
    async def models() -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=config.model_name, root=config.root,
                                             max_model_len=config.max_context)])

    @router.post("/completions", response_model=P.CompletionResponse, responses=_STREAM_RESPONSE)
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        return _respond(await _cancel_on_disconnect(request, completion.create(body)))

    @router.post("/chat/completions", response_model=P.ChatCompletionResponse, responses=_STREAM_RESPONSE)
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
        return _respond(await _cancel_on_disconnect(request, chat.create(body)))

    return router


def build_app(
    engine: Engine,
    tokenizer: Any,
    model_name: str | None = None,
    api_key: str | None = None,
    request_timeout_s: float = DEFAULT_TIMEOUT_S,
    max_n: int = 16,
    root: Path | None = None,
) -> FastAPI:
    """The OpenAI-compatible app. Its lifespan starts the engine and, on shutdown, drains it.

    root: the checkpoint directory, published as the model card's `root` (vLLM does the same with its
    --model path), so `crosschip verify` can find the served checkpoint for a two-sided check."""
    config = ServingConfig(model_name or engine.model_name, engine.max_context, request_timeout_s, max_n,
                           str(Path(root).resolve()) if root is not None else None)
    metrics = ServerMetrics(engine.stats)
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            await engine.shutdown(drain=True)

    app = FastAPI(title="crosschip OpenAI-compatible server", version="1", lifespan=lifespan)
    _install_error_handlers(app)
    app.add_middleware(_Utf8BodyMiddleware)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)  # added last = outermost: counts the 400s too
    completion = OpenAIServingCompletion(engine, tokenizer, config, metrics)
    chat = OpenAIServingChat(engine, tokenizer, config, metrics)
    app.include_router(_v1_router(engine, completion, chat, config, api_key))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = P.narrow_schema(schema, config.max_n, config.max_context, completion.vocab_size)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": P.ErrorResponse}})
    async def health() -> Response:
        if not state["ready"]:
            return _error(503, "the engine is not running", code="not_ready", type_="server_error")
        return JSONResponse({"status": "ok", "model": config.model_name})

    @app.get("/metrics", response_class=PrometheusResponse,
             responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format 0.0.4"}})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.state.metrics = metrics
    app.state.serving_config = config
    return app


# ---------------------------------------------------------------- process entry point


def _bind(host: str, port: int) -> socket.socket:
    """Bind before uvicorn starts, so port 0 works and the printed URL has the real port."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise CrosschipError(
            f"cannot listen on {host}:{port} ({e.strerror or e})",
            "pick a free --port (or 0 for any) and a local --host",
        ) from e
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/v1"


def serve_app(
    app: FastAPI,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_timeout_s: float = DEFAULT_TIMEOUT_S,
    log_level: str = "warning",
    sock: socket.socket | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain: in-flight requests finish, the engine shuts down, exit.

    `sock`: an already bound socket (host/port are then ignored).
    """
    import uvicorn

    sock = sock if sock is not None else _bind(host, port)

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and not self.should_exit:
                print(f"serving {model_name} at {_url(sock)}", flush=True)

    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=int(drain_timeout_s) + 1,
        lifespan="on",
        access_log=False,
    )
    server = _Server(config)
    # uvicorn re-raises the caught signal after its graceful shutdown; with the default handlers
    # restored that would kill the process (SIGTERM -> exit 143). A no-op handler makes a drained
    # shutdown exit 0.
    main_thread = threading.current_thread() is threading.main_thread()  # signals are main-thread only
    handled = (signal.SIGTERM, signal.SIGINT) if main_thread else ()
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if not server.started:
        raise CrosschipError(
            "the server failed to start (see the log above)", "fix the error above and retry"
        )


def run_server(
    ckpt: Path | str,
    device: str = "auto",
    dtype: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int | None = None,
    max_queue: int | None = None,
    max_context: int | None = None,
    api_key: str | None = None,
    request_timeout_s: float = DEFAULT_TIMEOUT_S,
    compile: bool = False,
    log_level: str = "warning",
    max_num_batched_tokens: int | None = None,
    block_size: int | None = None,
    prefix_caching: bool = True,
    decode_kernel: str = "auto",
) -> None:
    """`crosschip serve`: load the checkpoint into a BatchEngine and serve it (blocks until shutdown).

    dtype is a precision name (fp32, bf16, fp16) or auto (None: auto, see `devices.serve_precision`). None for
    max_batch/max_queue/max_context/max_num_batched_tokens/block_size means the engine's default.
    """
    sock = _bind(host, port)  # fail fast on a busy port, before loading the model
    limits = {"max_batch": max_batch, "max_queue": max_queue, "max_context": max_context,
              "max_num_batched_tokens": max_num_batched_tokens, "block_size": block_size,
              "prefix_caching": prefix_caching, "decode_kernel": decode_kernel}
    try:
        engine, tokenizer = _load(Path(ckpt), device, dtype, limits, compile)
    except BaseException:
        sock.close()
        raise
    app = build_app(engine, tokenizer, api_key=api_key, request_timeout_s=request_timeout_s, root=Path(ckpt))
    serve_app(app, engine.model_name, drain_timeout_s=request_timeout_s, log_level=log_level, sock=sock)


def _load(
    ckpt: Path,
    device: str,
    dtype: str | None,
    limits: dict[str, int | bool | str | None],
    compile: bool,
) -> tuple[Engine, Any]:
    """The BatchEngine and the checkpoint's tokenizer; bad settings become CrosschipErrors."""
    from crosschip.checkpoint import load_model, load_tokenizer_if_present
    from crosschip.devices import resolve_device, torch_dtype
    from crosschip.models import attention_of
    from crosschip.serve.engine import BatchEngine
    from crosschip.serve.int8 import load_int8_weights

    tokenizer = load_tokenizer_if_present(ckpt)
    if tokenizer is None:
        raise CrosschipError(
            f"checkpoint {ckpt} has no tokenizer files",
            "copy the tokenizer files (tokenizer.json, tokenizer_config.json) into it",
        )
    warning = bos_warning(ckpt, tokenizer)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    target = resolve_device(device)
    precision, why = _precision(ckpt, target, dtype)
    # Loaded before the engine is built: a checkpoint transformers cannot build is load_model's own one-line
    # error, and only the engine's ValueErrors below are about the serving limits.
    model, ckpt_obj = load_model(ckpt, target, torch_dtype(precision))
    int8 = load_int8_weights(ckpt_obj)  # W8A8 checkpoints: their Linears run on int8 kernels, not dequantized
    try:
        engine = BatchEngine(model, tokenizer, model_name=ckpt.resolve().name, device=target, compile=compile,
                             int8=int8, **{k: v for k, v in limits.items() if v is not None})
    except ValueError as e:  # the engine's checks of max_batch / max_queue / max_context
        fix = "adjust --max-batch / --max-queue / --max-context / --max-num-batched-tokens / --block-size"
        raise CrosschipError(f"cannot serve {ckpt}: {e}", fix) from e
    kernels = getattr(engine.runner, "int8_backends", [])
    w8a8 = f"; W8A8 on int8 kernels ({', '.join(kernels)})" if kernels else ""
    decode = " + CPU decode kernel" if getattr(engine.runner, "decode_kernel", None) is not None else ""
    print(f"loaded {type(model).__name__} on {target} ({precision}: {why}; attention {attention_of(model)}, "
          f"runner {type(engine.runner).__name__}{decode}{w8a8})", flush=True)  # stdout, as `serving ...`
    return engine, tokenizer


def _precision(ckpt: Path, device: Any, dtype: str | None) -> tuple[str, str]:
    """The compute precision: the one asked for, or `--dtype auto`'s pick for how the checkpoint stores floats."""
    import torch

    from crosschip import checkpoint
    from crosschip.devices import PRECISIONS, precision_name, serve_precision

    if dtype not in (None, "auto"):
        return dtype, "as asked"
    ckpt_obj = checkpoint.open_checkpoint(ckpt, verify=False)
    fmt, _ = checkpoint.storage_format(ckpt_obj)
    if fmt in PRECISIONS:
        stored = fmt
    else:  # a quantized format: its unquantized tensors (norms, embeddings) are in the config's dtype
        declared = getattr(ckpt_obj.config, "dtype", None) or getattr(ckpt_obj.config, "torch_dtype", None)
        stored = precision_name(declared) if isinstance(declared, torch.dtype) else "fp32"
    return serve_precision(stored, device)


def bos_warning(ckpt: Path, tokenizer: Any) -> str | None:
    """One line when a crosschip-trained checkpoint's tokenizer does not add the BOS training used.

    Text prompts are tokenized exactly as the tokenizer does (no server-side BOS), so such a checkpoint
    scores text without the BOS every training document started with; `convert` writes a repaired copy.
    """
    from crosschip import checkpoint
    from crosschip.data.tokenizer import needs_bos_repair

    root = checkpoint.resolve_checkpoint_dir(ckpt)
    manifest = checkpoint.read_manifest(root) or {}
    if not needs_bos_repair(manifest.get("provenance", {}), tokenizer):
        return None
    fmt, layout = checkpoint.storage_format(checkpoint.open_checkpoint(root, verify=False))
    layout_flag = "" if layout == "hf" else f" --layout {layout}"
    return (
        f"warning: the tokenizer of {root} does not add BOS, but crosschip training put BOS before every "
        f"document, so text prompts get another distribution (fix: crosschip convert {root} {root}-bos "
        f"--to {fmt}{layout_flag}, then serve the copy: its tokenizer adds BOS)"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m crosschip.serve.api", description="Serve a checkpoint (OpenAI API)."
    )
    p.add_argument("ckpt", type=Path)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--max-queue", type=int, default=None)
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-timeout", type=float, default=DEFAULT_TIMEOUT_S)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false")
    p.add_argument("--decode-kernel", default="auto", choices=("auto", "cpp", "torch"))
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        run_server(
            a.ckpt,
            a.device,
            a.dtype,
            a.host,
            a.port,
            a.max_batch,
            a.max_queue,
            a.max_context,
            a.api_key,
            a.request_timeout,
            a.compile,
            a.log_level,
            a.max_num_batched_tokens,
            a.block_size,
            a.prefix_caching,
            a.decode_kernel,
        )
    except CrosschipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the same one line as every crosschip command (cli_common.run_app), no traceback
        from crosschip.cli_common import TRACEBACK_ENV, unexpected_error

        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        message, code = unexpected_error(e)
        print(f"error: {message}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
