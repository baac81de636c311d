"""crosschip verify against vLLM's CPU build: converted checkpoints PASS, planted faults FAIL with the right reason.

Each test serves one checkpoint with vLLM (~30-50 s to start here) and runs `crosschip verify --ref TRAINED
--target http://127.0.0.1:PORT/v1 --json`; the served checkpoint is read from the model card's `root`.
"""

from __future__ import annotations

import json
import math
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from faults import copy_checkpoint, drop_bos, scale_tensors
from interop_summary import Verified
from vllmkit import EngineDidNotStart, VllmServer, serve_vllm

from crosschip import checkpoint

# The conversion side of two-sided verification: the trained checkpoint against crosschip's own load of the
# served one (the fidelity side is the endpoint against that same load).
CONVERSION_GATES = {f"conversion.{name}" for name in ("kl_mean", "kl_p99", "top1_agreement", "ppl_ratio")}
SCALE_FAULT = 1.3  # every down_proj weight_scale x1.3: a converter that mis-scales one projection
PROBE_TEXT = "Return a new list of the items."


def _fidelity_kl(result: Verified) -> float:
    kl = result.row["kl_vs_crosschip_load"]
    assert kl is not None, "the report has no fidelity.distribution.kl_mean (endpoint vs crosschip's own load)"
    assert math.isfinite(kl) and kl >= 0, kl
    return kl


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "int8-w8a8-dynamic"])
def test_converted_checkpoint_passes_on_vllm(fmt: str, converted: Callable[[str], Path],
                                             verify_on_vllm: Callable[..., Verified]) -> None:
    ckpt = converted(fmt)
    result = verify_on_vllm(fmt, ckpt, expected="PASS")
    assert result.row["verdict"] == "PASS", f"{fmt} on vLLM: failed gates {result.row['failed_gates']}"
    assert result.row["failed_gates"] == []
    served = result.report["served"]  # found through vLLM's model card (`root` is the --model path)
    assert Path(served["path"]).resolve() == ckpt.resolve() and served["source"] == "the model card's root", served
    # Both sides of the two-sided check are measured: the conversion's loss as served, and the engine against
    # crosschip's own load of the same checkpoint.
    assert result.row["kl_vs_original"] is not None
    _fidelity_kl(result)
    if fmt == "int8-w8a8-dynamic":  # vLLM ran it on its int8 kernel, not a dequantized fallback
        assert any("W8A8Int8" in k for k in result.row["kernels"]), result.row["kernels"]


def test_scaled_w8a8_scales_fail_on_vllm(converted: Callable[[str], Path], tmp_path: Path,
                                         verify_on_vllm: Callable[..., Verified]) -> None:
    bad = copy_checkpoint(converted("int8-w8a8-dynamic"), tmp_path / "w8a8-down-proj-scale-x1.3")
    scaled = scale_tensors(bad, ".mlp.down_proj.weight_scale", SCALE_FAULT)
    assert len(scaled) == 2  # one per layer
    checkpoint.open_checkpoint(bad)  # the fault passes every integrity check: only verify can catch it

    result = verify_on_vllm("int8-w8a8-dynamic", bad, expected="FAIL", fault=f"down_proj weight_scale x{SCALE_FAULT}")
    failed = set(result.row["failed_gates"])
    assert result.row["verdict"] == "FAIL"
    assert failed & CONVERSION_GATES, f"failed for another reason: {sorted(failed)}"
    assert result.row["first_failing_layer"] == "layers.0.mlp", "the first mis-scaled projection is layer 0's MLP"
    # vLLM computes what the faulty checkpoint says: the loss is in the checkpoint, not in the engine.
    assert not [g for g in failed if g.startswith("fidelity.") or g == "tokenization"], sorted(failed)
    assert _fidelity_kl(result) < result.row["kl_vs_original"] / 5


def _first_echoed_token(server: VllmServer) -> int:
    """The first token vLLM scores for a text prompt (echo, token ids), i.e. what its tokenizer put first."""
    body = {"model": server.model, "prompt": PROBE_TEXT, "max_tokens": 1, "temperature": 0, "echo": True,
            "logprobs": 1, "return_tokens_as_token_ids": True}
    request = urllib.request.Request(f"{server.url}/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        tokens = json.loads(resp.read())["choices"][0]["logprobs"]["tokens"]
    return int(tokens[0].removeprefix("token_id:"))


def test_tokenizer_without_bos_fails_on_vllm(converted: Callable[[str], Path], tmp_path: Path,
                                             verify_on_vllm: Callable[..., Verified]) -> None:
    from transformers import AutoTokenizer

    bad = copy_checkpoint(converted("bf16"), tmp_path / "bf16-tokenizer-without-bos")
    drop_bos(bad)
    checkpoint.open_checkpoint(bad)
    tok = AutoTokenizer.from_pretrained(bad)
    assert tok(PROBE_TEXT).input_ids[0] != tok.bos_token_id

    result = verify_on_vllm("bf16", bad, expected="FAIL", fault="tokenizer does not add BOS",
                            while_serving=_first_echoed_token)
    assert result.probe != tok.bos_token_id, "the planted fault is not real: vLLM put BOS first anyway"
    assert result.row["verdict"] == "FAIL"
    assert "tokenization" in result.row["failed_gates"], result.row["failed_gates"]


def test_w8a16_does_not_load_on_vllm_cpu(converted: Callable[[str], Path], vllm_python: str, tmp_path: Path,
                                         new_row: Callable[..., dict[str, Any]]) -> None:
    """vLLM's CPU WNA16 kernels take only uint4 weights (`choose_mp_linear_kernel`): an int8 W8A16 checkpoint
    fails at load. Pinned here so the compatibility table's "no" is measured, and so a vLLM that gains the
    kernel shows up as a failing test (then `check`'s engine rules need updating too)."""
    ckpt = converted("int8-w8a16")
    row = new_row("int8-w8a16", ckpt, expected="no load")
    with pytest.raises(EngineDidNotStart) as info, serve_vllm(vllm_python, ckpt, tmp_path / "vllm.log"):
        row["loads"] = True
    row.update(loads=False, verdict="no load", note=info.value.cause.splitlines()[0].split("] ", 1)[-1].strip())
    assert "WNA16" in info.value.cause, info.value.cause
