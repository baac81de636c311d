"""`return_tokens_as_token_ids` (vLLM's extension): logprob tokens and top_logprobs keys as "token_id:N".

`crosschip verify` scores endpoints through this field, so ids must be exact and the logprobs must be
the ones the model gives those ids. Runs in-process on the `ReferenceEngine` (see conftest).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from crosschip.serve.api import build_app
from crosschip.serve.text import TokenText

MODEL = "tiny-llama"
PROMPT = "Return the number of items"


@pytest.fixture(scope="module")
def client(make_reference_engine: Callable[..., Any], serve_tokenizer: Any) -> Iterator[TestClient]:
    engine = make_reference_engine(model_name=MODEL, max_context=256)
    with TestClient(build_app(engine, serve_tokenizer, request_timeout_s=30)) as c:
        yield c


def _id(token: str) -> int:
    assert token.startswith("token_id:"), token
    return int(token.removeprefix("token_id:"))


def _post(client: TestClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(path, json={"model": MODEL, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_completion_echo_ids_and_logprobs_are_exact(
    client: TestClient, serve_tokenizer: Any, ref_logprobs: Callable[[list[int]], torch.Tensor]
) -> None:
    ids = [serve_tokenizer.bos_token_id, *serve_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]]
    body = {"prompt": ids, "echo": True, "logprobs": 3, "max_tokens": 4, "return_tokens_as_token_ids": True}
    out = _post(client, "/v1/completions", body)
    lp = out["choices"][0]["logprobs"]
    got = [_id(t) for t in lp["tokens"]]
    generated = got[len(ids) :]
    assert got[: len(ids)] == ids and len(generated) == out["usage"]["completion_tokens"]
    rows = ref_logprobs(ids + generated)  # [len, V]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for t in range(1, len(got)):
        assert lp["token_logprobs"][t] == pytest.approx(float(rows[t - 1, got[t]]), abs=1e-4)
        top = {_id(k): v for k, v in lp["top_logprobs"][t].items()}
        expected = torch.topk(rows[t - 1], 3).indices.tolist()
        assert set(expected) <= set(top) and len(top) <= 4  # top-3 plus the actual token
        for token_id, value in top.items():
            assert value == pytest.approx(float(rows[t - 1, token_id]), abs=1e-4)


def test_text_prompt_echoes_exactly_the_tokenizer_ids(
    client: TestClient, serve_tokenizer: Any, ref_logprobs: Callable[[list[int]], torch.Tensor]
) -> None:
    """A text prompt runs as `tokenizer(text)` (BOS first, as training packed every document), no more, no less."""
    ids = serve_tokenizer(PROMPT)["input_ids"]
    body = {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 1, "return_tokens_as_token_ids": True}
    lp = _post(client, "/v1/completions", body)["choices"][0]["logprobs"]
    got = [_id(t) for t in lp["tokens"]]
    assert got[: len(ids)] == ids and ids[0] == serve_tokenizer.bos_token_id
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    rows = ref_logprobs(ids)
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx([float(rows[t - 1, ids[t]]) for t in range(1, len(ids))],
                                                              abs=1e-4)


def test_completion_stream_and_default_rendering(client: TestClient, serve_tokenizer: Any) -> None:
    body = {"prompt": PROMPT, "logprobs": 2, "max_tokens": 5}
    plain = _post(client, "/v1/completions", body)["choices"][0]["logprobs"]
    streaming = {"model": MODEL, "temperature": 0, "stream": True, "return_tokens_as_token_ids": True, **body}
    with client.stream("POST", "/v1/completions", json=streaming) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [t for e in events for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]]
    text = TokenText(serve_tokenizer)
    assert [text.text(_id(t)) for t in streamed] == plain["tokens"]  # same tokens, other rendering
    assert not any(t.startswith("token_id:") for t in plain["tokens"])


def test_chat_ids_keep_real_bytes(
    client: TestClient, serve_tokenizer: Any, ref_greedy: Callable[[list[int], int], list[int]]
) -> None:
    messages = [{"role": "user", "content": "Say hello"}]
    body = {"messages": messages, "max_tokens": 5, "logprobs": True, "top_logprobs": 2}
    out = _post(client, "/v1/chat/completions", {**body, "return_tokens_as_token_ids": True})
    content = out["choices"][0]["logprobs"]["content"]
    rendered = serve_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = serve_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert [_id(e["token"]) for e in content] == ref_greedy(prompt, 5)
    text = TokenText(serve_tokenizer)
    for entry in content:
        assert entry["bytes"] == list(text.bytes(_id(entry["token"])))
        assert len(entry["top_logprobs"]) == 2
        assert all(t["bytes"] == list(text.bytes(_id(t["token"]))) for t in entry["top_logprobs"])
