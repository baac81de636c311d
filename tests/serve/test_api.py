"""The OpenAI serving layer in-process: shapes, exact logprobs, streaming, stop strings, n, errors.

The app runs on `ReferenceEngine` (conftest): a slow but obviously correct Engine, so these tests
pin the serving layer alone. `test_server_process.py` repeats the essentials against the real
engine in a real server process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from crosschip.serve.api import build_app
from crosschip.serve.engine_api import EngineStats
from crosschip.serve.metrics import Counter, Histogram, ServerMetrics
from crosschip.serve.text import StopTracker, TokenText, token_offsets

MODEL = "tiny-llama"
PROMPT = "Return the number of items"


@pytest.fixture(scope="module")
def engine(make_reference_engine: Callable[..., Any]) -> Any:
    return make_reference_engine(model_name=MODEL, max_context=256)


@pytest.fixture(scope="module")
def client(engine: Any, serve_tokenizer: Any) -> Iterator[TestClient]:
    with TestClient(build_app(engine, serve_tokenizer, request_timeout_s=30)) as c:
        yield c


def complete(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def chat(client: TestClient, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Say hello"}]
    r = client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": messages, "temperature": 0, **body}
    )
    assert r.status_code == 200, r.text
    return r.json()


def sse(client: TestClient, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST with stream=true; the parsed events (the final [DONE] is checked and dropped)."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """What the server must run for a text prompt: exactly `tokenizer(text)`, which starts with one BOS."""
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    return ids


# ---------------------------------------------------------------- endpoints and shapes


def test_models_health_openapi(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    spec = client.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(spec["paths"])


def test_completion_greedy_matches_reference(
    client: TestClient, ref_greedy: Any, serve_tokenizer: Any
) -> None:
    out = complete(client, max_tokens=12)
    ids = prompt_ids(serve_tokenizer, PROMPT)
    expected = ref_greedy(ids, 12)
    choice = out["choices"][0]
    assert out["object"] == "text_completion" and list(out)[:5] == [
        "id",
        "object",
        "created",
        "model",
        "choices",
    ]
    assert choice["text"] == serve_tokenizer.decode(expected)
    assert choice["finish_reason"] == ("length" if len(expected) == 12 else "stop")
    assert out["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(expected),
        "total_tokens": len(ids) + len(expected),
    }


def test_echo_prompt_logprobs_are_exact(client: TestClient, ref_logprobs: Any, serve_tokenizer: Any) -> None:
    """The scoring idiom (echo + logprobs): every prompt token's logprob equals log_softmax of the model."""
    out = complete(client, max_tokens=3, echo=True, logprobs=2)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    ids = prompt_ids(serve_tokenizer, PROMPT)
    echoed = len(ids)  # every scored token, BOS included
    generated = out["usage"]["completion_tokens"]
    assert out["usage"]["prompt_tokens"] == echoed and choice["text"].startswith(PROMPT)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == echoed + generated
    assert lp["tokens"][0] == serve_tokenizer.bos_token and "".join(lp["tokens"][1:echoed]) == PROMPT
    # Nothing precedes the first token: null logprob and null top_logprobs, as OpenAI and vLLM answer.
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    rows = ref_logprobs(ids)
    for i in range(1, echoed):
        expected = float(rows[i - 1, ids[i]])  # token i, conditioned on BOS..i-1
        assert lp["token_logprobs"][i] == pytest.approx(expected, abs=1e-4)
        top = lp["top_logprobs"][i]
        assert 2 <= len(top) <= 3 and max(top.values()) == pytest.approx(float(rows[i - 1].max()), abs=1e-4)
    offsets = lp["text_offset"]  # index the returned text: BOS prints nothing, so it shares offset 0
    assert offsets == sorted(offsets) and offsets[:2] == [0, 0] and offsets[echoed] == len(PROMPT)
    assert all(choice["text"][o:].startswith(t) for o, t in zip(offsets[1:echoed], lp["tokens"][1:], strict=False))


