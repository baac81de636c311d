"""Verify sides: parsing, the in-process checkpoint side against plain HF, the endpoint side against a real server.

The endpoint acceptance test starts a real `python -m crosschip.serve.api` process on the same tiny
checkpoint and checks it scores like the in-process side (the issue's acceptance criterion). A small
stdlib HTTP server stands in for endpoints that lack vLLM's extensions.
"""

from __future__ import annotations

import json
import math
import re
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from crosschip.checkpoint import read_manifest, sha256_file
from crosschip.errors import CrosschipError
from crosschip.verify.prompts import load_prompts, tokenize_prompts
from crosschip.verify.sides import (
    TEACHER_FORCED_METRICS,
    CheckpointSide,
    EndpointSide,
    MetricUnavailable,
    SideSpec,
    open_side,
    parse_side,
    plan_batches,
)
from serverkit import start_server


@pytest.fixture(scope="module")
def ckpt(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("tiny", tmp_path_factory.mktemp("sides") / "tiny")


@pytest.fixture(scope="module")
def side(ckpt: Path) -> Iterator[CheckpointSide]:
    s = CheckpointSide(ckpt)
    yield s
    s.close()


@pytest.fixture(scope="module")
def hf_model(ckpt: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(side: CheckpointSide) -> tuple[list[list[int]], list[list[int]]]:
    """The shipped prompts, cut short: (teacher-forced sequences, greedy prompts)."""
    sequences, greedy = tokenize_prompts(load_prompts(None), side.tokenizer, max_tokens=40)
    return sequences[:6], greedy[:3]


# ---------------------------------------------------------------- parse_side


def test_parse_checkpoint_forms(ckpt: Path) -> None:
    assert parse_side(str(ckpt)) == SideSpec("checkpoint", ckpt, "cpu", None, None, None)
    assert parse_side(f"{ckpt}@cuda:1:bf16") == SideSpec("checkpoint", ckpt, "cuda:1", "bf16", None, None)
    assert parse_side(f"{ckpt}@cuda:1") == SideSpec("checkpoint", ckpt, "cuda:1", None, None, None)
    assert parse_side(f"{ckpt}@npu:0:fp16").device == "npu:0"
    assert parse_side(f"{ckpt}:fp32") == SideSpec("checkpoint", ckpt, "cpu", "fp32", None, None)


def test_parse_checkpoint_path_with_at(tmp_path: Path) -> None:
    odd = tmp_path / "exp@2024"
    odd.mkdir()
    assert parse_side(str(odd)).path == odd
    assert parse_side(f"{odd}@cpu:bf16") == SideSpec("checkpoint", odd, "cpu", "bf16", None, None)


def test_parse_endpoints() -> None:
    spec = parse_side("https://gpu-host:8443/v1#deepseek-v3")
    assert spec == SideSpec("endpoint", None, "", None, "https://gpu-host:8443/v1", "deepseek-v3")
    assert parse_side("http://127.0.0.1:8000/v1/").url == "http://127.0.0.1:8000/v1"
    assert parse_side("http://127.0.0.1:8000/v1").model is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://127.0.0.1:8000", "use http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/v1/completions#m", "use http://127.0.0.1:8000/v1#m"),
        ("http:///v1", "no host"),
        ("does/not/exist@cpu:bf16", "does not exist"),
        ("", "empty side"),
    ],
)
def test_parse_errors(text: str, expected: str) -> None:
    with pytest.raises(CrosschipError, match=re.escape(expected)):
        parse_side(text)


def test_parse_bad_device_or_dtype(ckpt: Path) -> None:
    for bad in (f"{ckpt}@gpu", f"{ckpt}@cpu:int8"):
        with pytest.raises(CrosschipError, match="is not a device") as err:
            parse_side(bad)
        assert "fp32, bf16 or fp16" in str(err.value)


# ---------------------------------------------------------------- CheckpointSide


