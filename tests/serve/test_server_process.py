"""Acceptance: the real engine in a real server process, driven by the official `openai` client.

Two shared servers per module: `server` (tiny checkpoint, batch 8) for behaviour and exactness, and
`tight` (a long-context tiny checkpoint, batch 1, queue 1, an API key) for admission control and
cancellation. The SIGTERM test starts its own process because it ends it.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from crosschip.serve.text import TokenText

pytestmark = pytest.mark.slow

API_KEY = "test-key-123"
LONG_CONTEXT = 65536
LONG_TOKENS = 65000  # a minute or more on a CPU: it cannot finish while a test watches it (cancelled early)
DRAIN_TOKENS = 3000  # ~3 s on a CPU: still running when SIGTERM lands, quick to drain
PROMPT = "Return the number of items"


@pytest.fixture(scope="module")
def long_ckpt(tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a 64k-token context: generations that last long enough to interrupt."""
    from crosschip import checkpoint, models

    preset = dataclasses.replace(models.get_preset("tiny"), max_position=LONG_CONTEXT)
    tok = tiny_tokenizer
    config = preset.build_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    model = models.build_model(config, seed=0)
    out = tmp_path_factory.mktemp("serve-long") / "tiny-long"
    return checkpoint.write_checkpoint(out, model, tok, provenance={"source": "tests/serve"})


@pytest.fixture(scope="module")
def server(launch: Callable[..., Any], serve_ckpt: Path) -> Any:
    return launch(serve_ckpt, "--max-batch", "8", "--max-queue", "64", "--max-context", "256")


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tight(launch: Callable[..., Any], long_ckpt: Path) -> Any:
    return launch(
        long_ckpt,
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--max-context",
        str(LONG_CONTEXT),
        "--api-key",
        API_KEY,
    )


@pytest.fixture(scope="module")
def id_of(serve_tokenizer: Any) -> dict[str, int]:
    """Token string (as the API reports it) -> id; unique for a byte-level BPE vocabulary."""
    text = TokenText(serve_tokenizer)
    table = {text.text(i): i for i in range(len(serve_tokenizer))}
    assert len(table) == len(serve_tokenizer)
    return table


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """What the server must run for a text prompt: exactly `tokenizer(text)`, which starts with one BOS."""
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    return ids


# ---------------------------------------------------------------- behaviour through the openai client


def test_models_health_metrics_openapi(server: Any, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [server.model]
    assert httpx.get(server.root + "/health").json()["status"] == "ok"
    assert "/v1/chat/completions" in httpx.get(server.root + "/openapi.json").json()["paths"]
    metrics = server.metrics()
    for name in (
        "crosschip_queue_depth",
        "crosschip_running_batch_size",
        "crosschip_kv_cache_used_tokens",
        "crosschip_kv_cache_used_blocks",
        "crosschip_kv_cache_total_blocks",
        "crosschip_num_preemptions",
        "crosschip_time_to_first_token_seconds_count",
        "crosschip_inter_token_latency_seconds_count",
    ):
        assert name in metrics


def test_completion_echo_logprobs_equal_the_model(
    server: Any, client: openai.OpenAI, serve_tokenizer: Any, id_of: dict[str, int], ref_logprobs: Any
) -> None:
    out = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=8, temperature=0, echo=True, logprobs=3
    )
    lp = out.choices[0].logprobs
    ids = prompt_ids(serve_tokenizer, PROMPT)
    tokens = [id_of[t] for t in lp.tokens]
    assert tokens[: len(ids)] == ids, "echo returns every scored prompt token: tokenizer(text), BOS first"
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes BOS
    rows = ref_logprobs(tokens)
    for i in range(1, len(tokens)):
        assert lp.token_logprobs[i] == pytest.approx(float(rows[i - 1, tokens[i]]), abs=1e-4), i
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(rows[i - 1].max()), abs=1e-4)
    generated = tokens[len(ids) :]
    assert out.usage.completion_tokens == len(generated) and out.choices[0].text.startswith(PROMPT)
    assert out.usage.prompt_tokens == len(ids)
    for k, token in enumerate(generated):  # greedy: every sampled token is the row's argmax
        row = rows[len(ids) - 1 + k]
        assert float(row[token]) == pytest.approx(float(row.max()), abs=1e-4)


