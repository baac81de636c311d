"""W8A8 int8 projections for the serving engine: real int8 GEMMs, not weights dequantized to float.

An `int8-w8a8-dynamic` checkpoint holds int8 weights [out, in] and one float scale per output row.
vLLM serves it with dynamic per-token symmetric int8 activations and an int32-accumulated GEMM:

  scale_t = absmax(x_t) / 127                                  (float32, one per row/token)
  x_q     = round_half_even(x_t * (127 / absmax(x_t))), saturated to [-128, 127], NaN -> 0
  y       = scale_t * (w_scale[out] * float(acc)) (+ bias),    acc = sum_k x_q[t, k] * w_q[out, k] (int32)

as in vLLM `csrc/quantization/compressed_tensors/int8_quant_kernels.cu` (`dynamic_scaled_int8_quant_kernel`:
`scale = absmax / 127.0f`, codes `float_to_int8_rn(x * (127.0f / absmax))`, i.e. `cvt.rni.sat.s8.f32`) and
CUTLASS's `ScaledEpilogue` (`scale_a * (scale_b * float(acc))`). An all-zero row gets scale 0 and codes 0
(the kernel's 0 * inf is NaN, which `cvt.rni.sat` turns into 0), so its output is exactly the bias.
vLLM's CPU kernel (`csrc/cpu/dnnl_kernels.cpp`) multiplies by `float(1.0 / scale)` instead, which can
differ from 127 / absmax in the last bit and so flip a code that sits on a rounding tie; crosschip
follows the CUDA kernel.

Every backend computes float(acc) exactly as the int32 `acc` converted once to float32, and they share
the quantization and the epilogue, so their outputs are bitwise equal; they differ only in the kernel:

* "fbgemm" (x86 CPUs): the quantized-linear op of torch's fbgemm engine. On CPUs without VNNI it
  multiplies u8 x s8 with `vpmaddubsw`, which adds pairs of products in int16 and saturates, so
  int8 activations shifted to u8 (+128) give wrong sums. Splitting the codes into p = max(x_q, 0)
  and n = max(-x_q, 0), each in [0, 128] with zero point 0, keeps every pair within 2 * 128 * 128 =
  32768 in magnitude (only -32768 is reached, and it is an int16), so acc = W.p - W.n exactly; p and
  n are two row blocks of one GEMM (the op saturates its input to [0, 255], which zeroes the
  negatives). The op returns float32, exact while |W.p| <= 2**24, which 128 * sum|x_q| <= 2**24
  guarantees; inputs that could exceed it are split into <= 1024-column chunks (128 * 128 * 1024 =
  2**24), each a row block of the same GEMM, and the partial sums are added back exactly.
* "int_mm": `torch._int_mm` (int8 x int8 -> int32), for CUDA GPUs (cuBLASLt); CUDA wants more than 16
  rows, dimensions that are multiples of 8 and a column-major second operand, so rows (to >= 24) and
  dimensions are zero-padded and W^T is passed as a view. Exact anywhere, but a slow naive kernel on CPU.
* "float": the same codes multiplied as float32 (exact under the same 2**24 bound, else chunked):
  the fallback where no int8 kernel exists.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from typing import Any, Protocol

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from crosschip.checkpoint import Checkpoint, read_state_dict, storage_format
from crosschip.devices import synchronize
from crosschip.errors import CrosschipError
from crosschip.formats.layouts import group_names, output_names

INT8_BACKENDS = ("fbgemm", "int_mm", "float")
W8A8_FORMAT = "int8-w8a8-dynamic"
QMAX = 127.0
EXACT_FLOAT = 2**24  # every integer of magnitude <= 2**24 is a float32
# Columns per exact partial sum: |sum of 1024 products of int8 codes| <= 1024 * 128 * 128 = 2**24.
EXACT_CHUNK = 1024
MAX_COLUMNS = 2**31 // (128 * 128) - 1  # int32 accumulators hold any sum of this many products
CUDA_MIN_ROWS = 17  # torch._int_mm on CUDA: mat1.size(0) > 16
CUDA_MULTIPLE = 8  # ... and mat1.size(1), mat2.size(1) multiples of 8


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's per-row int8 codes, kept as float32 integers [N, in], and scale float32 [N, 1]."""
    xf = x.float()  # [N, in]: the kernel converts every element to float32
    absmax = xf.abs().amax(dim=-1, keepdim=True)  # [N, 1]
    qmax = torch.full_like(absmax, QMAX)  # a tensor: `127.0 / t` would be t.reciprocal() * 127 (two roundings)
    # |x| * fl(127 / absmax) <= 127 * (1 + 2**-23), which rounds to 127: only an infinite 127 / absmax
    # (absmax < 3.7e-37) leaves the range, and it saturates like `cvt.rni.sat`; 0 * inf (zero rows) and
    # NaN inputs give code 0.
    codes = (xf * (qmax / absmax)).nan_to_num_(nan=0.0, posinf=QMAX, neginf=-QMAX - 1).round_()  # half to even
    return codes, absmax / qmax


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row symmetric int8, vLLM's rule: (x_q int8 [N, in], scale float32 [N, 1]).

    scale = absmax / 127 and x_q = round-half-even(x * (127 / absmax)) in float32, saturated; a zero row
    gets scale 0 and codes 0. Non-finite inputs give a non-finite scale, so the output is non-finite too.
    """
    codes, scale = _quantize(x.reshape(-1, x.shape[-1]))
    return codes.to(torch.int8), scale


def int_matmul_reference(x_q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """acc = x_q @ weight^T in int64 on the CPU: the ground truth every backend must equal."""
    return x_q.cpu().to(torch.int64) @ weight.cpu().to(torch.int64).t()  # [N, out]


def _chunks(columns: int) -> list[tuple[int, int]]:
    """[start, stop) of equal column chunks of at most EXACT_CHUNK columns."""
    count = max(1, math.ceil(columns / EXACT_CHUNK))
    bounds = [round(i * columns / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class _Kernel(Protocol):
    """acc = codes @ W^T for float32 integer codes [N, in] (N >= 1), in two forms."""

    def exact(self, codes: torch.Tensor) -> torch.Tensor:
        """int32 [N, out]."""
        ...

    def rounded(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 [N, out], bitwise exact(codes).float(): what the epilogue needs, without the int pass."""
        ...