def test_echo_without_generation_and_add_special_tokens(client: TestClient, serve_tokenizer: Any) -> None:
    """vLLM's scoring forms: `max_tokens: 0` with echo returns only the prompt; `add_special_tokens: false`."""
    ids = prompt_ids(serve_tokenizer, PROMPT)
    scored = complete(client, max_tokens=0, echo=True, logprobs=1)
    choice = scored["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(ids) and choice["logprobs"]["token_logprobs"][0] is None
    assert scored["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    with_one = complete(client, max_tokens=1, echo=True, logprobs=1)["choices"][0]["logprobs"]
    assert with_one["token_logprobs"][: len(ids)] == choice["logprobs"]["token_logprobs"]
    events = sse(client, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 0, "echo": True})
    assert "".join(c["text"] for e in events for c in e["choices"]) == PROMPT
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["length"]
    bare = complete(client, max_tokens=0, echo=True, logprobs=0, add_special_tokens=False)
    assert bare["usage"]["prompt_tokens"] == len(ids) - 1  # no BOS: the tokens the tokenizer gives without it


def test_eos_is_returned_like_vllm(make_reference_engine: Callable[..., Any], ref_model: Any,
                                   serve_tokenizer: Any) -> None:
    """A sampled EOS ends the choice and is returned in logprobs (not in text), as vLLM does: lm-eval drops the
    last echoed entry as the generated token, so a missing EOS entry would cost it a prompt token."""
    import copy

    eos = serve_tokenizer.eos_token_id
    biased = copy.deepcopy(ref_model)  # every greedy token is EOS
    head = biased.lm_head
    biased.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.lm_head.weight.copy_(head.weight)
        biased.lm_head.bias.zero_()
        biased.lm_head.bias[eos] = 1e3
    with TestClient(build_app(make_reference_engine(model=biased, model_name=MODEL), serve_tokenizer)) as c:
        ids = prompt_ids(serve_tokenizer, PROMPT)
        out = complete(c, max_tokens=1, echo=True, logprobs=1, return_tokens_as_token_ids=True)
        choice, lp = out["choices"][0], out["choices"][0]["logprobs"]
        assert choice["text"] == PROMPT and choice["finish_reason"] == "stop"
        assert lp["tokens"] == [f"token_id:{t}" for t in [*ids, eos]] and lp["token_logprobs"][-1] > -1e-3
        assert out["usage"]["completion_tokens"] == 1
        # lm-eval's parse_logprobs: sum(token_logprobs[ctxlen:-1]) is the prompt's, the EOS entry dropped.
        assert sum(lp["token_logprobs"][1:-1]) == pytest.approx(sum(lp["token_logprobs"][1 : len(ids)]))
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 3, "logprobs": True})
        message = r.json()["choices"][0]
        assert message["message"]["content"] == "" and message["finish_reason"] == "stop"
        assert [e["token"] for e in message["logprobs"]["content"]] == [serve_tokenizer.eos_token]


def test_chat_prompt_has_one_bos(client: TestClient, serve_tokenizer: Any) -> None:
    """The template renders BOS; the rendered text is encoded without special tokens, as HF and vLLM do."""
    messages = [{"role": "user", "content": "Say hello"}]
    expected = serve_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                    return_dict=True)["input_ids"]
    assert expected.count(serve_tokenizer.bos_token_id) == 1
    assert chat(client, max_tokens=1)["usage"]["prompt_tokens"] == len(expected)


