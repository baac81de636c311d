"""Measured hardware peaks and model FLOPs, for throughput and MFU reports.

Peaks are *measured* on the device at hand (never looked up in a table), so an MFU figure
says how well the training loop uses what this device actually delivers for this dtype.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator

import torch

from crosschip.devices import synchronize
from crosschip.errors import CrosschipError

# In-process caches: measuring takes about a second, and a peak does not change within a run.
_PEAK_CACHE: dict[tuple[str, torch.dtype, int, int | None], float] = {}
_BANDWIDTH_CACHE: dict[tuple[str, int], float] = {}

# Routed-expert weights: fused 3D tensors (`mlp.experts.gate_up_proj`, transformers 5.x) or a
# ModuleList (`mlp.experts.3.gate_proj.weight`, transformers 4.x). `shared_experts` run for
# every token and must not match, hence the leading dot.
_ROUTED_EXPERT = re.compile(r"(^|\.)experts\.")


def clear_perf_cache() -> None:
    """Forget cached peak measurements (tests, or after changing clocks/threads)."""
    _PEAK_CACHE.clear()
    _BANDWIDTH_CACHE.clear()


@contextlib.contextmanager
def _cpu_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count for a CPU measurement."""
    if threads is None or device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _timed(device: torch.device, fn: Callable[[], object], reps: int) -> float:
    """Seconds for `reps` calls of `fn`, synchronized on both ends."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def _best_rate(device: torch.device, fn: Callable[[], object], work: float, seconds: float) -> float:
    """Best `work`/s over several timed batches that together take about `seconds`.

    Each batch runs enough calls that launch and sync overhead do not dominate small problems.
    """
    fn()  # warm-up: kernels, allocator, lazy init
    one = max(_timed(device, fn, 1), 1e-7)
    batches = 5
    reps = max(1, int(seconds / batches / one))
    best = 0.0
    deadline = time.perf_counter() + seconds
    for i in range(batches):
        elapsed = max(_timed(device, fn, reps), 1e-9)
        best = max(best, work * reps / elapsed)
        if i >= 1 and time.perf_counter() > deadline:
            break
    return best


def measure_matmul_peak(
    device: torch.device,
    dtype: torch.dtype,
    n: int = 2048,
    seconds: float = 1.0,
    threads: int | None = None,
) -> float:
    """FLOP/s of the best timed batch of square `n x n` matmuls (2*n^3 FLOPs each) on `device`.

    `threads` sets torch's CPU thread count for the measurement (ignored on accelerators).
    Cached in-process per (device, dtype, n, threads).
    """
    if n < 1:
        raise CrosschipError(f"matmul size n must be >= 1, got {n}", "pass a positive n")
    if seconds <= 0:
        raise CrosschipError(f"measurement time must be > 0 s, got {seconds}", "pass seconds > 0")
    if threads is not None and threads < 1:
        raise CrosschipError(f"threads must be >= 1, got {threads}", "pass a positive thread count or None")
    device = torch.device(device)
    key = (str(device), dtype, n, threads)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    with _cpu_threads(device, threads):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        peak = _best_rate(device, lambda: torch.matmul(a, b, out=out), 2.0 * n**3, seconds)
    _PEAK_CACHE[key] = peak
    return peak


def measure_memory_bandwidth(device: torch.device, nbytes: int = 256 * 2**20, cached: bool = True) -> float:
    """Bytes/s of the best of a few large device-to-same-device copies (read + write counted).

    cached=False measures again (a benchmark that alternates it with its own work, so that both see the
    same machine); the new figure does not replace the cached one.
    """
    if nbytes < 1:
        raise CrosschipError(f"nbytes must be >= 1, got {nbytes}", "pass a positive byte count")
    device = torch.device(device)
    key = (str(device), nbytes)
    if cached and key in _BANDWIDTH_CACHE:
        return _BANDWIDTH_CACHE[key]
    # Filled, not torch.empty: untouched CPU pages would read from the shared zero page and
    # report an impossible bandwidth.
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src)  # warm-up
    best = 0.0
    for _ in range(5):
        elapsed = max(_timed(device, lambda: dst.copy_(src), 1), 1e-9)
        best = max(best, 2.0 * nbytes / elapsed)
    if cached:
        _BANDWIDTH_CACHE[key] = best
    return best


def _text_config(model: torch.nn.Module) -> object:
    config = getattr(model, "config", None)
    if config is None:
        raise CrosschipError(
            f"{type(model).__name__} has no Hugging Face config", "pass a transformers PreTrainedModel"
        )
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _expert_fraction(config: object) -> float:
    """Fraction of routed-expert weights one token uses (top-k of E); 1.0 for dense models."""
    experts = None
    for name in ("n_routed_experts", "num_local_experts", "num_experts"):
        experts = getattr(config, name, None)
        if experts:
            break
    top_k = getattr(config, "num_experts_per_tok", None)
    if not experts or not top_k:
        return 1.0
    return min(1.0, top_k / experts)


def matmul_params_per_token(model: torch.nn.Module) -> float:
    """Weights one token multiplies through: every >=2-D weight except embedding lookups.

    The lm_head counts even when tied to the embedding table (it is a real matmul then too).
    Routed-expert weights count only top_k/E of their size.
    """
    fraction = _expert_fraction(_text_config(model))
    total = 0.0
    seen: set[tuple[int, int]] = set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, torch.nn.Embedding):
            continue  # a gather, not a matmul
        for p_name, param in module.named_parameters(recurse=False):
            # Keyed by (module, tensor) so a tied lm_head still counts once as a Linear.
            ident = (id(module), id(param))
            if param.ndim < 2 or ident in seen:
                continue  # norms and biases are elementwise, not matmuls
            seen.add(ident)
            full_name = f"{mod_name}.{p_name}" if mod_name else p_name
            scale = fraction if _ROUTED_EXPERT.search(full_name) else 1.0
            total += param.numel() * scale
    return total


def _attention_dims(config: object) -> tuple[int, int, int]:
    """(n_layers, total query/key width, total value width) from an HF config; MLA-aware."""
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    if not layers or not heads:
        raise CrosschipError(
            f"config {type(config).__name__} lacks num_hidden_layers/num_attention_heads",
            "use a decoder-only transformers model config",
        )
    nope = getattr(config, "qk_nope_head_dim", None)
    rope = getattr(config, "qk_rope_head_dim", None)
    if nope is not None and rope is not None:  # DeepSeek MLA: q/k = nope + rope part
        qk_head = int(nope) + int(rope)
    else:
        qk_head = int(getattr(config, "head_dim", None) or hidden // heads)
    v_head = int(getattr(config, "v_head_dim", None) or qk_head)
    return layers, heads * qk_head, heads * v_head


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM / nanoGPT convention.

    6 * N: each matmul weight costs 2 FLOPs per token forward (multiply + add) and 4 backward
    (gradient w.r.t. input and w.r.t. weight). N excludes embedding lookups, includes lm_head,
    and for MoE counts only the experts a token is routed to.
    12 * L * d_attn * T: per layer, QK^T and attention-times-V each cost 2 * T * d_attn forward
    per token, times 3 for training. Counted non-causally (as PaLM does). With MLA the query/key
    and value widths differ, so the term is 6 * L * T * (d_qk + d_v), which equals 12*L*d_attn*T
    when they match.
    """
    if seq_len < 1:
        raise CrosschipError(f"seq_len must be >= 1, got {seq_len}", "pass the training sequence length")
    layers, d_qk, d_v = _attention_dims(_text_config(model))
    return 6.0 * matmul_params_per_token(model) + 6.0 * layers * seq_len * (d_qk + d_v)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the measured peak (0..1, typically)."""
    if peak_flops <= 0:
        raise CrosschipError(f"peak FLOP/s must be > 0, got {peak_flops}", "measure the peak first")
    if tokens_per_s < 0 or flops_per_token < 0:
        raise CrosschipError("tokens/s and FLOPs/token must be >= 0", "check the throughput numbers")
    return tokens_per_s * flops_per_token / peak_flops