class _ExactBound:
    """Whether one float32 GEMM over all columns is exact: every partial sum of row t is at most
    128 * sum_k |x_q[t, k]| <= 2**24 (always true for <= 1024 columns). 128 bounds any int8 weight, so
    no weight has to be scanned at load."""

    def __init__(self, columns: int) -> None:
        self.chunks = _chunks(columns)
        self.always = columns * 128 * 128 <= EXACT_FLOAT

    def one_pass(self, codes: torch.Tensor) -> bool:
        return self.always or float(codes.abs().sum(dim=-1).max()) * 128 <= EXACT_FLOAT


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def _fbgemm_prepack(weight: torch.Tensor) -> Any:
    """The weight as fbgemm's packed int8 operand, with scale 1 so the op returns raw float(acc)."""
    rows = weight.shape[0]
    engine = torch.backends.quantized.engine
    with warnings.catch_warnings():  # quantized-tensor creation is deprecated, not yet replaced
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        try:
            torch.backends.quantized.engine = "fbgemm"  # "x86" / "onednn" may pack for oneDNN instead
            qweight = torch._make_per_channel_quantized_tensor(
                weight.contiguous(), torch.ones(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.int64), 0)
            return torch.ops.quantized.linear_prepack(qweight, None)
        finally:
            torch.backends.quantized.engine = engine