def test_generated_logprobs_are_exact(client: TestClient, ref_logprobs: Any, serve_tokenizer: Any) -> None:
    out = chat(client, max_tokens=6, logprobs=True, top_logprobs=3)
    content = out["choices"][0]["logprobs"]["content"]
    template = serve_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello"}], tokenize=False, add_generation_prompt=True
    )
    ids = serve_tokenizer(template, add_special_tokens=False)["input_ids"]
    gen = [_token_id(serve_tokenizer, entry) for entry in content]
    rows = ref_logprobs(ids + gen)
    assert len(content) == out["usage"]["completion_tokens"]
    for k, entry in enumerate(content):
        row = rows[len(ids) - 1 + k]
        assert list(entry) == ["token", "logprob", "bytes", "top_logprobs"]
        assert entry["logprob"] == pytest.approx(float(row[gen[k]]), abs=1e-4)
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(
            torch.topk(row, 3).values.tolist(), abs=1e-4
        )
    assert (
        b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", "replace")
        == out["choices"][0]["message"]["content"]
    )


def _token_id(tokenizer: Any, entry: dict[str, Any]) -> int:
    """Recover a token id from its raw bytes (unique in byte-level BPE)."""
    text = TokenText(tokenizer)
    matches = [i for i in range(len(tokenizer)) if text.bytes(i) == bytes(entry["bytes"])]
    assert len(matches) == 1, entry
    return matches[0]


# ---------------------------------------------------------------- streaming, stop strings, n


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_equals_non_stream(client: TestClient, path: str) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "temperature": 0,
        "max_tokens": 10,
        "stream_options": {"include_usage": True},
    }
    body |= {"prompt": PROMPT} if "chat" not in path else {"messages": [{"role": "user", "content": "Hi"}]}
    events = sse(client, path, body)
    plain = client.post(path, json={k: v for k, v in body.items() if k != "stream_options"}).json()
    choices = [c for e in events for c in e["choices"]]
    if "chat" in path:
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["delta"]["content"] or "" for c in choices)
        assert text == plain["choices"][0]["message"]["content"]
        assert all(e["object"] == "chat.completion.chunk" for e in events)
    else:
        assert "".join(c["text"] for c in choices) == plain["choices"][0]["text"]
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == [
        plain["choices"][0]["finish_reason"]
    ]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]


def test_stop_string_cuts_text_stream_and_not(client: TestClient) -> None:
    full = complete(client, max_tokens=20)["choices"][0]["text"]
    stop = next(full[i : i + 2] for i in range(4, len(full) - 2) if full.find(full[i : i + 2]) >= 2)
    expected = full[: full.find(stop)]
    out = complete(client, max_tokens=20, stop=[stop, "\x00never"], logprobs=0)["choices"][0]
    assert out["text"] == expected and out["finish_reason"] == "stop"
    offsets = out["logprobs"]["text_offset"]
    assert offsets and all(o < len(expected) for o in offsets), "logprobs cover exactly the kept tokens"
    events = sse(
        client,
        "/v1/completions",
        {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 20, "stop": stop},
    )
    pieces = [c["text"] for e in events for c in e["choices"]]
    assert "".join(pieces) == expected and all(stop not in p for p in pieces)


def test_n_choices_use_seed_plus_index(client: TestClient) -> None:
    body = {"max_tokens": 8, "temperature": 1.0, "seed": 7}
    many = complete(client, n=3, **body)
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in many["choices"]]
    assert len(set(texts)) > 1, "different seeds should sample differently"
    for i, text in enumerate(texts):
        assert complete(client, **{**body, "seed": 7 + i})["choices"][0]["text"] == text
    assert many["usage"]["prompt_tokens"] == complete(client, max_tokens=1)["usage"]["prompt_tokens"]


def test_multiple_prompts_and_token_prompts(client: TestClient, serve_tokenizer: Any) -> None:
    ids = prompt_ids(serve_tokenizer, PROMPT)
    by_text = complete(client, max_tokens=5)["choices"][0]["text"]
    out = complete(client, prompt=[ids, ids], n=2, max_tokens=5)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert {c["text"] for c in out["choices"]} == {by_text}


# ---------------------------------------------------------------- errors


