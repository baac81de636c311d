"""Model executors for the serving engine: prefill one sequence, decode one token for many.

Two runners share one interface (`ModelRunner`):

* `DenseRunner`: a lean forward for Llama-style decoders (RMSNorm, RoPE, SwiGLU, GQA), written
  with plain torch ops over the loaded Hugging Face module's weights, with a preallocated KV cache
  `[layers, slots, kv_heads, max_context, head_dim]`. A decode step is a fixed ~25 torch ops per
  layer whatever the batch size (q/k/v and gate/up fused, RoPE from a table, GQA without repeating
  K/V), so batch-1 decode is dominated by reading the weights. `torch.compile` of the decode step
  is optional (meant for accelerators; on CPU it compiles for minutes and is not faster).
* `HFRunner`: any other transformers causal LM (e.g. DeepSeek-V3 MLA+MoE), one HF cache per
  sequence. Decode runs one HF forward per active sequence: correct, but slower.

Slots are cache rows. The engine keeps live sequences in slots 0..B-1 (compacting with `move`
when one leaves), so a decode step reads the cache through views instead of gathering it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from crosschip.devices import synchronize
from crosschip.errors import CrosschipError
from crosschip.generate import cache_kwargs, new_cache

# Architectures whose HF forward is exactly RMSNorm -> RoPE attention (GQA) -> SwiGLU MLP with
# the same module names as Llama; the structural checks in `fast_path_problem` guard the rest.
FAST_ARCHS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})
# RoPE variants whose frequencies depend on the sequence length seen so far: not a static table.
_DYNAMIC_ROPE = ("dynamic", "longrope")
# Compiled decode attends over live lengths rounded up to this bucket: fewer distinct shapes, at the cost of
# attending over at most this many masked positions.
LENGTH_BUCKET = 64


class ModelRunner(Protocol):
    """What the engine needs from a model executor. Logits are always float32."""

    num_slots: int
    max_context: int
    vocab_size: int
    kv_bytes_per_token: int  # KV cache bytes for one token position of one sequence

    def prefill(self, slot: int, token_ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Fill `slot` from position 0 with token_ids [S]; logits [S, V] (or [1, V] if last_only)."""
        ...

    def decode(
        self,
        slots: torch.Tensor | None,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        max_len: int | None = None,
    ) -> torch.Tensor:
        """One token per sequence: tokens[b] sits at positions[b] in slots[b]. Logits [B, V].

        slots=None means slots 0..B-1 (no gather). `max_len`, when given, must equal
        max(positions) + 1 (it saves a device sync when the caller knows it).
        """
        ...

    def move(self, src: int, dst: int, length: int) -> None:
        """Move the first `length` cache positions of slot src to slot dst; src becomes free."""
        ...

    def release(self, slot: int) -> None:
        """Forget a slot's cache (the next prefill overwrites it anyway)."""
        ...


