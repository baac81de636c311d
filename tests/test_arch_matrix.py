"""Every architecture a newcomer brings, through check -> convert -> verify -> serve (issue 14, item 1).

Tiny random configs (tests/archkit.py: hidden 64, 2 layers, vocab 400), one checkpoint per architecture. Each
stage runs in-process on the real code: `run_check`, the convert pipeline, `run_verify` (golden, layers), and
serve's own start-up (`serve.api._load`, which `crosschip serve` runs) behind the real app, driven through
FastAPI's TestClient rather than one server process per architecture (a process start costs ~10 s here; the
HTTP layer is the same app, and tests/serve/test_server_process.py covers the process itself).
The served prompt logprobs are compared with transformers' own `from_pretrained` of the served checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from archkit import ARCH_KWARGS, write_arch_checkpoint
from crosschip.check.run import run_check
from crosschip.convert.pipeline import convert, resolve_options
from crosschip.serve.api import _load, build_app
from crosschip.verify.run import VerifyOptions, run_verify

ARCHS = [a for a in ARCH_KWARGS if a in CONFIG_MAPPING_NAMES]  # only those this transformers has
NO_SDPA = {"gemma2"}  # transformers' Gemma2 classes set _supports_sdpa = False (softcapping)
PROMPT = "Return the number of items in a container."


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prompt set (3 texts, 1 chat) so that verify takes seconds per architecture."""
    from importlib import resources

    heldout = resources.files("crosschip.verify").joinpath("data/heldout.txt").read_text(encoding="utf-8")
    texts = [p for p in heldout.split("\n\n") if p.strip()][:3]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    records = [{"text": t} for t in texts] + [{"messages": [{"role": "user", "content": "Say hello."}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=ARCHS)
def arch_ckpt(request: pytest.FixtureRequest, tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch = request.param
    return write_arch_checkpoint(arch, tiny_tokenizer, tmp_path_factory.mktemp("arch") / arch)


def _expected_attention(ckpt: Path) -> str:
    model_type = json.loads((ckpt / "config.json").read_text())["model_type"]
    return "eager" if model_type in NO_SDPA else "sdpa"


def test_check(arch_ckpt: Path) -> None:
    """crosschip serve's stack runs every transformers causal LM; the load row names the attention picked."""
    report = run_check(arch_ckpt, "cpu", stack="transformers")
    rows = {r.check: r for r in report.checks}
    assert report.verdict == "pass", [(r.check, r.status, r.reason) for r in report.checks if r.status != "PASS"]
    assert rows["load"].status == "PASS" and rows["load"].details["attention"] == _expected_attention(arch_ckpt)


def test_convert_verify_serve(arch_ckpt: Path, prompts_file: Path, tmp_path: Path,
                              tiny_tokenizer: Any) -> None:
    bf16 = tmp_path / "bf16"
    record = convert(arch_ckpt, bf16, resolve_options("bf16", None, None, None))
    assert record["to"] == "bf16"

    report = run_verify(VerifyOptions(ref=str(arch_ckpt), target=str(bf16), prompts=prompts_file, max_new_tokens=4,
                                      bootstrap=200, report_dir=tmp_path / "report"))
    assert report["verdict"] == "pass", report["gates"]
    assert report["target"]["identity"]["attention"] == _expected_attention(arch_ckpt)
    assert (tmp_path / "report" / "report.json").is_file()
    # The verdict was recorded in the converted checkpoint's manifest (certificate).
    assert json.loads((bf16 / "crosschip.json").read_text())["verifications"][-1]["verdict"] == "pass"

    engine, tokenizer = _load(bf16, "cpu", "fp32", {"max_batch": 2, "max_queue": 4, "max_context": 128},
                              False)  # what `crosschip serve` starts with
    ids = tokenizer(PROMPT)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).eval()
    with torch.inference_mode():
        logp = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    with TestClient(build_app(engine, tokenizer, root=bf16)) as client:
        body = {"model": engine.model_name, "prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 1,
                "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        served = r.json()["choices"][0]["logprobs"]["token_logprobs"][1: len(ids)]
        assert served == pytest.approx(expected, abs=2e-4)
        chat = client.post("/v1/chat/completions", json={
            "model": engine.model_name, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4})
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["completion_tokens"] >= 1
