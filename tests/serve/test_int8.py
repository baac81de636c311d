"""W8A8 int8 projections: every backend's int32 products against an int64 reference, vLLM's activation
rule (ties, 127 / absmax, zero rows), and the int8 tensors `crosschip convert` wrote read back unchanged."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from crosschip.checkpoint import open_checkpoint
from crosschip.convert.pipeline import ConvertOptions, convert
from crosschip.errors import CrosschipError
from crosschip.serve.int8 import (
    INT8_BACKENDS,
    Int8Linear,
    _IntMm,
    candidate_backends,
    exactness_problem,
    int_matmul_reference,
    load_int8_weights,
    pick_int8_backend,
    quantize_activations,
    worst_case_codes,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(d, b) for d in DEVICES for b in sorted({*candidate_backends(torch.device(d)), "int_mm", "float"})]
# (out, in): one exact float32 pass; odd sizes (CUDA padding); more columns than one 1024-column chunk.
SHAPES = [(24, 40), (13, 37), (9, 2100)]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def codes_for(in_f: int) -> torch.Tensor:
    """int8 rows: the worst cases (all 127, all -128, alternating), uniform codes, and small codes (whose
    products stay under the one-pass bound even with thousands of columns)."""
    small = torch.randint(-3, 4, (4, in_f), generator=gen(2), dtype=torch.int8)
    return torch.cat((worst_case_codes(21, in_f, gen(1)), small))


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize(("out_f", "in_f"), SHAPES)
def test_backend_products_equal_the_int64_reference(device: str, backend: str, out_f: int, in_f: int) -> None:
    weight = worst_case_codes(out_f, in_f, gen(3))
    linear = Int8Linear(weight.to(device), torch.ones(out_f), None, backend)
    x_q = codes_for(in_f)
    want = int_matmul_reference(x_q, weight)
    # decode, a p/n pair, CUDA's minimum, a batch, and the small rows alone (one pass even past 1024 columns)
    for block in (slice(0, 1), slice(0, 2), slice(0, 17), slice(None), slice(21, None)):
        got = linear.int_matmul(x_q[block].to(device))
        assert got.dtype == torch.int32
        assert torch.equal(got.cpu().to(torch.int64), want[block])
        # what __call__ multiplies: float32(acc), rounded once, bit for bit
        assert torch.equal(linear.float_matmul(x_q[block].to(device)).cpu(), want[block].float())


@pytest.mark.parametrize("rows", [1, 16, 17, 25])
def test_int_mm_padding_for_cuda_keeps_products_exact(rows: int) -> None:
    """The zero padding CUDA's `_int_mm` needs (rows to >= 24, dimensions to multiples of 8), run on the CPU."""
    weight = worst_case_codes(13, 37, gen(14))
    x_q = worst_case_codes(rows, 37, gen(15))
    got = _IntMm(weight, pad=True).exact(x_q.float())
    assert torch.equal(got.to(torch.int64), int_matmul_reference(x_q, weight))


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_all_127_products_are_exact_where_a_u8_shift_would_saturate(device: str, backend: str) -> None:
    """All-127 activations and weights: 512 * 127 * 127 = 8258048 (AVX2's u8 shift gives 65280)."""
    weight = torch.full((16, 512), 127, dtype=torch.int8)
    linear = Int8Linear(weight.to(device), torch.ones(16), None, backend)
    got = linear.int_matmul(torch.full((3, 512), 127, dtype=torch.int8, device=device))
    assert torch.equal(got.cpu(), torch.full((3, 16), 8258048, dtype=torch.int32))