COMPLETION = {"model": MODEL, "prompt": "hi"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
BAD_INPUTS = [
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "temperature": -0.5}, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p"),
    ("/v1/completions", {**COMPLETION, "top_p": 1.5}, "top_p"),
    ("/v1/completions", {**COMPLETION, "n": 1000}, "n"),
    ("/v1/completions", {**COMPLETION, "n": 17}, "n"),
    ("/v1/completions", {**COMPLETION, "prompt": "word " * 400}, "prompt"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 255}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, 10**6]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {**COMPLETION, "frequency_penalty": 2.5}, "frequency_penalty"),  # OpenAI's range: [-2, 2]
    ("/v1/completions", {**COMPLETION, "max_tokens": "7"}, "max_tokens"),  # strict: a string is no integer
    ("/v1/completions", {**COMPLETION, "echo": "true"}, "echo"),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"400": 1.0}}, "logit_bias"),  # outside the vocabulary
    ("/v1/completions", {**COMPLETION, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {**COMPLETION, "bogus": 1}, "bogus"),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "tools": []}, "tools"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 10**6, "max_completion_tokens": 4}, "max_tokens"),
]


@pytest.mark.parametrize(
    ("path", "body", "param"), BAD_INPUTS, ids=[f"{p[4:]}-{x}" for p, _, x in BAD_INPUTS]
)
def test_bad_input_is_400_naming_the_field(
    client: TestClient, path: str, body: dict[str, Any], param: str
) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and param.split(".")[0] in error["message"]


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"model": "tiny-llama", "prompt": "x"', "JSON"),
        (b'\xff\xfe{"model": 1}', "UTF-8"),
        (b'{"model": "tiny-llama", "prompt": "caf\xe9"}', "UTF-8"),
        (b'{"model": "tiny-llama", "prompt": "\\ud800"}', "UTF-8"),
        (b"", "empty"),
        (b"[1, 2]", "object"),
    ],
)
def test_malformed_bodies_are_400(client: TestClient, raw: bytes, words: str) -> None:
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]
    assert client.get("/health").status_code == 200


def test_unknown_model_is_404_and_an_empty_name_means_the_served_one(client: TestClient) -> None:
    """OpenAI and vLLM answer an unknown model 404 (`model_not_found`); "" is schema-valid and, as in vLLM
    (`_is_model_supported`), names the served model."""
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    r = client.post("/v1/completions", json={**COMPLETION, "model": ""})
    assert r.status_code == 200 and r.json()["model"] == MODEL, r.text


def test_unknown_route_is_openai_404(client: TestClient) -> None:
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_api_key(engine: Any, serve_tokenizer: Any) -> None:
    with TestClient(build_app(engine, serve_tokenizer, api_key="s3cret")) as c:
        assert c.get("/v1/models").status_code == 401
        r = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key


def test_timeout_is_504_and_frees_the_sequence(make_reference_engine: Any, serve_tokenizer: Any) -> None:
    slow = make_reference_engine(model_name=MODEL, step_delay_s=0.05)
    with TestClient(build_app(slow, serve_tokenizer, request_timeout_s=0.3)) as c:
        r = c.post("/v1/completions", json={**COMPLETION, "max_tokens": 100})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert slow.stats().running == 0 and slow.stats().kv_used_tokens == 0


def test_metrics_count_requests_and_tokens(client: TestClient) -> None:
    before = client.get("/metrics").text
    complete(client, max_tokens=4)
    client.post("/v1/completions", json={**COMPLETION, "top_p": 5})
    text = client.get("/metrics").text
    assert (
        _sample(text, 'crosschip_requests_total{status="200"}')
        == _sample(before, 'crosschip_requests_total{status="200"}') + 1
    )
    assert _sample(text, 'crosschip_requests_total{status="400"}') >= 1
    assert _sample(text, "crosschip_generation_tokens_total") >= 4
    assert _sample(text, "crosschip_time_to_first_token_seconds_count") >= 1
    assert _sample(text, "crosschip_running_batch_size") == 0 and "crosschip_queue_depth 0" in text


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[-1])
    return 0.0


# ---------------------------------------------------------------- helpers: text and metrics


