"""Model executors for the serving engine: one forward over a flat step batch, into a paged KV cache.

Runners share one interface (`ModelRunner`): `forward(StepBatch)` runs the tokens of every sequence
scheduled in an engine step (decodes and prefill chunks together, see `paged.py`) and returns the
logits the engine samples from. Three implement it:

* `DenseRunner`: a lean forward for Llama-style decoders (RMSNorm, RoPE, SwiGLU, GQA), written with
  plain torch ops over the loaded Hugging Face module's weights, with a paged KV cache
  `[layers, blocks * block_size, kv_heads, head_dim]`. Projections and MLPs run once over all N tokens
  of the step (q/k/v and gate/up fused), so the weights are read once per step; attention is batched
  over the decodes and per sequence for prefill chunks.
* `MLARunner` (`mla.py`): DeepSeek-V3 (MLA + MoE) with a compressed latent cache.
* `HFRunner`: any other transformers causal LM, one HF cache per sequence and one HF forward per
  sequence and step: correct, but throughput does not grow with the batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from crosschip.errors import CrosschipError
from crosschip.generate import cache_kwargs, new_cache
from crosschip.serve.cpu_kernel import DenseDecodeKernel, check_kernel_name, kernel_problem
from crosschip.serve.int8 import Int8Linear, pick_int8_backend
from crosschip.serve.paged import DEFAULT_BLOCK_SIZE, StepBatch, blocks_for
from crosschip.serve.proj import LAYOUTS, Proj, fuse, pick_layouts, rms_norm

log = logging.getLogger("crosschip.serve")
Int8Weights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (int8 [out, in], scale [out])
# Rows the int8 backend is timed at when chosen per shape: a mid-size decode batch.
INT8_PROBE_ROWS = 8

# Architectures whose HF forward is exactly RMSNorm -> RoPE attention (GQA) -> SwiGLU MLP with
# the same module names as Llama; the structural checks in `fast_path_problem` guard the rest.
FAST_ARCHS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})
# RoPE variants whose frequencies depend on the sequence length seen so far: not a static table.
_DYNAMIC_ROPE = ("dynamic", "longrope")


class ModelRunner(Protocol):
    """What the engine needs from a model executor. Logits are always float32."""

    vocab_size: int
    max_context: int
    block_size: int
    num_blocks: int
    kv_bytes_per_token: int  # KV cache bytes for one token position of one sequence

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Write the batch's K/V into its blocks and return logits [R, V] of batch.logits_rows."""
        ...

    def free(self, key: int) -> None:
        """Forget per-sequence state held outside the blocks (HF caches); the blocks are the engine's."""
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


class _Projections:
    """Builds each (fused) projection: W8A8 on an int8 kernel where the checkpoint stores it, else float."""

    def __init__(self, layouts: dict[tuple[int, int], str], int8: Int8Weights) -> None:
        self.layouts, self.int8 = layouts, int8
        self.backends: dict[tuple[int, int], str] = {}  # per W8A8 shape, measured when first needed

    def __call__(self, mods: list[torch.nn.Linear], names: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
        if not names or not all(n in self.int8 for n in names):
            return fuse(mods, self.layouts)
        weight = torch.cat([self.int8[n][0] for n in names])  # [sum(out), in]: per-row scales fuse by concatenation
        scale = torch.cat([self.int8[n][1] for n in names])
        bias = None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods])
        device, shape = mods[0].weight.device, tuple(weight.shape)
        if shape not in self.backends:
            self.backends[shape] = pick_int8_backend(device, [shape], rows=INT8_PROBE_ROWS)
        proj = Int8Linear(weight.to(device), scale.to(device), bias, self.backends[shape])
        for m in mods:  # the dequantized float copy is no longer needed: the int8 kernel holds the weight
            m.weight = torch.nn.Parameter(torch.empty(0, dtype=m.weight.dtype, device=device), requires_grad=False)
        return proj


class _Layer:
    """One decoder layer's tensors, fused where two matmuls read the same input."""

    def __init__(self, layer: torch.nn.Module, project: _Projections, prefix: str) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        a, m = f"{prefix}.self_attn.", f"{prefix}.mlp."
        self.qkv = project([attn.q_proj, attn.k_proj, attn.v_proj], [a + "q_proj", a + "k_proj", a + "v_proj"])
        self.o = project([attn.o_proj], [a + "o_proj"])
        self.gate_up = project([mlp.gate_proj, mlp.up_proj], [m + "gate_proj", m + "up_proj"])
        self.down = project([mlp.down_proj], [m + "down_proj"])
        # SiLU (every preset) without the nn.Module call overhead; any other activation via HF's module.
        silu = type(mlp.act_fn).__name__ == "SiLUActivation" or isinstance(mlp.act_fn, torch.nn.SiLU)
        self.act: Callable[[torch.Tensor], torch.Tensor] = F.silu if silu else mlp.act_fn
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.norm1, self.eps1 = norm1.weight.detach(), float(norm1.variance_epsilon)
        self.norm2, self.eps2 = norm2.weight.detach(), float(norm2.variance_epsilon)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """x + SwiGLU(norm(x)); x: [N, D]."""
        gate, up = self.gate_up(rms_norm(x, self.norm2, self.eps2)).chunk(2, dim=-1)  # [N, I] each
        return x + self.down(self.act(gate) * up)