class _Fbgemm:
    """acc = W.p - W.n on fbgemm, p and n (and any column chunks) row blocks of one GEMM."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.device.type != "cpu" or not fbgemm_available():
            raise CrosschipError("the fbgemm int8 backend needs an x86 CPU build of torch with fbgemm",
                                 "use backend int_mm or float")
        self.packed, self.bound = _fbgemm_prepack(weight), _ExactBound(weight.shape[1])  # packed: a copy
        self.op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32

    def _partials(self, codes: torch.Tensor) -> torch.Tensor:
        """[2, C, N, out] float32 exact integers: W.p and W.n per column chunk."""
        rows, columns = codes.shape
        if self.bound.one_pass(codes):
            blocks = torch.cat((codes, codes.neg()))  # [2N, in]; the op saturates negatives to 0 -> p, n
            return self.op(blocks, 1.0, 0, self.packed).view(2, 1, rows, -1)
        chunks = self.bound.chunks
        blocks = codes.new_zeros(2, len(chunks), rows, columns)  # chunk c keeps its own columns only
        for c, (start, stop) in enumerate(chunks):
            blocks[0, c, :, start:stop] = codes[:, start:stop]
            torch.neg(codes[:, start:stop], out=blocks[1, c, :, start:stop])
        return self.op(blocks.view(-1, columns), 1.0, 0, self.packed).view(2, len(chunks), rows, -1)

    def exact(self, codes: torch.Tensor) -> torch.Tensor:
        sums = self._partials(codes).to(torch.int32).sum(dim=1, dtype=torch.int32)  # [2, N, out]
        return sums[0] - sums[1]

    def rounded(self, codes: torch.Tensor) -> torch.Tensor:
        y = self._partials(codes)
        if y.shape[1] == 1:
            return torch.sub(*y.view(2, codes.shape[0], -1))  # W.p, W.n exact: rounded once, as float(acc) is
        sums = y.sum(dim=1, dtype=torch.float64)  # exact (|sums| < 2**53)
        return (sums[0] - sums[1]).float()


class _IntMm:
    """acc via torch._int_mm, dimensions zero-padded to what CUDA's cuBLASLt path accepts."""

    def __init__(self, weight: torch.Tensor, pad: bool | None = None) -> None:
        out_f, in_f = weight.shape
        self.cuda = weight.device.type == "cuda" if pad is None else pad  # pad=True: CUDA's shapes anywhere (tests)
        self.out_f = out_f
        self.pad_in = -in_f % CUDA_MULTIPLE if self.cuda else 0
        pad_out = -out_f % CUDA_MULTIPLE if self.cuda else 0
        padded = F.pad(weight, (0, self.pad_in, 0, pad_out)) if self.pad_in or pad_out else weight
        self.w_t = padded.contiguous().t()  # [in, out], column-major (cuBLASLt's layout for the second operand)

    def exact(self, codes: torch.Tensor) -> torch.Tensor:
        rows = codes.shape[0]
        pad_rows = -(-max(rows, CUDA_MIN_ROWS) // CUDA_MULTIPLE) * CUDA_MULTIPLE - rows if self.cuda else 0  # >= 24
        x_q = codes.to(torch.int8)
        if pad_rows or self.pad_in:
            x_q = F.pad(x_q, (0, self.pad_in, 0, pad_rows))
        acc = torch._int_mm(x_q, self.w_t)  # [N', out'] int32
        return acc[:rows, : self.out_f]

    def rounded(self, codes: torch.Tensor) -> torch.Tensor:
        return self.exact(codes).float()


class _Float:
    """acc via float32 GEMMs of the codes: one pass when the bound allows, else per column chunk."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.w, self.bound = weight.float(), _ExactBound(weight.shape[1])  # [out, in]

    def _partials(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """Exact float32 [N, out] partial sums (one, or one per column chunk)."""
        if self.bound.one_pass(codes):
            return [F.linear(codes, self.w)]
        return [F.linear(codes[:, start:stop], self.w[:, start:stop]) for start, stop in self.bound.chunks]

    def exact(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._partials(codes)).to(torch.int32).sum(dim=0, dtype=torch.int32)

    def rounded(self, codes: torch.Tensor) -> torch.Tensor:
        parts = self._partials(codes)
        return parts[0] if len(parts) == 1 else torch.stack(parts).sum(dim=0, dtype=torch.float64).float()


_KERNELS: dict[str, type] = {"fbgemm": _Fbgemm, "int_mm": _IntMm, "float": _Float}


def _checked_scale(scale: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    """A weight scale as float32 [out]: one finite value per output row ([out] or [out, 1] accepted)."""
    if not scale.is_floating_point() or tuple(scale.shape) not in ((rows,), (rows, 1)):
        raise CrosschipError(f"{name}: weight_scale is {scale.dtype} {list(scale.shape)}, expected one float per "
                             f"output row ([{rows}] or [{rows}, 1])", "only per-channel int8 scales are supported")
    if not bool(torch.isfinite(scale).all()):
        raise CrosschipError(f"{name}: weight_scale holds inf or NaN", "re-export the checkpoint")
    return scale.to(torch.float32).reshape(rows)


class Int8Linear:
    """y = W8A8(x) for x [..., in], in x's dtype: vLLM's dynamic-int8 Linear on a real int8 kernel.

    A plain callable rather than an nn.Module: the engine calls projections directly, and fbgemm's
    packed operand is not a tensor a state dict could hold.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, backend: str) -> None:
        if backend not in _KERNELS:
            raise CrosschipError(f"unknown int8 backend {backend!r}", f"use one of {', '.join(INT8_BACKENDS)}")
        if weight.dtype != torch.int8 or weight.dim() != 2 or not 0 < weight.shape[1] <= MAX_COLUMNS:
            raise CrosschipError(f"an int8 Linear needs a 2-D int8 weight [out, in], got {weight.dtype} "
                                 f"{list(weight.shape)}", "pass the checkpoint's raw int8 weight (load_int8_weights)")
        out_f, in_f = weight.shape
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise CrosschipError(f"bias has shape {list(bias.shape)}, expected [{out_f}]", "pass the Linear's bias")
        self.backend, self.in_features, self.out_features = backend, in_f, out_f
        self.scale = _checked_scale(scale, out_f, "int8 Linear").to(weight.device)  # [out]
        self.bias = None if bias is None else bias.detach().to(device=weight.device, dtype=torch.float32)
        # The kernel keeps the weight in its own form (fbgemm: packed copy, 1 byte per weight; int_mm: the
        # int8 tensor; float: a float32 copy); nothing else is kept, so fbgemm does not hold it twice.
        self._kernel: _Kernel = _KERNELS[backend](weight.detach().contiguous())

    def int_matmul(self, x_q: torch.Tensor) -> torch.Tensor:
        """x_q int8 [N, in] -> acc int32 [N, out], exactly x_q @ W^T (for tests and probes)."""
        if x_q.dim() != 2 or x_q.shape[1] != self.in_features or x_q.dtype != torch.int8:
            raise CrosschipError(f"expected int8 codes [N, {self.in_features}], got {x_q.dtype} {list(x_q.shape)}")
        if x_q.shape[0] == 0:
            return torch.zeros(0, self.out_features, dtype=torch.int32, device=x_q.device)
        return self._kernel.exact(x_q.float())

    def float_matmul(self, x_q: torch.Tensor) -> torch.Tensor:
        """x_q int8 [N, in] -> float32(acc) [N, out] the way __call__ computes it (for tests)."""
        return self._kernel.rounded(x_q.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] float -> [..., out] in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise CrosschipError(f"input has {x.shape[-1]} features, this Linear takes {self.in_features}")
        flat = x.reshape(-1, self.in_features)  # [N, in]
        if flat.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        codes, x_scale = _quantize(flat)  # [N, in] float32 integers, [N, 1]
        y = self._kernel.rounded(codes).mul_(self.scale).mul_(x_scale)  # [N, out]: scale_a * (scale_b * acc)
        if self.bias is not None:
            y = y.add_(self.bias)
        y = y.to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)