def fast_path_problem(model: torch.nn.Module, max_context: int) -> str | None:
    """Why `DenseRunner` cannot run this model exactly, or None when it can."""
    name = type(model).__name__
    if name not in FAST_ARCHS:
        return f"{name} is not a dense Llama-style decoder"
    config = model.config
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if any(kind in rope_type for kind in _DYNAMIC_ROPE):
        return f"rope_type {rope_type!r} rescales with sequence length"
    window = getattr(config, "sliding_window", None)
    if window is not None and window < max_context:
        return f"sliding_window {window} < max_context {max_context}"
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return "attention has q/k norms"
        biases = [m.bias is not None for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        if any(biases) and not all(biases):
            return "q/k/v projections mix biased and unbiased"
        if (mlp.gate_proj.bias is None) != (mlp.up_proj.bias is None):
            return "gate/up projections mix biased and unbiased"
    return None


LAYOUTS = ("nt", "nn", "dnn", "split")
# "split" runs its row-block bmm for at most this many input rows and oneDNN (else F.linear) above: on a
# 2-core EPYC the bmm is 1.4-1.8x faster than oneDNN at 1-2 rows, even at 4-8 and 1.4x slower at 16.
SPLIT_MAX_ROWS = 4


def _onednn_linear() -> Callable[..., torch.Tensor] | None:
    """oneDNN's inner product (the op inductor's CPU backend emits), or None in builds without it.

    Unlike BLAS GEMV, which runs a batch-1 projection on one core, it splits one row's projection
    across all intra-op threads; it takes the ordinary [out, in] weight, so nothing is repacked.
    """
    try:
        return torch.ops.mkldnn._linear_pointwise  # noqa: SLF001 - no public entry point
    except (AttributeError, RuntimeError):
        return None


def _split_parts(out_features: int) -> int:
    """Row blocks for the "split" layout: one per intra-op thread (at least 2), dividing `out`."""
    parts = max(2, torch.get_num_threads())
    while out_features % parts:
        parts -= 1
    return parts


class _Proj:
    """y = x @ W^T + b for 2-D x, W stored [out, in] ("nt", "dnn", "split") or [in, out] ("nn").

    CPU libraries run batch-1 GEMV at speeds up to 4x apart depending on the layout, the shape
    and the kernel (BLAS "nt"/"nn", oneDNN "dnn", batched "split"), so `pick_layouts` chooses per shape.
    "split" views W as [P, out/P, in] and runs one `bmm`: torch parallelises bmm over its batch, so
    each thread streams its own block of rows, where BLAS runs a batch-1 GEMV on one core. Measured
    on a 2-core EPYC: 30-37 GB/s of weights against 9 GB/s ("nt") and 16-25 GB/s ("dnn").
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, layout: str) -> None:
        if layout not in LAYOUTS:
            raise CrosschipError(
                f"unknown weight layout {layout!r}", f"use auto or one of {', '.join(LAYOUTS)}"
            )
        self.layout = layout
        self.nn = layout == "nn"
        self.w = weight.t().contiguous() if self.nn else weight.contiguous()  # [in, out] | [out, in]
        self.b = bias
        # "split" runs above SPLIT_MAX_ROWS rows on oneDNN where it can (CPU), else on F.linear
        use_dnn = layout == "dnn" or (layout == "split" and self.w.device.type == "cpu")
        self._dnn = _onednn_linear() if use_dnn else None
        if layout == "dnn" and self._dnn is None:
            raise CrosschipError("this torch build has no oneDNN linear", "use layout auto, nt, nn or split")
        self._blocks = None
        if layout == "split":
            out_f, in_f = self.w.shape
            parts = _split_parts(out_f)
            if parts < 2:
                raise CrosschipError(f"{out_f} output rows do not split into blocks", "use layout nt")
            self._blocks = self.w.view(parts, out_f // parts, in_f)  # [P, out/P, in], a view

    def weight_view(self, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of the logical [out, in] weight, as a view of the stored tensor."""
        return self.w[:, start:stop].t() if self.nn else self.w[start:stop]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in] -> [N, out]."""
        if self._blocks is not None and x.shape[0] <= SPLIT_MAX_ROWS:
            parts = self._blocks.shape[0]
            y = torch.bmm(self._blocks, x.t().unsqueeze(0).expand(parts, -1, -1))  # [P, out/P, N]
            y = y.view(-1, x.shape[0]).t().contiguous()  # [N, out]; no copy when N == 1
            return y if self.b is None else y + self.b
        if self._dnn is not None:
            return self._dnn(x, self.w, self.b, "none", [], "")
        if self.nn:
            return torch.mm(x, self.w) if self.b is None else torch.addmm(self.b, x, self.w)
        return F.linear(x, self.w, self.b)


def _fuse(mods: list[torch.nn.Linear], layouts: dict[tuple[int, int], str]) -> _Proj:
    """One projection for several linears that read the same input (q/k/v, gate/up).

    The modules' parameters are rebound to views of the fused tensor, so the HF model keeps
    working (tests compare against it) without a second copy of the weights in memory.
    """
    weight = torch.cat([m.weight.detach() for m in mods], dim=0)  # [sum(out), in]
    bias = None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods], dim=0)
    proj = _Proj(weight, bias, layouts[tuple(weight.shape)])
    start = 0
    for m in mods:
        stop = start + m.weight.shape[0]
        m.weight = torch.nn.Parameter(proj.weight_view(start, stop), requires_grad=False)
        if bias is not None:
            m.bias = torch.nn.Parameter(bias[start:stop], requires_grad=False)
        start = stop
    return proj


def _probe_projections(
    shape: tuple[int, int], layout: str, weight: torch.Tensor, x: torch.Tensor, copies: int
) -> list[_Proj] | None:
    """`copies` projections of `weight` in `layout`; None if the kernel is missing, fails or is wrong."""
    try:
        projs = [_Proj(weight.clone(), None, layout) for _ in range(copies)]
        got, want = projs[0](x).float(), F.linear(x, weight).float()
    except (CrosschipError, RuntimeError, NotImplementedError):
        return None
    return projs if torch.allclose(got, want, rtol=1e-2, atol=1e-2 * shape[1] ** 0.5) else None


def _layout_times(
    shape: tuple[int, int], dtype: torch.dtype, device: torch.device, probe_bytes: int, rounds: int = 6
) -> dict[str, float]:
    """Best seconds per batch-1 projection in each layout (inf where it cannot run).

    Each layout runs over copies that together exceed the caches (cold weights, as in decode), and
    the layouts take turns round by round so that a burst of load elsewhere hits them all alike.
    """
    out_f, in_f = shape
    itemsize = torch.empty((), dtype=dtype).element_size()
    copies = max(2, min(64, probe_bytes // (out_f * in_f * itemsize)))
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_f, in_f, generator=gen).to(device=device, dtype=dtype)
    x = torch.randn(1, in_f, generator=gen).to(device=device, dtype=dtype)
    candidates = {layout: _probe_projections(shape, layout, weight, x, copies) for layout in LAYOUTS}
    best = {layout: math.inf for layout in LAYOUTS}
    for _ in range(rounds):
        for layout, projs in candidates.items():
            if projs is None:
                continue
            synchronize(device)
            start = time.perf_counter()
            for proj in projs:
                proj(x)
            synchronize(device)
            best[layout] = min(best[layout], (time.perf_counter() - start) / copies)
    return best


def pick_layouts(
    shapes: set[tuple[int, int]], dtype: torch.dtype, device: torch.device, probe_bytes: int = 64 * 2**20
) -> dict[tuple[int, int], str]:
    """The fastest weight layout of each [out, in] shape for batch-1 decode, measured on this device.

    HF's own "nt" stays unless another layout is clearly (>10%) faster: timing noise must not move it.
    """
    chosen = {}
    with torch.inference_mode():
        for shape in sorted(shapes):
            times = _layout_times(shape, dtype, device, probe_bytes)
            best = min(times, key=times.__getitem__)
            chosen[shape] = best if times[best] < 0.9 * times["nt"] else "nt"
    return chosen


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as HF computes it: in float32, cast back to x's dtype before the weight multiply."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one fused kernel; same op order in fp32
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _bucket(length: int, cap: int) -> int:
    return min(cap, -(-length // LENGTH_BUCKET) * LENGTH_BUCKET)


def _projection_shapes(model: torch.nn.Module) -> set[tuple[int, int]]:
    """[out, in] of every (fused) projection DenseRunner multiplies by, lm_head included."""
    shapes = set()
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv_out = sum(m.weight.shape[0] for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        shapes.add((qkv_out, attn.q_proj.weight.shape[1]))
        shapes.add(tuple(attn.o_proj.weight.shape))
        shapes.add((2 * mlp.gate_proj.weight.shape[0], mlp.gate_proj.weight.shape[1]))
        shapes.add(tuple(mlp.down_proj.weight.shape))
    shapes.add(tuple(model.lm_head.weight.shape))
    return shapes


class _Layer:
    """One decoder layer's tensors, fused where two matmuls read the same input."""

    def __init__(self, layer: torch.nn.Module, layouts: dict[tuple[int, int], str]) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], layouts)
        self.o = _fuse([attn.o_proj], layouts)
        self.gate_up = _fuse([mlp.gate_proj, mlp.up_proj], layouts)
        self.down = _fuse([mlp.down_proj], layouts)
        # SiLU (every preset) without the nn.Module call overhead; any other activation via HF's module.
        silu = type(mlp.act_fn).__name__ == "SiLUActivation" or isinstance(mlp.act_fn, torch.nn.SiLU)
        self.act: Callable[[torch.Tensor], torch.Tensor] = F.silu if silu else mlp.act_fn
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.norm1, self.eps1 = norm1.weight.detach(), float(norm1.variance_epsilon)
        self.norm2, self.eps2 = norm2.weight.detach(), float(norm2.variance_epsilon)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """x + SwiGLU(norm(x)); x: [N, D]."""
        gate, up = self.gate_up(_rms_norm(x, self.norm2, self.eps2)).chunk(2, dim=-1)  # [N, I] each
        return x + self.down(self.act(gate) * up)