def test_chat_logprobs_equal_the_model(
    server: Any, client: openai.OpenAI, serve_tokenizer: Any, id_of: dict[str, int], ref_logprobs: Any
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a number."}]
    out = client.chat.completions.create(
        model=server.model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = out.choices[0].logprobs.content
    template = serve_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = serve_tokenizer(template, add_special_tokens=False)["input_ids"]
    gen = [id_of[e.token] for e in content]
    rows = ref_logprobs(ids + gen)
    assert out.usage.prompt_tokens == len(ids) and len(gen) == out.usage.completion_tokens
    for k, entry in enumerate(content):
        row = rows[len(ids) - 1 + k]
        assert entry.logprob == pytest.approx(float(row[gen[k]]), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(2).values.tolist(), abs=1e-4)
        assert bytes(entry.bytes) == TokenText(serve_tokenizer).bytes(gen[k])


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_stream_equals_non_stream(server: Any, client: openai.OpenAI, kind: str) -> None:
    if kind == "chat":
        args: dict[str, Any] = {"messages": [{"role": "user", "content": "Hello there"}]}
        create, text_of = client.chat.completions.create, lambda c: c.message.content
        delta_of = lambda c: c.delta.content or ""  # noqa: E731
    else:
        args = {"prompt": PROMPT}
        create, text_of, delta_of = client.completions.create, lambda c: c.text, lambda c: c.text
    plain = create(model=server.model, max_tokens=16, temperature=0, **args)
    chunks = list(
        create(
            model=server.model,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            **args,
        )
    )
    streamed = "".join(delta_of(c) for chunk in chunks for c in chunk.choices)
    assert streamed == text_of(plain.choices[0])
    finishes = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_n_seeds_and_stop(server: Any, client: openai.OpenAI) -> None:
    many = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11, n=3
    )
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    for c in many.choices:
        alone = client.completions.create(
            model=server.model, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11 + c.index
        )
        assert alone.choices[0].text == c.text
    full = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = text[5:7]
    cut = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_32_concurrent_requests_equal_each_alone(server: Any, client: openai.OpenAI) -> None:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"]
    requests = [
        {"prompt": " ".join(words[: 1 + i % 7]) * (1 + i % 3), "max_tokens": 3 + (i * 5) % 29}
        for i in range(32)
    ]

    def run(req: dict[str, Any]) -> tuple[str, str | None]:
        out = client.completions.create(model=server.model, temperature=0, **req)
        return out.choices[0].text, out.choices[0].finish_reason

    alone = [run(r) for r in requests]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, requests))
    assert together == alone


# ---------------------------------------------------------------- bad input never crashes the server

BAD = [
    (b'{"model": "M", "prompt": "x",', None, "JSON"),
    (b'{"model": "M", "prompt": "caf\xe9"}', None, "UTF-8"),
    (b'{"model": "M", "prompt": "\\udc80"}', "prompt", "UTF-8"),
    (json.dumps({"model": "M", "prompt": "word " * 300}).encode(), "prompt", "context"),
    (b'{"model": "M", "prompt": "x", "max_tokens": 0}', "max_tokens", "max_tokens"),
    (b'{"model": "M", "prompt": "x", "temperature": -1}', "temperature", "temperature"),
    (b'{"model": "M", "prompt": "x", "top_p": 0}', "top_p", "top_p"),
    (b'{"model": "M", "prompt": "x", "top_p": 1.01}', "top_p", "top_p"),
    (b'{"model": "M", "prompt": "x", "n": 10000}', "n", "n"),
]