def _int8_pair(module: str, parts: dict[str, torch.Tensor], names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """(int8 weight [out, in], float32 scale [out]) of one module, every stored tensor checked."""
    if set(parts) != set(names):
        raise CrosschipError(f"{module}: stored tensors {sorted(parts)} are not the {W8A8_FORMAT} set {list(names)}",
                             "the checkpoint is incomplete or in another layout; re-convert it")
    weight, scale = parts[names[0]], parts[names[1]]
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise CrosschipError(f"{names[0]} is {weight.dtype} {list(weight.shape)}, expected a 2-D int8 weight",
                             f"re-convert the checkpoint with `crosschip convert --to {W8A8_FORMAT}`")
    if len(names) > 2 and bool((parts[names[2]] != 0).any()):  # ascend's weight_offset: zero when symmetric
        raise CrosschipError(f"{names[2]} is not zero (asymmetric weights)", "only symmetric W8A8 is supported")
    return weight, _checked_scale(scale, weight.shape[0], names[1])


def load_int8_weights(ckpt: Checkpoint) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (int8 weight [out, in], float32 scale [out])} of every quantized Linear, as stored.

    Only for `int8-w8a8-dynamic` checkpoints (compressed-tensors or ascend layout); {} for any other
    format, whose Linears run as float. Tensors are read the way `dequantized_state_dict` reads them.
    """
    fmt, layout = storage_format(ckpt)
    if fmt != W8A8_FORMAT:
        return {}
    stored = read_state_dict(ckpt)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, members in group_names(list(stored)).items():
        parts = {n: stored.pop(n) for n in members}
        if members == [name] and parts[name].dtype != torch.int8:
            continue  # kept in high precision (embeddings, norms, ignored Linears)
        module = name.removesuffix(".weight")
        weight, scale = _int8_pair(module, parts, output_names(fmt, layout, name, quantized=True))
        pairs[module] = (weight.contiguous(), scale)
    return pairs


def worst_case_codes(rows: int, columns: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """int8 [rows, columns] that stress exactness: all 127, all -128, alternating +-127, near-127 codes
    (large same-sign sums of no special form, which float32 rounds past 2**24), then uniform codes."""
    fixed = torch.stack([torch.full((columns,), 127), torch.full((columns,), -128),
                         torch.tensor([127, -127]).repeat(columns)[:columns],
                         127 - torch.randint(0, 3, (columns,), generator=generator)])
    rand = torch.randint(-128, 128, (max(rows - len(fixed), 0), columns), generator=generator)
    return torch.cat((fixed, rand))[:rows].to(torch.int8)


def exactness_problem(backend: str, device: torch.device, shape: tuple[int, int] = (40, 2100)) -> str | None:
    """Why `backend` does not compute exact int32 products on `device` (None: it does).

    Checked on worst-case codes (saturating kernels fail on all-127 rows) with more columns than one
    exact chunk, against the int64 reference.
    """
    gen = torch.Generator().manual_seed(0)
    out_f, in_f = shape
    weight, x_q = worst_case_codes(out_f, in_f, gen), worst_case_codes(19, in_f, gen)
    try:
        linear = Int8Linear(weight.to(device), torch.ones(out_f), None, backend)
        got = [(linear.int_matmul(x_q[:rows].to(device)).cpu(), linear.float_matmul(x_q[:rows].to(device)).cpu())
               for rows in (1, 2, 19)]
    except (CrosschipError, RuntimeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    want = int_matmul_reference(x_q, weight)
    for rows, (acc, rounded) in zip((1, 2, 19), got, strict=True):
        if acc.dtype != torch.int32 or not torch.equal(acc.to(torch.int64), want[:rows]):
            return f"wrong int32 products for {rows} rows"
        if not torch.equal(rounded, want[:rows].float()):
            return f"float32 products for {rows} rows are not float32(acc)"
    return None


def _backend_time(backend: str, shapes: Iterable[tuple[int, int]], device: torch.device, rows: int,
                  probe_bytes: int, rounds: int) -> float:
    """Best seconds for one call of every shape at `rows` rows, over weight copies larger than the caches."""
    gen = torch.Generator().manual_seed(0)
    linears: list[tuple[list[Int8Linear], torch.Tensor]] = []
    for out_f, in_f in shapes:
        copies = max(2, min(32, probe_bytes // (out_f * in_f)))
        weight = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, generator=gen).to(device)
        scale = torch.rand(out_f, generator=gen) / 127
        x = torch.randn(rows, in_f, generator=gen).to(device)
        # fbgemm and float copy the weight into their own form; int_mm would share it without the clone
        linears.append(([Int8Linear(weight.clone() if backend == "int_mm" else weight, scale, None, backend)
                         for _ in range(copies)], x))
    total = 0.0
    for copies, x in linears:
        best = math.inf
        for _ in range(rounds):
            synchronize(device)
            start = time.perf_counter()
            for linear in copies:
                linear(x)
            synchronize(device)
            best = min(best, (time.perf_counter() - start) / len(copies))
        total += best
    return total


def candidate_backends(device: torch.device) -> list[str]:
    """Backends worth timing on this device type (each still has to prove itself exact).

    On an x86 CPU `_int_mm` is a naive loop (about 20x slower than fp32 at 16 rows), so it is only
    tried where fbgemm is missing.
    """
    if device.type == "cpu":
        return ["fbgemm", "float"] if fbgemm_available() else ["int_mm", "float"]
    return ["int_mm", "float"] if device.type == "cuda" else ["float"]


def pick_int8_backend(device: torch.device | str, shapes: Iterable[tuple[int, int]], rows: int = 1,
                      probe_bytes: int = 24 * 2**20, rounds: int = 5) -> str:
    """The fastest exact int8 backend for these [out, in] shapes on `device`, measured (about a second).

    Like `runner.pick_layouts`: each candidate first proves itself exact against the int64 reference, then
    runs every shape at `rows` rows (1: decode) over weight copies that exceed the caches. "float" stays
    unless an int8 kernel is clearly (>10%) faster, so timing noise cannot move it.
    """
    device = torch.device(device)
    shapes = sorted(set(shapes))
    exact = [b for b in candidate_backends(device) if b == "float" or exactness_problem(b, device) is None]
    with torch.inference_mode():
        times = {b: _backend_time(b, shapes, device, rows, probe_bytes, rounds) for b in exact}
    best = min(times, key=times.__getitem__)
    return best if times[best] < 0.9 * times["float"] else "float"
