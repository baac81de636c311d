"""gpu_check's `serve` check: the serving engine (paged KV cache, chunked prefill) on one accelerator.

For a Llama preset (DenseRunner) and a DeepSeek-V3 preset (MLARunner, latent cache), both random-init fp32
with TF32 off: 16 prompts of 8 to 150 tokens go to one `BatchEngine` at once, under a step budget of 64 tokens
(so the long prompts are prefilled in chunks beside running decodes) with 16-token blocks. Each request's
greedy continuation must equal `transformers`' own greedy `generate` of the same model on the same device,
unless the two part at a near-tie of HF's logits (margin <= TIE_MARGIN, reported). Figures: identical count,
decode tokens/s of the batch, blocks used at peak and after (must be 0).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch
from transformers import GenerationConfig

from _common import first_divergence
from crosschip import models
from crosschip.serve.engine import BatchEngine
from crosschip.serve.engine_api import GenerationRequest, SamplingOptions

VOCAB = 2048
PROMPTS = 16
NEW_TOKENS = 32
STEP_BUDGET = 64
TIE_MARGIN = 1e-3  # fp32 logits of a random-init model: closer than this, kernel order may pick either


def _prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [8 + (142 * i) // (PROMPTS - 1) for i in range(PROMPTS)]  # 8 .. 150 tokens
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


@torch.inference_mode()
def _hf_greedy(model: torch.nn.Module, ids: list[int], device: torch.device) -> list[int]:
    # No EOS: generate then runs the full length without masking EOS (min_new_tokens would change the picks).
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=2)
    out = model.generate(torch.tensor([ids], device=device), generation_config=config)
    return out[0, len(ids):].tolist()


async def _serve_all(engine: BatchEngine, prompts: list[list[int]]) -> tuple[list[list[int]], int, float]:
    """Every prompt at once; returns the outputs, the peak blocks in use and the wall time."""
    peak = 0

    async def one(i: int, ids: list[int]) -> list[int]:
        nonlocal peak
        opts = SamplingOptions(max_tokens=NEW_TOKENS, temperature=0.0)  # no stop tokens: the full length
        tokens: list[int] = []
        async for out in engine.generate(GenerationRequest(f"r{i}", tuple(ids), opts)):
            tokens += out.token_ids
            peak = max(peak, engine.stats().kv_blocks_used)
        return tokens

    start = time.perf_counter()
    try:
        outs = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))
    finally:
        await engine.shutdown(drain=True)
    return list(outs), peak, time.perf_counter() - start


@torch.inference_mode()
def _margin(model: torch.nn.Module, ids: list[int], a: int, b: int, device: torch.device) -> float:
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
    return float((logits[a] - logits[b]).abs())


def serve_case(preset: str, device: torch.device, seed: int) -> dict[str, Any]:
    """One preset through the engine and through HF generate; the comparison's figures."""
    config = models.get_preset(preset).build_config(VOCAB, 0, 1, 2)
    model = models.build_model(config, seed=seed).to(device).eval()
    prompts = _prompts(seed)
    engine = BatchEngine(model, None, preset, device=device, max_batch=PROMPTS, max_context=256,
                         max_num_batched_tokens=STEP_BUDGET, block_size=16)
    runner = type(engine.runner).__name__
    got, peak, wall = asyncio.run(_serve_all(engine, prompts))
    identical, ties, unexplained = 0, 0, []
    for i, (ids, out) in enumerate(zip(prompts, got, strict=True)):
        want = _hf_greedy(model, ids, device)
        k = first_divergence(want, out)
        if k is None:
            identical += 1
        elif _margin(model, ids + want[:k], want[k], out[k], device) <= TIE_MARGIN:
            ties += 1
        else:
            unexplained.append({"prompt": i, "first_divergence": k})
    return {"preset": preset, "runner": runner, "prompts": len(prompts), "identical": identical, "ties": ties,
            "unexplained": unexplained, "peak_blocks": peak, "blocks_after": engine.stats().kv_blocks_used,
            "output_tok_s": PROMPTS * NEW_TOKENS / wall}


def check_serve(ctx: Any, make_result: Any, passed: str, failed: str) -> Any:
    """The `serve` check: PASS when every case is identical or tied and every block came back."""
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: TF32 matmuls would part from HF's
    torch.backends.cudnn.allow_tf32 = False
    cases = [serve_case(p, ctx.device, ctx.seed) for p in ("small", "deepseek-small")]
    ok = all(not c["unexplained"] and c["blocks_after"] == 0 for c in cases)
    summary = "; ".join(
        f"{c['preset']} ({c['runner']}): greedy identical {c['identical']}/{c['prompts']} (+{c['ties']} ties), "
        f"{c['output_tok_s']:.0f} tok/s at {c['prompts']} concurrent, peak {c['peak_blocks']} blocks, "
        f"{c['blocks_after']} after" for c in cases
    )
    return make_result("serve", passed if ok else failed, summary, {"cases": cases})