def test_stop_tracker_holds_back_a_possible_stop_prefix(serve_tokenizer: Any) -> None:
    ids = serve_tokenizer("hello world, goodbye", add_special_tokens=False)["input_ids"]
    tracker = StopTracker(serve_tokenizer, [], ["xyz", "ld, go"])
    released = ""
    for token in ids:
        tracker.push(token)
        released += tracker.release()
        assert "l" not in released[len("hello wor") :], "a possible stop prefix was sent"
        if tracker.stopped:
            break
    assert tracker.stopped and tracker.text == "hello wor"
    assert released + tracker.release() == "hello wor"
    plain = StopTracker(serve_tokenizer, [], [])
    for token in ids:
        plain.push(token)
    plain.finish()
    assert plain.text == plain.release() == "hello world, goodbye" and not plain.stopped


def test_token_text_reports_partial_utf8_as_bytes(serve_tokenizer: Any) -> None:
    ids = serve_tokenizer("日本 café", add_special_tokens=False)["input_ids"]
    text = TokenText(serve_tokenizer)
    assert b"".join(text.bytes(i) for i in ids) == "日本 café".encode()
    assert any(text.text(i).startswith("bytes:\\x") for i in ids)  # a tiny vocab splits the CJK bytes
    offsets, decoded = token_offsets(serve_tokenizer, ids)
    assert decoded == "日本 café" and offsets == sorted(offsets)
    assert text.text(serve_tokenizer.eos_token_id) == "<|eos|>"


def test_prometheus_format() -> None:
    metrics = ServerMetrics(lambda: EngineStats(2, 3, 40, 100, 8, 16))
    metrics.requests.inc(status="200")
    metrics.ttft.observe(0.07)
    text = metrics.render()
    assert "# TYPE crosschip_requests counter" in text
    assert 'crosschip_requests_total{status="200"} 1' in text
    assert 'crosschip_time_to_first_token_seconds_bucket{le="0.05"} 0' in text
    assert 'crosschip_time_to_first_token_seconds_bucket{le="0.1"} 1' in text
    assert 'crosschip_time_to_first_token_seconds_bucket{le="+Inf"} 1' in text
    assert "crosschip_queue_depth 2" in text and "crosschip_kv_cache_used_tokens 40" in text
    with pytest.raises(ValueError):
        Counter("x", "y").inc(-1)
    with pytest.raises(ValueError):
        Histogram("x", "y", [2.0, 1.0])


# ---------------------------------------------------------------- the schema says what the server does (issue 14)


def test_openapi_documents_content_types_and_this_servers_limits(client: TestClient, serve_tokenizer: Any) -> None:
    spec = client.get("/openapi.json").json()
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == [client.get("/metrics").headers["content-type"]]  # Prometheus text, not JSON
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert {"application/json", "text/event-stream"} <= set(spec["paths"][path]["post"]["responses"]["200"]
                                                                ["content"])
    props = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["n"]["maximum"] == 16  # the server's max_n, not the protocol's hard bound
    bias = next(a for a in props["logit_bias"]["anyOf"] if a.get("type") == "object")
    keys = re.compile(bias["propertyNames"]["pattern"])
    vocab = len(serve_tokenizer)  # the ReferenceEngine has no vocab_size of its own: the tokenizer's bounds it
    assert keys.match(str(vocab - 1)) and not keys.match(str(vocab)) and not keys.match("01")


def test_echo_without_generation_scores_a_prompt_that_fills_the_context(client: TestClient, engine: Any) -> None:
    ids = [5 + i % 50 for i in range(engine.max_context)]
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": ids, "max_tokens": 0, "echo": True,
                                             "logprobs": 0})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == engine.max_context
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": ids, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_penalties_and_logit_bias_are_accepted(client: TestClient) -> None:
    r = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 4, "frequency_penalty": 1.0,
                                             "presence_penalty": -0.5, "logit_bias": {"7": 100}})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2, "frequency_penalty": 2.0})
    assert r.status_code == 200, r.text