class DenseRunner:
    """gpt-fast-style executor for Llama-architecture models over a paged KV cache.

    Attention reads K/V only through the block tables, so sequences may share blocks (prefix caching).

    layout: "auto" measures the fastest weight layout per projection shape on this device (about a
    second at start-up); "nt" keeps HF's [out, in] with F.linear, "nn" stores [in, out] for torch.mm,
    "dnn" keeps [out, in] with oneDNN's inner product (CPU builds with oneDNN), "split" keeps [out, in]
    and runs small batches as one bmm over per-thread row blocks.

    int8: the raw weights of an int8-w8a8-dynamic checkpoint (`int8.load_int8_weights`); those projections
    run W8A8 (per-token dynamic int8 activations, int32 accumulation) on the fastest exact int8 kernel of
    this device (`int8.pick_int8_backend`, chosen per shape), and their float copies are dropped.

    kernel: "auto" runs steps in which every sequence decodes one token through the CPU decode kernel
    (`cpu_kernel.py`) where it applies (float32 on the CPU) and builds, else torch ops; "cpp" requires it;
    "torch" never uses it.
    """

    shares_blocks = True

    def __init__(
        self,
        model: torch.nn.Module,
        num_blocks: int,
        max_context: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        compile: bool = False,
        layout: str = "auto",
        int8: Int8Weights | None = None,
        kernel: str = "auto",
    ) -> None:
        check_kernel_name(kernel)
        problem = fast_path_problem(model, max_context)
        if problem is not None:
            raise CrosschipError(f"the dense fast path cannot run this model: {problem}", "use HFRunner")
        config, base = model.config, model.model
        self.num_blocks, self.block_size, self.max_context = num_blocks, block_size, max_context
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = base.layers[0].self_attn.head_dim
        self.scale = float(base.layers[0].self_attn.scaling)
        self.vocab_size = int(config.vocab_size)
        self.embed = base.embed_tokens.weight.detach()
        self.dtype, self.device = self.embed.dtype, self.embed.device
        # The CPU decode kernel streams the stored [out, in] weights, so no [in, out] ("nn") copies for it.
        no_nn = kernel != "torch" and self.device.type == "cpu"
        layouts = self._layouts(model, layout, compile, no_nn)
        project = _Projections(layouts, int8 or {})
        with torch.no_grad():
            self.layers = [_Layer(layer, project, f"model.layers.{i}") for i, layer in enumerate(base.layers)]
            # A tied lm_head is the embedding table: keep it [V, D] rather than store a transposed copy.
            tied = model.lm_head.weight.data_ptr() == self.embed.data_ptr()
            self.lm_head = Proj(self.embed, None, "nt") if tied else project([model.lm_head], ["lm_head"])
        self.int8_backends = sorted({p.backend for lay in self.layers for p in (lay.qkv, lay.o, lay.gate_up, lay.down)
                                     if isinstance(p, Int8Linear)})
        self.norm, self.norm_eps = base.norm.weight.detach(), float(base.norm.variance_epsilon)
        self.cos, self.sin_signed = self._rope_tables(base.rotary_emb)
        rows = num_blocks * block_size
        shape = (len(self.layers), rows, self.n_kv, self.head_dim)  # [L, blocks * block_size, Hkv, Dh]
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.kv_bytes_per_token = 2 * len(self.layers) * self.n_kv * self.head_dim * self.embed.element_size()
        # compile: the token-parallel parts (norms, projections, RoPE, MLP) as graphs with a dynamic token
        # count; attention stays eager, since its shapes change with every sequence length.
        self._qkv_fn = torch.compile(self._qkv, dynamic=True) if compile else self._qkv
        self._mlp_fns = [torch.compile(lay.mlp, dynamic=True) if compile else lay.mlp for lay in self.layers]
        self.decode_kernel = self._decode_kernel(kernel, compile, bool(self.int8_backends))

    def _decode_kernel(self, kernel: str, compile: bool, int8: bool) -> DenseDecodeKernel | None:
        if kernel == "torch":
            return None
        problem = kernel_problem(self, compile, int8)
        if problem is not None:
            if kernel == "cpp":
                raise CrosschipError(f"the CPU decode kernel cannot run this model: {problem}",
                                     "serve with --decode-kernel auto or torch")
            log.info("decode steps run torch ops: %s", problem)  # expected off the CPU and for other formats
            return None
        try:
            return DenseDecodeKernel(self)
        except CrosschipError as e:  # it applies but did not build (no compiler, ...): say so, unless required
            if kernel == "cpp":
                raise
            log.warning("decode steps run torch ops, 2-3x slower at batch 1: %s", e)
            return None

    def _layouts(
        self, model: torch.nn.Module, layout: str, compile: bool, no_nn: bool
    ) -> dict[tuple[int, int], str]:
        shapes = _projection_shapes(model)
        if compile:  # inductor picks its own GEMM kernels, and cannot lower oneDNN's op on unfrozen weights
            if layout not in ("auto", "nt"):
                raise CrosschipError(f"--compile runs the nt layout, not {layout!r}", "use layout auto or nt")
            return dict.fromkeys(shapes, "nt")
        if layout == "auto":
            candidates = tuple(name for name in LAYOUTS if not (no_nn and name == "nn"))
            return pick_layouts(shapes, self.dtype, self.device, candidates=candidates)
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
        qkv = layer.qkv(rms_norm(x, layer.norm1, layer.eps1)).view(
            x.shape[0], -1, self.head_dim
        )  # [N, H+2Hkv, Dh]
        qk = qkv[:, : self.n_heads + self.n_kv]
        qk = qk * cos + torch.roll(qk, self.head_dim // 2, dims=-1) * sin  # [N, H+Hkv, Dh]
        return qk[:, : self.n_heads], qk[:, self.n_heads :], qkv[:, self.n_heads + self.n_kv :]

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        if max(batch.context_lens) > self.max_context:
            raise CrosschipError(f"a sequence of {max(batch.context_lens)} tokens exceeds max_context "
                                 f"{self.max_context}")
        if self.decode_kernel is not None and batch.num_decodes == len(batch.keys):
            logits = self.decode_kernel(batch)  # [B, V]: every sequence decodes one token
            return logits if len(batch.logits_rows) == len(batch.keys) else logits[batch.logits_rows]
        x = F.embedding(batch.tokens, self.embed)  # [N, D]
        cos, sin = self.cos[batch.positions, None], self.sin_signed[batch.positions, None]  # [N, 1, Dh]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv_fn(layer, x, cos, sin)  # [N, H, Dh], [N, Hkv, Dh], [N, Hkv, Dh]
            self.k_cache[i].index_copy_(0, batch.slot_mapping, k)
            self.v_cache[i].index_copy_(0, batch.slot_mapping, v)
            attn = self._attention(batch, q, k, v, i)  # [N, H * Dh]
            x = self._mlp_fns[i](x + layer.o(attn))  # [N, D]
        x = x.index_select(0, batch.logits_rows)  # [R, D]: the final norm and lm_head only where sampled
        return self.lm_head(rms_norm(x, self.norm, self.norm_eps)).float()

    def _attention(
        self, batch: StepBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int
    ) -> torch.Tensor:
        """Attention for every token of the step: q [N, H, Dh] -> [N, H * Dh]."""
        d, group = batch.num_decodes, self.n_heads // self.n_kv
        kc, vc = self.k_cache[layer], self.v_cache[layer]  # [rows, Hkv, Dh]
        parts = []
        if d:
            rows = batch.decode_rows  # [D, T]
            width = rows.shape[1]
            keys = kc.index_select(0, rows.view(-1)).view(d, width, self.n_kv, self.head_dim).transpose(1, 2)
            values = vc.index_select(0, rows.view(-1)).view(d, width, self.n_kv, self.head_dim).transpose(1, 2)
            # GQA without repeating K/V: the `group` query heads of a KV head act as its queries.
            qd = q[:d].view(d, self.n_kv, group, self.head_dim)  # [D, Hkv, G, Dh]
            out = F.scaled_dot_product_attention(qd, keys, values, attn_mask=batch.decode_mask, scale=self.scale)
            parts.append(out.reshape(d, -1))  # [D, H * Dh]
        for chunk in batch.prefills:
            lo, hi = chunk.lo, chunk.hi
            whole = chunk.start == 0  # the chunk is its whole context: causal attention over its own K/V
            if whole:
                keys, values = k[lo:hi], v[lo:hi]  # [S, Hkv, Dh]
            else:  # a later chunk: attend over the cached context, causally offset by its start
                keys, values = kc.index_select(0, chunk.rows), vc.index_select(0, chunk.rows)  # [T, Hkv, Dh]
            keys = keys.transpose(0, 1).repeat_interleave(group, dim=0)  # [H, T, Dh]
            values = values.transpose(0, 1).repeat_interleave(group, dim=0)
            out = F.scaled_dot_product_attention(
                q[lo:hi].transpose(0, 1), keys, values, attn_mask=None if whole else chunk.mask, is_causal=whole,
                scale=self.scale
            )  # [H, S, Dh]
            parts.append(out.transpose(0, 1).reshape(hi - lo, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def free(self, key: int) -> None:
        """Nothing to forget: a sequence's K/V lives in its blocks, which the engine returns to the pool."""


class HFRunner:
    """Fallback for any transformers causal LM: one HF cache per sequence, one forward per sequence.

    Correct for every architecture transformers supports (sliding windows, ...), but a step costs one
    full HF forward per scheduled sequence, so throughput does not grow with the batch. Blocks are
    accounted by the engine as for the other runners (capacity planning), though HF owns the tensors, so
    they cannot be shared between sequences (no prefix caching).
    """

    shares_blocks = False

    def __init__(self, model: torch.nn.Module, num_blocks: int, max_context: int,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        self.model = model
        self.num_blocks, self.block_size, self.max_context = num_blocks, block_size, max_context
        self.vocab_size = int(model.config.vocab_size)
        self.device = next(model.parameters()).device
        self._cache_arg, _ = cache_kwargs(model)
        self._caches: dict[int, object] = {}
        self.kv_bytes_per_token = measure_kv_bytes_per_token(model)

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        rows = []
        for b, key in enumerate(batch.keys):
            lo, hi, start = batch.query_starts[b], batch.query_starts[b + 1], batch.starts[b]
            if start == 0:
                self._caches[key] = new_cache(self.model)
            cache = self._caches.get(key)
            if cache is None:
                raise CrosschipError(f"sequence {key} continues at position {start} but holds no cache")
            ids, positions = batch.tokens[lo:hi][None], batch.positions[lo:hi][None]  # [1, S]
            out = self.model(input_ids=ids, position_ids=positions, use_cache=True, **{self._cache_arg: cache})
            logits = out.logits[0].float()  # [S, V]
            count = batch.logits_counts[b]
            if count:
                rows.append(logits[-count:])
        if not rows:
            return torch.empty(0, self.vocab_size, device=self.device)
        return torch.cat(rows, dim=0)  # [R, V]

    def free(self, key: int) -> None:
        self._caches.pop(key, None)


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


def plan_blocks(
    max_batch: int, max_context: int, kv_bytes_per_token: int, budget_bytes: int | None, block_size: int
) -> int:
    """Cache blocks: what the budget holds, at most max_batch full-context sequences' worth.

    More would never be used (at most max_batch sequences run). At least one full-context sequence must
    fit, so a request the engine accepts can always finish.
    """
    if max_batch < 1:
        raise CrosschipError(f"max_batch must be >= 1, got {max_batch}", "pass --max-batch 1 or more")
    per_sequence = blocks_for(max_context, block_size)
    cap = max_batch * per_sequence
    if budget_bytes is None:
        return cap
    blocks = min(cap, budget_bytes // (kv_bytes_per_token * block_size))
    if blocks < per_sequence:
        raise CrosschipError(
            f"a KV budget of {budget_bytes / 2**20:.1f} MiB holds no sequence of {max_context} tokens "
            f"({kv_bytes_per_token * max_context / 2**20:.1f} MiB each)",
            "raise the KV budget or lower --max-context",
        )
    return int(blocks)


def make_runner(
    model: torch.nn.Module,
    max_batch: int,
    max_context: int,
    kv_budget_bytes: int | None = None,
    compile: bool = False,
    generic: bool = False,
    layout: str = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
    int8: Int8Weights | None = None,
    kernel: str = "auto",
) -> ModelRunner:
    """The fastest exact runner for `model`: DenseRunner or MLARunner when the architecture allows, else HFRunner."""
    from crosschip.serve.mla import MLARunner, mla_kv_bytes_per_token, mla_problem

    check_kernel_name(kernel)
    model.eval()
    if not generic and fast_path_problem(model, max_context) is None:
        blocks = plan_blocks(max_batch, max_context, dense_kv_bytes_per_token(model), kv_budget_bytes, block_size)
        return DenseRunner(model, blocks, max_context, block_size, compile=compile, layout=layout, int8=int8,
                           kernel=kernel)
    if kernel == "cpp":
        raise CrosschipError(f"the CPU decode kernel runs Llama-style decoders, not {type(model).__name__}",
                             "serve with --decode-kernel auto or torch")
    if not generic and mla_problem(model, max_context) is None:
        blocks = plan_blocks(max_batch, max_context, mla_kv_bytes_per_token(model), kv_budget_bytes, block_size)
        return MLARunner(model, blocks, block_size, max_context)
    blocks = plan_blocks(max_batch, max_context, measure_kv_bytes_per_token(model), kv_budget_bytes, block_size)
    return HFRunner(model, blocks, max_context, block_size)