class DenseRunner:
    """gpt-fast-style executor for Llama-architecture models with a static, preallocated KV cache.

    layout: "auto" measures the fastest weight layout per projection shape on this device (about a
    second at start-up); "nt" keeps HF's [out, in] with F.linear, "nn" stores [in, out] for torch.mm,
    "dnn" keeps [out, in] with oneDNN's inner product (CPU builds with oneDNN), "split" keeps [out, in]
    and runs small batches as one bmm over per-thread row blocks.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        num_slots: int,
        max_context: int,
        compile: bool = False,
        layout: str = "auto",
    ) -> None:
        problem = fast_path_problem(model, max_context)
        if problem is not None:
            raise CrosschipError(f"the dense fast path cannot run this model: {problem}", "use HFRunner")
        config, base = model.config, model.model
        self.num_slots, self.max_context = num_slots, max_context
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = base.layers[0].self_attn.head_dim
        self.scale = float(base.layers[0].self_attn.scaling)
        self.vocab_size = int(config.vocab_size)
        self.embed = base.embed_tokens.weight.detach()
        self.dtype, self.device = self.embed.dtype, self.embed.device
        layouts = self._layouts(model, layout)
        with torch.no_grad():
            self.layers = [_Layer(layer, layouts) for layer in base.layers]
            # A tied lm_head is the embedding table: keep it [V, D] rather than store a transposed copy.
            tied = model.lm_head.weight.data_ptr() == self.embed.data_ptr()
            self.lm_head = _Proj(self.embed, None, "nt") if tied else _fuse([model.lm_head], layouts)
        self.norm, self.norm_eps = base.norm.weight.detach(), float(base.norm.variance_epsilon)
        self.cos, self.sin_signed = self._rope_tables(base.rotary_emb)
        shape = (len(self.layers), num_slots, self.n_kv, max_context, self.head_dim)  # [L, slots, Hkv, T, Dh]
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.kv_bytes_per_token = 2 * len(self.layers) * self.n_kv * self.head_dim * self.embed.element_size()
        self._rows = torch.arange(num_slots, device=self.device)
        self._positions = torch.arange(max_context, device=self.device)
        self._compiled = compile
        self._decode_fn = torch.compile(self._decode_core, dynamic=True) if compile else self._decode_core

    def _layouts(self, model: torch.nn.Module, layout: str) -> dict[tuple[int, int], str]:
        shapes = _projection_shapes(model)
        if layout == "auto":
            return pick_layouts(shapes, self.dtype, self.device)
        return dict.fromkeys(shapes, layout)

    def _rope_tables(self, rotary: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """cos [T, Dh] and sign-folded sin [T, Dh], computed the way HF's rotary module computes them.

        rotate_half(x) * sin == roll(x, Dh/2) * cat(-sin1, sin2): one roll instead of slice+neg+cat.
        """
        inv_freq = rotary.inv_freq.to(device=self.device, dtype=torch.float32)  # [Dh/2]
        positions = torch.arange(self.max_context, device=self.device, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, Dh]
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        cos = (emb.cos() * scaling).to(self.dtype)
        sin = (emb.sin() * scaling).to(self.dtype)
        half = self.head_dim // 2
        return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def _qkv(
        self, layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """x [N, D] -> q [N, H, Dh], k [N, Hkv, Dh], v [N, Hkv, Dh], RoPE applied to q and k."""
        qkv = layer.qkv(_rms_norm(x, layer.norm1, layer.eps1)).view(
            x.shape[0], -1, self.head_dim
        )  # [N, H+2Hkv, Dh]
        qk = qkv[:, : self.n_heads + self.n_kv]
        qk = qk * cos + torch.roll(qk, self.head_dim // 2, dims=-1) * sin  # [N, H+Hkv, Dh]
        return qk[:, : self.n_heads], qk[:, self.n_heads :], qkv[:, self.n_heads + self.n_kv :]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(_rms_norm(x, self.norm, self.norm_eps)).float()

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        ids = token_ids.to(self.device).view(-1)  # [S]
        seq = ids.shape[0]
        if not 0 < seq <= self.max_context:
            raise CrosschipError(f"prefill of {seq} tokens does not fit max_context {self.max_context}")
        x = F.embedding(ids, self.embed)  # [S, D]
        cos, sin = self.cos[:seq, None], self.sin_signed[:seq, None]  # [S, 1, Dh]
        group = self.n_heads // self.n_kv
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)  # [S, H|Hkv, Dh]
            k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, S, Dh]
            self.k_cache[i, slot, :, :seq] = k
            self.v_cache[i, slot, :, :seq] = v
            keys, values = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)  # [H, S, Dh]
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1), keys, values, is_causal=True, scale=self.scale
            )
            x = x + layer.o(attn.transpose(0, 1).reshape(seq, -1))  # [S, D]
            x = layer.mlp(x)
        return self._logits(x[-1:] if last_only else x)

    @torch.inference_mode()
    def decode(
        self,
        slots: torch.Tensor | None,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        max_len: int | None = None,
    ) -> torch.Tensor:
        if max_len is None:
            max_len = int(positions.max()) + 1
        # Compiled: bucketed lengths, always masked (few distinct graphs). Eager: the exact length,
        # and a lone sequence needs no mask at all (a masked SDPA on CPU runs a parallel region that
        # costs ~5x more than the unmasked kernel when cores are contended).
        masked = self._compiled or tokens.shape[0] > 1
        length = _bucket(max_len, self.max_context) if self._compiled else max_len
        rows = None if slots is None else slots.to(self.device)
        return self._decode_fn(rows, tokens.to(self.device), positions.to(self.device), length, masked)

    def _decode_core(
        self,
        slots: torch.Tensor | None,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        length: int,
        masked: bool,
    ) -> torch.Tensor:
        batch = tokens.shape[0]
        rows = self._rows[:batch] if slots is None else slots  # [B]
        x = F.embedding(tokens, self.embed)  # [B, D]
        cos, sin = self.cos[positions, None], self.sin_signed[positions, None]  # [B, 1, Dh]
        # Each sequence sees its own positions 0..pos; the rest of the length is masked out.
        mask = (
            (self._positions[None, :length] <= positions[:, None])[:, None, None] if masked else None
        )  # [B,1,1,L]
        group = self.n_heads // self.n_kv
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            self.k_cache[i, rows, :, positions] = k  # k: [B, Hkv, Dh]
            self.v_cache[i, rows, :, positions] = v
            if slots is None:  # live slots are a prefix: attend through views, no copy
                keys, values = self.k_cache[i, :batch, :, :length], self.v_cache[i, :batch, :, :length]
            else:
                keys, values = self.k_cache[i, rows, :, :length], self.v_cache[i, rows, :, :length]
            # GQA without repeating K/V: the `group` query heads of a KV head act as its queries.
            q = q.view(batch, self.n_kv, group, self.head_dim)  # [B, Hkv, G, Dh]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
            x = x + layer.o(attn.reshape(batch, -1))  # [B, D]
            x = layer.mlp(x)
        return self._logits(x)

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
        self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    def release(self, slot: int) -> None:
        """Nothing to free: the cache is preallocated and the next prefill overwrites the slot."""


class HFRunner:
    """Fallback for any transformers causal LM: one HF cache per slot, one forward per sequence.

    Correct for every architecture transformers supports (MLA, MoE, sliding windows, ...), but a
    decode step costs B full HF forwards, so throughput does not grow with the batch.
    """

    def __init__(self, model: torch.nn.Module, num_slots: int, max_context: int) -> None:
        self.model = model
        self.num_slots, self.max_context = num_slots, max_context
        self.vocab_size = int(model.config.vocab_size)
        self.device = next(model.parameters()).device
        self._cache_arg, _ = cache_kwargs(model)
        self._caches: list[object | None] = [None] * num_slots
        self.kv_bytes_per_token = measure_kv_bytes_per_token(model)

    def _forward(self, ids: torch.Tensor, cache: object, positions: torch.Tensor) -> torch.Tensor:
        """ids, positions: [1, S] -> float32 logits [S, V]."""
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True, **{self._cache_arg: cache})
        return out.logits[0].float()

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        ids = token_ids.to(self.device).view(1, -1)  # [1, S]
        if not 0 < ids.shape[1] <= self.max_context:
            raise CrosschipError(
                f"prefill of {ids.shape[1]} tokens does not fit max_context {self.max_context}"
            )
        cache = new_cache(self.model)
        positions = torch.arange(ids.shape[1], device=self.device)[None]
        logits = self._forward(ids, cache, positions)
        self._caches[slot] = cache
        return logits[-1:] if last_only else logits

    @torch.inference_mode()
    def decode(
        self,
        slots: torch.Tensor | None,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        max_len: int | None = None,
    ) -> torch.Tensor:
        batch = tokens.shape[0]
        slot_ids = range(batch) if slots is None else slots.tolist()
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        rows = []
        for b, slot in enumerate(slot_ids):
            cache = self._caches[slot]
            if cache is None:
                raise CrosschipError(f"decode on slot {slot}, which holds no prefilled sequence")
            rows.append(self._forward(tokens[b].view(1, 1), cache, positions[b].view(1, 1)))
        return torch.cat(rows, dim=0)  # [B, V]

    def move(self, src: int, dst: int, length: int) -> None:
        self._caches[dst], self._caches[src] = self._caches[src], None

    def release(self, slot: int) -> None:
        self._caches[slot] = None


def _cache_nbytes(cache: object) -> int:
    """Bytes held by the tensors of an HF cache (DynamicCache layers in transformers 5.x)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        total += sum(
            t.numel() * t.element_size() for t in vars(layer).values() if isinstance(t, torch.Tensor)
        )
    return total