def test_scores_equal_plain_hf_forward(side: CheckpointSide, hf_model: Any, prompts: Any) -> None:
    sequences = prompts[0]
    scores = side.score(sequences, top_k=5)
    assert len(scores) == len(sequences)
    for ids, s in zip(sequences, scores, strict=True):
        with torch.inference_mode():
            ref = torch.log_softmax(hf_model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        assert s.logprobs is not None and s.logprobs.dtype == torch.float32 and s.logprobs.device.type == "cpu"
        torch.testing.assert_close(s.logprobs, ref, atol=1e-5, rtol=0)
        assert s.target_ids.tolist() == ids[1:]
        torch.testing.assert_close(
            s.token_logprobs, ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-5, rtol=0
        )
        assert s.top_ids.shape == (len(ids) - 1, 5)
        assert s.top_ids[:, 0].tolist() == ref.argmax(-1).tolist()
        assert (s.top_logprobs[:, :-1] >= s.top_logprobs[:, 1:]).all()


def test_batching_matches_one_by_one(side: CheckpointSide, prompts: Any) -> None:
    sequences = [seq[: 12 + 5 * i] for i, seq in enumerate(prompts[0])]  # all different lengths
    assert len(plan_batches([len(s) for s in sequences], side.batch_tokens)) == 1  # one padded batch
    batched = side.score(sequences, top_k=3)
    for ids, b in zip(sequences, batched, strict=True):
        (single,) = side.score([ids], top_k=3)
        assert b.logprobs is not None and single.logprobs is not None
        torch.testing.assert_close(b.logprobs, single.logprobs, atol=1e-5, rtol=0)
        assert b.top_ids.tolist() == single.top_ids.tolist()


def test_plan_batches_bounds_padded_tokens() -> None:
    lengths = [10, 30, 5, 40, 40, 8, 100]
    batches = plan_batches(lengths, max_tokens=80)
    assert [i for b in batches for i in b] == list(range(len(lengths)))  # order kept, nothing lost
    assert all(len(b) * max(lengths[i] for i in b) <= 80 for b in batches if len(b) > 1)
    assert batches[-1] == [6]  # longer than the budget: alone


def test_scores_from_logits_takes_batches_and_rows(side: CheckpointSide, prompts: Any) -> None:
    sequences = prompts[0][:3]
    expected = side.score(sequences, top_k=4)
    batch = side.forward(sequences)  # [3, L, V], right-padded
    rows = [side.forward([s])[0] for s in sequences]  # [L_i, V] each
    for logits in ([batch], rows, [batch[:2], rows[2]]):
        got = side.scores_from_logits(sequences, logits, top_k=4)
        for g, e in zip(got, expected, strict=True):
            assert g.logprobs is not None and e.logprobs is not None
            torch.testing.assert_close(g.logprobs, e.logprobs, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        side.scores_from_logits(sequences, [batch[:2]], top_k=4)


def test_greedy_equals_argmax_loop(side: CheckpointSide, hf_model: Any, prompts: Any) -> None:
    eos = side.tokenizer.eos_token_id
    for prompt in prompts[1]:
        run = side.greedy(prompt, max_new_tokens=10, top_n=3)
        expected: list[int] = []
        with torch.inference_mode():
            for _ in range(10):
                token = int(hf_model(input_ids=torch.tensor([prompt + expected])).logits[0, -1].argmax())
                if token == eos:
                    break
                expected.append(token)
        assert run.prompt_ids == prompt and run.tokens == expected
        assert len(run.top) == len(expected)
        for token, top in zip(run.tokens, run.top, strict=True):
            assert len(top) == 3 and max(top, key=lambda t: top[t]) == token
        assert run.text == side.tokenizer.decode(expected, skip_special_tokens=True)


def test_identity(side: CheckpointSide, ckpt: Path) -> None:
    info = side.info
    assert info.kind == "checkpoint" and info.full_distribution and info.emulated is None
    manifest = read_manifest(ckpt)
    assert manifest is not None
    assert info.identity["sha256"] == {"model.safetensors": sha256_file(ckpt / "model.safetensors")}
    assert info.identity["sha256"]["model.safetensors"] == manifest["files"]["model.safetensors"]["sha256"]
    assert info.identity["device"] == "cpu" and info.identity["dtype"] == "fp32"
    assert info.identity["format"] == "fp32" and {"torch", "transformers"} <= set(info.identity["runtime"])
    assert info.label == f"{ckpt}@cpu:fp32"


def test_open_side_dtype_and_emulation_hook(ckpt: Path, prompts: Any) -> None:
    seen: list[Any] = []

    def flatten(model: Any) -> str:  # all final-norm weights 0: every logit 0, a uniform distribution
        seen.append(model)
        model.model.norm.weight.data.zero_()
        return "handle"

    spec = parse_side(f"{ckpt}@cpu:bf16")
    emulated = open_side(spec, emulate=flatten, emulated="ascend-310p")
    assert isinstance(emulated, CheckpointSide)
    try:
        assert seen == [emulated.model] and emulated.emulation == "handle"
        assert next(emulated.model.parameters()).dtype == torch.bfloat16
        assert emulated.info.emulated == "ascend-310p" and emulated.info.identity["emulation"] == "ascend-310p"
        assert emulated.info.label.endswith("(emulated ascend-310p)")
        (scores,) = emulated.score([prompts[0][0]], top_k=2)
        vocab = emulated.model.config.vocab_size
        assert torch.allclose(scores.token_logprobs, torch.full_like(scores.token_logprobs, -math.log(vocab)))
    finally:
        emulated.close()
    with pytest.raises(CrosschipError, match="cannot emulate"):
        open_side(parse_side("http://127.0.0.1:9/v1#m"), emulate=flatten)


# ---------------------------------------------------------------- EndpointSide against a real server


@pytest.fixture(scope="module")
def server_url(ckpt: Path) -> Iterator[str]:
    """A real `python -m crosschip.serve.api CKPT` process; its /v1 URL."""
    server = start_server(ckpt)
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def endpoint(server_url: str) -> Iterator[EndpointSide]:
    side = open_side(parse_side(server_url))
    assert isinstance(side, EndpointSide)
    yield side
    side.close()


def test_endpoint_scores_match_in_process(endpoint: EndpointSide, side: CheckpointSide, prompts: Any) -> None:
    sequences = prompts[0]
    remote = endpoint.score(sequences, top_k=5)
    local = side.score(sequences, top_k=5)
    for ids, r, loc in zip(sequences, remote, local, strict=True):
        assert r.logprobs is None and r.target_ids.tolist() == ids[1:]
        torch.testing.assert_close(r.token_logprobs, loc.token_logprobs, atol=1e-4, rtol=0)
        assert r.top_ids.tolist() == loc.top_ids.tolist()
        torch.testing.assert_close(r.top_logprobs, loc.top_logprobs, atol=1e-4, rtol=0)
    assert not endpoint.info.unavailable


def test_endpoint_greedy_matches_in_process(endpoint: EndpointSide, side: CheckpointSide, prompts: Any) -> None:
    for prompt in [*prompts[1], prompts[0][0][:16]]:  # chat prompts and a text prefix
        remote = endpoint.greedy(prompt, max_new_tokens=8, top_n=3)
        local = side.greedy(prompt, max_new_tokens=8, top_n=3)
        assert remote.tokens == local.tokens and remote.text == local.text
        for r, loc in zip(remote.top, local.top, strict=True):
            assert list(r) == list(loc)
            assert [r[t] for t in r] == pytest.approx([loc[t] for t in loc], abs=1e-4)


def test_endpoint_identity_and_top_k_cap(endpoint: EndpointSide, server_url: str, prompts: Any) -> None:
    info = endpoint.info
    assert info.kind == "endpoint" and not info.full_distribution
    assert info.identity["url"] == server_url and info.identity["model"] == endpoint.model == "tiny"
    assert info.identity["server"]["owned_by"] == "crosschip"
    (scores,) = endpoint.score([prompts[0][0][:10]], top_k=25)
    assert scores.top_ids.shape == (9, 20) and "top25" in info.unavailable


def test_endpoint_errors(server_url: str) -> None:
    with pytest.raises(CrosschipError, match="does not serve 'other'"):
        EndpointSide(server_url, "other")
    with socket.socket() as s:  # a port that nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CrosschipError, match="cannot reach"):
        EndpointSide(f"http://127.0.0.1:{port}/v1")


# ---------------------------------------------------------------- an endpoint without vLLM's extensions


class _PlainHandler(BaseHTTPRequestHandler):
    """An OpenAI-style server that refuses echo and renders tokens as text (no token ids)."""

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._send(200, {"object": "list", "data": [{"id": "plain", "object": "model", "owned_by": "test"}]})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("echo"):
            error = {"message": "echo is not supported", "type": "invalid_request_error", "param": "echo"}
            self._send(400, {"error": {**error, "code": None}})
            return
        logprobs = {"tokens": ["hi"], "token_logprobs": [-0.1], "top_logprobs": [{"hi": -0.1}], "text_offset": [0]}
        choice = {"text": "hi", "index": 0, "logprobs": logprobs, "finish_reason": "length"}
        self._send(200, {"id": "c", "object": "text_completion", "created": 0, "model": "plain", "choices": [choice]})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def plain_url() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _PlainHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_endpoint_without_extensions_reports_unavailable(plain_url: str) -> None:
    side = EndpointSide(plain_url)
    assert side.model == "plain"
    with pytest.raises(MetricUnavailable, match="echo is not supported") as err:
        side.score([[1, 2, 3]], top_k=5)
    assert err.value.metrics == TEACHER_FORCED_METRICS
    assert set(TEACHER_FORCED_METRICS) <= set(side.info.unavailable)
    assert "echo is not supported" in side.info.unavailable["kl"]
    with pytest.raises(MetricUnavailable):  # remembered: no second round of refused requests
        side.score([[1, 2, 3]], top_k=5)
    with pytest.raises(MetricUnavailable, match="return_tokens_as_token_ids") as err:
        side.greedy([1, 2, 3], max_new_tokens=1, top_n=1)
    assert err.value.metrics == ("greedy",) and "greedy" in side.info.unavailable


def test_one_sided_verify_of_an_endpoint_without_extensions(plain_url: str, ckpt: Path) -> None:
    from crosschip.verify.run import VerifyOptions, run_verify

    report = run_verify(VerifyOptions(ref=ckpt, target=plain_url, max_new_tokens=2, seq_len=32, bootstrap=50))
    assert report["two_sided"] is False and report["served"]["path"] is None and report["fidelity"] is None
    assert report["noise_floor"]["gate_basis"] == "class"
    assert report["tokenization"]["method"] == "skipped" and "echo" in report["tokenization"]["reason"]
    assert report["verdict"] == "fail"  # nothing could be measured: never a pass