@pytest.mark.parametrize(("raw", "param", "words"), BAD, ids=[w for _, _, w in BAD])
def test_bad_input_is_400(server: Any, raw: bytes, param: str | None, words: str) -> None:
    body = raw.replace(b'"M"', json.dumps(server.model).encode())
    r = httpx.post(server.url + "/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert httpx.get(server.root + "/health").status_code == 200


def test_unknown_model_is_404(server: Any) -> None:
    """As OpenAI and vLLM answer it (`model_not_found`)."""
    r = httpx.post(server.url + "/completions", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and "other" in r.text


# ---------------------------------------------------------------- admission, cancellation, auth, shutdown


def _wait_for(predicate: Callable[[], bool], timeout: float = 30.0, srv: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            detail = "" if srv is None else f"\nmetrics: {srv.metrics()}\nlog:\n{''.join(srv.log[-30:])}"
            pytest.fail(f"condition not reached in {timeout} s{detail}")
        time.sleep(0.05)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}


def _long_body(model: str, max_tokens: int = LONG_TOKENS, stream: bool = True) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "ignore_eos": True,
    }


def test_api_key_is_required(tight: Any) -> None:
    assert httpx.get(tight.url + "/models").status_code == 401
    r = httpx.post(
        tight.url + "/completions",
        json={"model": tight.model, "prompt": "x"},
        headers={"Authorization": "Bearer nope"},
    )
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    keyed = openai.OpenAI(base_url=tight.url, api_key=API_KEY, max_retries=0)
    assert (
        keyed.completions.create(model=tight.model, prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1
    )


def test_full_queue_is_429_and_disconnect_frees_the_cache(tight: Any) -> None:
    with httpx.Client(timeout=60) as running:
        with running.stream(
            "POST", tight.url + "/completions", json=_long_body(tight.model), headers=_auth()
        ) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()  # keep the iterator: dropping it closes the connection
            next(lines)  # the long request now holds the only batch slot
            queued: dict[str, Any] = {}
            waiter = threading.Thread(
                target=lambda: queued.update(
                    r=httpx.post(
                        tight.url + "/completions",
                        json=_long_body(tight.model, 4, stream=False),
                        headers=_auth(),
                        timeout=60,
                    )
                )
            )
            waiter.start()
            _wait_for(lambda: tight.metrics()["crosschip_queue_depth"] == 1, srv=tight)
            rejected = httpx.post(
                tight.url + "/completions", json=_long_body(tight.model, 4, False), headers=_auth()
            )
            assert rejected.status_code == 429, rejected.text
            assert (
                int(rejected.headers["Retry-After"]) >= 1 and rejected.json()["error"]["code"] == "queue_full"
            )
            assert tight.metrics()["crosschip_kv_cache_used_tokens"] > 0
            assert tight.metrics()["crosschip_kv_cache_used_blocks"] > 0
        # Leaving the block closed the connection: the long sequence is cancelled, the queued one runs.
        waiter.join(timeout=30)
    assert queued["r"].status_code == 200, "the queued request was admitted once the slot freed"
    _wait_for(lambda: tight.metrics()["crosschip_running_batch_size"] == 0, srv=tight)
    assert tight.metrics()["crosschip_kv_cache_used_tokens"] == 0
    assert tight.metrics()["crosschip_kv_cache_used_blocks"] == 0  # the aborted request's blocks are back


def test_non_streaming_disconnect_cancels(tight: Any) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            tight.url + "/completions",
            json=_long_body(tight.model, stream=False),
            headers=_auth(),
            timeout=httpx.Timeout(60, read=1.0),
        )
    _wait_for(lambda: tight.metrics()["crosschip_running_batch_size"] == 0, srv=tight)
    assert tight.metrics()["crosschip_kv_cache_used_tokens"] == 0
    assert tight.metrics()["crosschip_kv_cache_used_blocks"] == 0


def _stream_events(url: str, body: dict[str, Any], sink: list[dict[str, Any] | str]) -> None:
    """POST a streaming request; append each event, then "[DONE]" if the stream ended properly."""
    with httpx.Client(timeout=120) as c, c.stream("POST", url + "/completions", json=body) as stream:
        for line in stream.iter_lines():
            if line == "data: [DONE]":
                sink.append("[DONE]")
            elif line:
                sink.append(json.loads(line.removeprefix("data: ")))


def test_sigterm_drains_in_flight_requests_then_exits_0(launch: Callable[..., Any], long_ckpt: Path) -> None:
    """A running and a queued request both complete after SIGTERM; then the process exits 0.

    The queued one can only start once the running one is done, so its completion proves the
    server kept working after the signal (not merely that a finished response was still buffered).
    """
    srv = launch(long_ckpt, "--max-batch", "1", "--max-queue", "4", "--max-context", str(LONG_CONTEXT))
    usage = {"stream_options": {"include_usage": True}}
    running: list[dict[str, Any] | str] = []
    queued: list[dict[str, Any] | str] = []
    threads = [
        threading.Thread(
            target=_stream_events, args=(srv.url, {**_long_body(srv.model, DRAIN_TOKENS), **usage}, running)
        ),
        threading.Thread(
            target=_stream_events, args=(srv.url, {**_long_body(srv.model, 20), **usage}, queued)
        ),
    ]
    threads[0].start()
    _wait_for(lambda: srv.metrics()["crosschip_running_batch_size"] == 1)
    threads[1].start()
    _wait_for(lambda: srv.metrics()["crosschip_queue_depth"] == 1)
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=120)
    for events, expected in ((running, DRAIN_TOKENS), (queued, 20)):
        assert events[-1] == "[DONE]", "the stream was cut"
        assert events[-2]["usage"]["completion_tokens"] == expected  # type: ignore[index]
    assert srv.proc.wait(timeout=60) == 0, "".join(srv.log)
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.root + "/health")