@torch.inference_mode()
def measure_kv_bytes_per_token(model: torch.nn.Module, probe_tokens: int = 4) -> int:
    """KV bytes per token position, measured with a short forward (works for MLA's latent cache too)."""
    device = next(model.parameters()).device
    cache_arg, _ = cache_kwargs(model)
    cache = new_cache(model)
    ids = torch.zeros(1, probe_tokens, dtype=torch.long, device=device)
    model(input_ids=ids, use_cache=True, **{cache_arg: cache})
    measured = _cache_nbytes(cache)
    if measured == 0:
        raise CrosschipError(
            f"cannot measure the KV cache of {type(model).__name__}: its cache holds no tensors",
            "serve a model whose transformers class uses DynamicCache",
        )
    return math.ceil(measured / probe_tokens)


def dense_kv_bytes_per_token(model: torch.nn.Module) -> int:
    """K and V for every layer and KV head, in the model's dtype (what DenseRunner allocates)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize


def plan_slots(max_batch: int, max_context: int, kv_bytes_per_token: int, budget_bytes: int | None) -> int:
    """Sequences that fit: min(max_batch, budget // bytes per slot); a slot holds max_context positions."""
    if max_batch < 1:
        raise CrosschipError(f"max_batch must be >= 1, got {max_batch}", "pass --max-batch 1 or more")
    if budget_bytes is None:
        return max_batch
    per_slot = kv_bytes_per_token * max_context
    slots = min(max_batch, budget_bytes // per_slot)
    if slots < 1:
        raise CrosschipError(
            f"a KV budget of {budget_bytes / 2**20:.1f} MiB holds no sequence of {max_context} tokens "
            f"({per_slot / 2**20:.1f} MiB each)",
            "raise the KV budget or lower --max-context",
        )
    return int(slots)


def make_runner(
    model: torch.nn.Module,
    max_batch: int,
    max_context: int,
    kv_budget_bytes: int | None = None,
    compile: bool = False,
    generic: bool = False,
    layout: str = "auto",
) -> ModelRunner:
    """The fastest exact runner for `model`: DenseRunner when the architecture allows, else HFRunner."""
    model.eval()
    if not generic and fast_path_problem(model, max_context) is None:
        slots = plan_slots(max_batch, max_context, dense_kv_bytes_per_token(model), kv_budget_bytes)
        return DenseRunner(model, slots, max_context, compile=compile, layout=layout)
    slots = plan_slots(max_batch, max_context, measure_kv_bytes_per_token(model), kv_budget_bytes)
    return HFRunner(model, slots, max_context)