def vllm_cuda_quant(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's `dynamic_scaled_int8_quant_kernel` transcribed in float32 numpy: scale = absmax / 127,
    codes = cvt.rni.sat.s8(x * (127 / absmax)) (round half to even, saturate, NaN -> 0)."""
    x = x.astype(np.float32)
    absmax = np.abs(x).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scaled = x * (np.float32(127.0) / absmax)
    codes = np.clip(np.rint(np.nan_to_num(scaled, nan=0.0, posinf=127.0, neginf=-128.0)), -128, 127)
    return codes.astype(np.int8), absmax / np.float32(127.0)


def test_quantize_activations_matches_vllms_kernel_on_random_rows() -> None:
    x = torch.randn(64, 300, generator=gen(4)) * torch.logspace(-3, 3, 64)[:, None]
    x[5, 17] = 40.0  # an outlier row
    codes, scale = quantize_activations(x)
    want_codes, want_scale = vllm_cuda_quant(x.numpy())
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and tuple(scale.shape) == (64, 1)
    assert np.array_equal(codes.numpy(), want_codes)
    assert np.array_equal(scale.numpy(), want_scale)


def test_quantize_rounds_ties_to_even() -> None:
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.0]])  # absmax 127: x * 1.0
    codes, scale = quantize_activations(x)
    assert codes.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, -127]]
    assert scale.tolist() == [[1.0]]


# (absmax, x, code): x * fl(127 / absmax) rounds to `code`, while each other rule rounds to code +- 1:
# x * fl(fl(1 / absmax) * 127) (Python's `127 / tensor`), x / fl(absmax / 127) (divide by the scale) and
# x * fl(1 / fl(absmax / 127)) (vLLM's CPU kernel). Found by searching near-tie values; exact float32 bits.
RULE_CASES = [("0x1.27ce12p+2", "-0x1.e6cc12p+1", -104), ("0x1.67fa4cp+2", "0x1.7350cap+1", 66),
              ("0x1.701192p+1", "-0x1.576f24p+1", -119)]


@pytest.mark.parametrize(("absmax", "value", "code"), RULE_CASES)
def test_quantize_multiplies_by_127_over_absmax_as_vllms_cuda_kernel(absmax: str, value: str, code: int) -> None:
    x = torch.tensor([[float.fromhex(absmax), float.fromhex(value)]], dtype=torch.float32)
    codes, _ = quantize_activations(x)
    assert codes.tolist() == [[127, code]]
    assert vllm_cuda_quant(x.numpy())[0].tolist() == [[127, code]]
    a = x[:, :1]
    for other in (x * (a.reciprocal() * 127), x / (a / 127), x * (a / 127).double().reciprocal().float()):
        assert int(torch.round(other[0, 1])) != code  # the case tells the rules apart


def test_quantize_saturates_an_infinite_multiplier_like_cvt_rni_sat() -> None:
    """absmax < 127 / FLT_MAX makes 127 / absmax infinite: +-inf saturate, 0 * inf (NaN) gives 0."""
    x = torch.tensor([[3e-38, 0.0, -1e-38]])
    codes, _ = quantize_activations(x)
    assert codes.tolist() == [[127, 0, -128]]
    assert vllm_cuda_quant(x.numpy())[0].tolist() == [[127, 0, -128]]


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_zero_rows_give_the_bias_not_nan(device: str, backend: str) -> None:
    weight = torch.randint(-127, 128, (12, 32), generator=gen(5), dtype=torch.int8)
    bias = torch.randn(12, generator=gen(6))
    x = torch.randn(3, 32, generator=gen(7))
    x[1] = 0.0
    codes, scale = quantize_activations(x)
    assert scale[1].item() == 0.0 and not bool(codes[1].any())
    y = Int8Linear(weight.to(device), torch.rand(12) / 127, bias.to(device), backend)(x.to(device)).cpu()
    assert bool(torch.isfinite(y).all())
    assert torch.equal(y[1], bias)


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_call_is_vllms_formula_bit_for_bit(device: str, backend: str, dtype: torch.dtype) -> None:
    """y = scale_t * (w_scale * float32(acc)) + bias in float32, then x's dtype; any leading dims."""
    out_f, in_f = 20, 48
    weight = torch.randint(-127, 128, (out_f, in_f), generator=gen(8), dtype=torch.int8)
    w_scale = (torch.rand(out_f, 1, generator=gen(9)) / 127).to(torch.bfloat16)  # ascend stores [out, 1] bf16
    bias = torch.randn(out_f, generator=gen(10))
    x = torch.randn(2, 3, in_f, generator=gen(11)).to(dtype)
    y = Int8Linear(weight.to(device), w_scale, bias.to(device), backend)(x.to(device)).cpu()
    x_q, x_scale = quantize_activations(x.reshape(6, in_f))
    acc = int_matmul_reference(x_q, weight).float()
    want = (acc * w_scale.float().view(-1) * x_scale + bias).to(dtype).view(2, 3, out_f)
    assert y.dtype == dtype and torch.equal(y, want)


def test_non_finite_inputs_give_non_finite_rows_only() -> None:
    weight = torch.randint(-127, 128, (8, 16), generator=gen(12), dtype=torch.int8)
    x = torch.randn(3, 16, generator=gen(13))
    x[0, 3] = float("nan")
    y = Int8Linear(weight, torch.rand(8) / 127, None, "float")(x)
    assert bool(torch.isnan(y[0]).all()) and bool(torch.isfinite(y[1:]).all())


def test_int8_linear_refuses_what_it_cannot_run() -> None:
    weight = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(CrosschipError, match="unknown int8 backend"):
        Int8Linear(weight, torch.ones(4), None, "cutlass")
    with pytest.raises(CrosschipError, match="2-D int8 weight"):
        Int8Linear(weight.float(), torch.ones(4), None, "float")
    with pytest.raises(CrosschipError, match="one float per output row"):
        Int8Linear(weight, torch.ones(4, 8), None, "float")
    with pytest.raises(CrosschipError, match="inf or NaN"):
        Int8Linear(weight, torch.tensor([1.0, float("inf"), 1.0, 1.0]), None, "float")
    with pytest.raises(CrosschipError, match="bias"):
        Int8Linear(weight, torch.ones(4), torch.ones(5), "float")
    with pytest.raises(CrosschipError, match="features"):
        Int8Linear(weight, torch.ones(4), None, "float")(torch.ones(2, 7))


def test_pick_int8_backend_returns_an_exact_backend() -> None:
    picked = pick_int8_backend("cpu", {(64, 48), (32, 64)}, probe_bytes=1 << 14, rounds=1)
    assert picked in INT8_BACKENDS
    assert exactness_problem(picked, torch.device("cpu")) is None


# ------------------------------------------------------------------ checkpoints written by convert


@pytest.fixture(scope="module")
def tiny_src(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("tiny", tmp_path_factory.mktemp("int8") / "src")


@pytest.fixture(scope="module", params=["compressed-tensors", "ascend"])
def w8a8(request: pytest.FixtureRequest, tiny_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"w8a8-{request.param}") / "out"
    convert(tiny_src, out, ConvertOptions("int8-w8a8-dynamic", request.param))
    return out


def stored_tensors(root: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    return {k: v for f in sorted(set(weight_map.values())) for k, v in load_file(root / f).items()}


def test_load_int8_weights_returns_what_convert_wrote(w8a8: Path) -> None:
    stored = stored_tensors(w8a8)
    pairs = load_int8_weights(open_checkpoint(w8a8))
    quantized = {k.removesuffix(".weight_scale") for k in stored if k.endswith(".weight_scale")}
    assert set(pairs) == quantized and "model.layers.0.self_attn.q_proj" in pairs
    for module, (weight, scale) in pairs.items():
        assert weight.dtype == torch.int8 and torch.equal(weight, stored[f"{module}.weight"])
        assert scale.dtype == torch.float32 and tuple(scale.shape) == (weight.shape[0],)
        assert torch.equal(scale, stored[f"{module}.weight_scale"].float().view(-1))


def test_load_int8_weights_is_empty_for_float_checkpoints(tiny_src: Path) -> None:
    assert load_int8_weights(open_checkpoint(tiny_src)) == {}


def test_load_int8_weights_refuses_a_scale_that_is_not_per_channel(w8a8: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(w8a8, bad)
    weight_map = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.down_proj.weight_scale"
    shard = bad / weight_map[name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:3].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CrosschipError, match=r"down_proj.weight_scale: .* one float per output row"):
        load_int8_weights(open_checkpoint(bad, verify=False))


# ------------------------------------------------------------------ the serving engine on a W8A8 checkpoint


def _w8a8_reference(model: torch.nn.Module, int8: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Turn every W8A8 Linear of an HF model into the float64 definition of W8A8 (per-token dynamic int8
    activations times the stored int8 weight and scales): what an exact int8 kernel must compute."""
    for name, (weight, scale) in int8.items():
        module = model.get_submodule(name)

        def forward(x: torch.Tensor, w: torch.Tensor = weight, s: torch.Tensor = scale,
                    b: torch.Tensor | None = module.bias) -> torch.Tensor:
            x_q, x_s = quantize_activations(x.reshape(-1, x.shape[-1]))
            y = (x_q.double() @ w.double().t()) * x_s.double() * s.double()
            y = y if b is None else y + b.double()
            return y.to(x.dtype).reshape(*x.shape[:-1], -1)

        module.forward = forward


def test_engine_serves_w8a8_on_int8_kernels_within_1e4_of_its_definition(w8a8: Path) -> None:
    """BatchEngine.from_checkpoint on a converted W8A8 checkpoint: the dense runner's projections are int8
    kernels (float copies dropped), and greedy logprobs equal the float64 W8A8 definition to 1e-4."""
    import asyncio

    from crosschip.checkpoint import load_model
    from crosschip.serve.engine import BatchEngine
    from crosschip.serve.engine_api import GenerationRequest, SamplingOptions
    from crosschip.serve.int8 import Int8Linear

    engine = BatchEngine.from_checkpoint(w8a8, device="cpu", max_batch=4, max_context=64, layout="nt")
    layer = engine.runner.layers[0]
    assert all(isinstance(p, Int8Linear) for p in (layer.qkv, layer.o, layer.gate_up, layer.down))
    assert engine.model.model.layers[0].self_attn.q_proj.weight.numel() == 0  # no float copy kept
    opts = SamplingOptions(max_tokens=6, temperature=0.0, logprobs=0)
    reqs = [GenerationRequest(f"q{i}", tuple(range(5 + i, 12 + 3 * i)), opts) for i in range(3)]

    async def main() -> list[list]:
        async def one(r: GenerationRequest) -> list:
            return [o async for o in engine.generate(r)]
        try:
            return await asyncio.gather(*(one(r) for r in reqs))
        finally:
            await engine.shutdown()

    outs = asyncio.run(main())
    ref, ckpt = load_model(w8a8, "cpu", torch.float32)
    _w8a8_reference(ref, load_int8_weights(ckpt))
    for req, got in zip(reqs, outs, strict=True):
        ids = [t for o in got for t in o.token_ids]
        with torch.no_grad():
            logp = torch.log_softmax(ref(input_ids=torch.tensor([[*req.prompt_ids, *ids]])).logits[0].double(), -1)
        n = len(req.prompt_ids)
        want = [float(logp[n - 1 + i, t]) for i, t in enumerate(ids)]
        np.testing.assert_allclose([lp.logprob for o in got for lp in o.logprobs], want, atol=1e-4, rtol=0)
