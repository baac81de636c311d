"""DeepSeek-V3 (MLA + MoE) for the serving engine: one flat `StepBatch` per step over a paged latent cache.

Multi-head latent attention (MLA) compresses each token's keys and values into one latent vector
`c_kv` (kv_lora_rank) plus one RoPE'd key `k_pe` shared by all heads (qk_rope_head_dim), which is all
the cache holds: (kv_lora_rank + qk_rope_head_dim) values per token per layer instead of the
heads * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim) of full K/V (for DeepSeek-V3: 576 vs
32768 per layer, 57x less).

Attention never decompresses the cache. `kv_b_proj` maps the latent to per-head k_nope (W_UK) and
v (W_UV), both linear, so q_nope . (W_UK c) = (W_UK^T q_nope) . c and sum_t p_t W_UV c_t =
W_UV sum_t p_t c_t: each head's query moves into latent space once, attends over the cached
[c_kv, k_pe] rows directly (an MQA with one shared key head), and W_UV is applied to the attended
latent afterwards (DeepSeek-V2's "weight absorption"). Decodes and prefill chunks share this path;
for long prefills decompressing K/V is cheaper in FLOPs (vLLM does), this keeps one exact code path.

The MoE dispatch sorts the step's (token, expert) pairs by expert, so each expert that received
tokens runs one matmul over all of them, and scatter-adds the weighted outputs back (index_add_).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from crosschip.errors import CrosschipError
from crosschip.serve.paged import StepBatch
from crosschip.serve.proj import rms_norm

MLA_ARCHS = frozenset({"DeepseekV3ForCausalLM"})
# RoPE variants whose frequencies depend on the sequence length seen so far: not a static table.
_DYNAMIC_ROPE = ("dynamic", "longrope")
_FIX = "serve it with the generic HF runner (--generic)"


def _rope_type(config: object) -> str:
    return str((getattr(config, "rope_parameters", None) or {}).get("rope_type", "default"))


def _layer_problem(layer: torch.nn.Module) -> str | None:
    """Why one decoder layer's modules differ from the DeepSeek-V3 layout MLARunner computes."""
    attn, mlp = layer.self_attn, layer.mlp
    if attn.kv_b_proj.bias is not None:
        return "kv_b_proj has a bias, which weight absorption cannot fold"
    if hasattr(mlp, "experts"):
        gate_up = getattr(mlp.experts, "gate_up_proj", None)
        if not isinstance(gate_up, torch.Tensor) or gate_up.dim() != 3:
            return "experts are not stored as stacked [experts, 2 * inter, hidden] tensors"
        if getattr(mlp.experts, "gate_up_proj_bias", None) is not None:
            return "experts have biases"
    return None


def mla_problem(model: torch.nn.Module, max_context: int) -> str | None:
    """Why `MLARunner` cannot run this model exactly, or None when it can."""
    name = type(model).__name__
    if name not in MLA_ARCHS:
        return f"{name} is not a DeepSeek-V3 MLA+MoE model"
    config = model.config
    if max_context < 1:
        return f"max_context {max_context} < 1"
    rope_type = _rope_type(config)
    if any(kind in rope_type for kind in _DYNAMIC_ROPE):
        return f"rope_type {rope_type!r} rescales with sequence length"
    if config.num_key_value_heads != config.num_attention_heads:
        return "num_key_value_heads differs from num_attention_heads (HF would repeat the MLA heads)"
    if config.qk_rope_head_dim % 2:
        return f"qk_rope_head_dim {config.qk_rope_head_dim} is odd"
    if config.n_routed_experts % config.n_group or config.n_routed_experts // config.n_group < 2:
        return f"{config.n_routed_experts} experts do not form {config.n_group} groups of >= 2"
    for layer in model.model.layers:
        problem = _layer_problem(layer)
        if problem:
            return problem
    return None


def mla_kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Latent cache bytes per token position of one sequence, all layers (what MLARunner allocates)."""
    config = model.config
    itemsize = model.model.embed_tokens.weight.element_size()
    return (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * itemsize


def _norm(module: torch.nn.Module) -> tuple[torch.Tensor, float]:
    return module.weight.detach(), float(module.variance_epsilon)


def _act(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """SiLU (every DeepSeek config) without the nn.Module call overhead; anything else via HF's module."""
    silu = type(module).__name__ == "SiLUActivation" or isinstance(module, torch.nn.SiLU)
    return F.silu if silu else module


def _linear(module: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return module.weight.detach(), None if module.bias is None else module.bias.detach()


class _Rope:
    """RoPE from a [max_context, rope_dim / 2] table built like HF's rotary module (its inv_freq and scaling).

    DeepSeek's checkpoints pair dims (0,1), (2,3), ... (`rope_interleave`, the default); Llama-style
    pairs i and i + rope_dim / 2. HF's interleaved variant writes the rotated pairs out half-split, so
    both are `cat(x1 c - x2 s, x2 c + x1 s)` and differ only in how x1 and x2 are taken.
    """

    def __init__(self, rotary: torch.nn.Module, interleave: bool, length: int, dtype: torch.dtype) -> None:
        inv_freq = rotary.inv_freq.detach().float()  # [R/2]
        positions = torch.arange(length, device=inv_freq.device, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [T, R/2]
        scaling = float(getattr(rotary, "attention_scaling", 1.0))  # YaRN's attention factor, 1 otherwise
        self.cos = (freqs.cos() * scaling).to(dtype)
        self.sin = (freqs.sin() * scaling).to(dtype)
        self.interleave = interleave

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of positions [N]: [N, R/2] each."""
        return self.cos[positions], self.sin[positions]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [N, ..., R] with cos, sin broadcastable to [N, ..., R/2] -> RoPE'd x, half-split layout."""
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class _Attention:
    """One layer's MLA weights, kv_b_proj split into W_UK and W_UV for absorption."""

    def __init__(self, attn: torch.nn.Module, config: object) -> None:
        self.heads = config.num_attention_heads
        self.rank, self.nope, self.rope = config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim
        self.scale = float(attn.scaling)  # HF's qk_head_dim ** -0.5, times YaRN's mscale_all_dim factor squared
        self.q_proj = _linear(attn.q_proj) if attn.q_proj is not None else None
        self.q_a = _linear(attn.q_a_proj) if attn.q_a_proj is not None else None
        self.q_a_norm = _norm(attn.q_a_layernorm) if attn.q_a_layernorm is not None else None
        self.q_b = _linear(attn.q_b_proj) if attn.q_b_proj is not None else None
        self.kv_a = _linear(attn.kv_a_proj_with_mqa)
        self.kv_a_norm = _norm(attn.kv_a_layernorm)
        kv_b = attn.kv_b_proj.weight.detach().view(self.heads, self.nope + config.v_head_dim, self.rank)
        self.w_uk = kv_b[:, : self.nope].contiguous()  # [H, Dn, C]
        self.w_uv = kv_b[:, self.nope :].transpose(1, 2).contiguous()  # [H, C, Dv]
        self.o = _linear(attn.o_proj)

    def query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, D] normalised -> q_nope [N, H, Dn], q_pe [N, H, R] (before RoPE)."""
        if self.q_proj is not None:
            q = F.linear(x, *self.q_proj)
        else:
            q = F.linear(rms_norm(F.linear(x, *self.q_a), *self.q_a_norm), *self.q_b)
        q = q.view(x.shape[0], self.heads, self.nope + self.rope)  # [N, H, Dn + R]
        return q[..., : self.nope], q[..., self.nope :]

    def latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, D] normalised -> normalised c_kv [N, C] and k_pe [N, R] (before RoPE)."""
        kv = F.linear(x, *self.kv_a)  # [N, C + R]
        return rms_norm(kv[:, : self.rank], *self.kv_a_norm), kv[:, self.rank :]

    def absorb_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """q_nope [N, H, Dn], RoPE'd q_pe [N, H, R] -> latent-space queries [N, H, C + R]."""
        q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [N, H, C]
        return torch.cat((q_lat, q_pe), dim=-1)

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """Attended latents [N, H, C] -> W_UV per head, then o_proj: [N, D]."""
        v = torch.bmm(attended.transpose(0, 1), self.w_uv).transpose(0, 1)  # [N, H, Dv]
        return F.linear(v.reshape(attended.shape[0], -1), *self.o)


class _MLP:
    """SwiGLU MLP: the dense layers and the shared experts."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        self.gate = mlp.gate_proj.weight.detach()  # [I, D]
        self.up = mlp.up_proj.weight.detach()  # [I, D]
        self.down = mlp.down_proj.weight.detach()  # [D, I]
        self.act = _act(mlp.act_fn)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] -> [N, D]."""
        return F.linear(self.act(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)


class _MoE:
    """Routed experts (group-limited sigmoid top-k) plus shared experts."""

    def __init__(self, moe: torch.nn.Module, config: object) -> None:
        self.router = moe.gate.weight.detach().float()  # [E, D]; HF routes in float32
        self.bias = moe.gate.e_score_correction_bias.detach().float()  # [E]: selection only
        self.top_k, self.groups, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = bool(config.norm_topk_prob), float(config.routed_scaling_factor)
        self.gate_up = moe.experts.gate_up_proj.detach()  # [E, 2I, D]: gate rows, then up rows
        self.down = moe.experts.down_proj.detach()  # [E, D, I]
        self.act = _act(moe.experts.act_fn)
        self.shared = _MLP(moe.shared_experts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, D] -> float32 weights [N, K] and expert ids [N, K], as DeepSeek-V3 routes."""
        scores = F.linear(x.float(), self.router).sigmoid()  # [N, E]
        choice = scores + self.bias  # the bias balances load: it picks experts but never weighs them
        if self.topk_group < self.groups:  # keep the experts of the topk_group best groups
            grouped = choice.view(x.shape[0], self.groups, -1)  # [N, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]: each group's best two
            best = group_scores.topk(self.topk_group, dim=-1).indices  # [N, topk_group]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        experts = choice.topk(self.top_k, dim=-1).indices  # [N, K]
        weights = scores.gather(1, experts)  # [N, K]
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, experts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] -> routed + shared expert outputs [N, D]."""
        weights, experts = self.route(x)  # [N, K] each
        flat = experts.view(-1)  # [N*K]
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert
        token = order // self.top_k  # [N*K]: the token of each sorted pair
        counts = torch.bincount(flat, minlength=self.gate_up.shape[0]).tolist()  # one host sync per layer
        inputs = x[token]  # [N*K, D]
        outputs = torch.empty_like(inputs)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                gate, up = F.linear(inputs[rows], self.gate_up[expert]).chunk(2, dim=-1)  # [n, I] each
                outputs[rows] = F.linear(self.act(gate) * up, self.down[expert])
                start += count
        weighted = (outputs * weights.view(-1)[order, None]).to(x.dtype)  # [N*K, D]
        routed = torch.zeros_like(x).index_add_(0, token, weighted)
        return routed + self.shared(x)


class _Layer:
    """One decoder layer: MLA, then a dense MLP (the first `first_k_dense_replace` layers) or the MoE."""

    def __init__(self, layer: torch.nn.Module, config: object) -> None:
        self.attn = _Attention(layer.self_attn, config)
        self.mlp = _MoE(layer.mlp, config) if hasattr(layer.mlp, "experts") else _MLP(layer.mlp)
        self.norm1, self.norm2 = _norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)


@dataclass
class _Prefill:
    """A prefill chunk's share of a step, shared by all layers."""

    tokens: slice  # its rows of the flat batch
    rows: torch.Tensor  # [T] long: cache rows of its context 0..T-1
    mask: torch.Tensor  # [S * H, T] bool: causal, one row per (token, head)


class MLARunner:
    """DeepSeek-V3 over a paged latent cache `[layers, num_blocks * block_size, kv_lora_rank + rope_dim]`.

    The engine calls `forward` once per step with a flat `StepBatch`; projections, norms and the MoE
    run over all its tokens at once, attention per sequence (decodes batched) over the latent cache.
    Attention reads the cache only through the block tables, so sequences may share blocks (prefix caching).
    """

    shares_blocks = True

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, max_context: int) -> None:
        problem = mla_problem(model, max_context)
        if problem:
            raise CrosschipError(f"MLARunner cannot run this model: {problem}", _FIX)
        if num_blocks < 1 or block_size < 1:
            raise CrosschipError(f"a KV cache needs >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        config = model.config
        self.num_blocks, self.block_size, self.max_context = num_blocks, block_size, max_context
        self.vocab_size = int(config.vocab_size)
        self.embed = model.model.embed_tokens.weight.detach()  # [V, D]
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self.heads = config.num_attention_heads
        self.rank = config.kv_lora_rank
        self.layers = [_Layer(layer, config) for layer in model.model.layers]
        self.norm = _norm(model.model.norm)
        self.lm_head = model.lm_head.weight.detach()  # [V, D]
        self.rope = _Rope(model.model.rotary_emb, bool(config.rope_interleave), max_context, self.dtype)
        width = config.kv_lora_rank + config.qk_rope_head_dim
        self.kv_cache = torch.zeros(
            len(self.layers), num_blocks * block_size, width, dtype=self.dtype, device=self.device
        )  # [L, rows, C + R]: normalised c_kv, then RoPE'd k_pe
        self.kv_bytes_per_token = mla_kv_bytes_per_token(model)

    def free(self, key: int) -> None:
        """Nothing to free: the cache holds no per-sequence state beyond the engine's block tables."""

    def _prefills(self, batch: StepBatch) -> list[_Prefill]:
        """Cache rows and causal masks of each prefill chunk, built once per step for all layers."""
        plans = []
        for chunk in batch.prefills:
            size = chunk.hi - chunk.lo
            mask = chunk.mask[:, None].expand(-1, self.heads, -1).reshape(size * self.heads, -1)  # [S*H, T]
            plans.append(_Prefill(slice(chunk.lo, chunk.hi), chunk.rows, mask))
        return plans

    def _attend(
        self, q: torch.Tensor, cache: torch.Tensor, batch: StepBatch, prefills: list[_Prefill], scale: float
    ) -> torch.Tensor:
        """Latent queries q [N, H, C + R] over one layer's cache [rows, C + R] -> attended latents [N, H, C].

        Every head shares one key/value row per position (MQA), so heads fold into query rows. The
        value is the cached row itself (its first C entries are c_kv): one gather serves as K and V.
        """
        out = q.new_empty(q.shape[0], self.heads, self.rank)  # [N, H, C]
        decodes = batch.num_decodes
        if decodes:
            kv = cache[batch.decode_rows][:, None]  # [D, 1, T, C + R]
            attended = F.scaled_dot_product_attention(
                q[:decodes, None], kv, kv, attn_mask=batch.decode_mask, scale=scale
            )  # [D, 1, H, C + R]
            out[:decodes] = attended[:, 0, :, : self.rank]
        for plan in prefills:
            kv = cache[plan.rows][None]  # [1, T, C + R]
            chunk = q[plan.tokens]  # [S, H, C + R]
            attended = F.scaled_dot_product_attention(
                chunk.reshape(1, -1, chunk.shape[-1]), kv, kv, attn_mask=plan.mask, scale=scale
            )  # [1, S*H, C + R]
            out[plan.tokens] = attended.view(chunk.shape)[..., : self.rank]
        return out

    def _attention(
        self,
        layer: _Layer,
        x: torch.Tensor,
        cache: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: StepBatch,
        prefills: list[_Prefill],
    ) -> torch.Tensor:
        """x: [N, D] normalised -> attention output [N, D]; first writes the step's latents to `cache`."""
        attn, (cos, sin) = layer.attn, rope  # cos, sin: [N, R/2]
        c_kv, k_pe = attn.latent(x)  # [N, C], [N, R]
        cache[batch.slot_mapping] = torch.cat((c_kv, self.rope.apply(k_pe, cos, sin)), dim=-1)
        q_nope, q_pe = attn.query(x)  # [N, H, Dn], [N, H, R]
        q = attn.absorb_query(q_nope, self.rope.apply(q_pe, cos[:, None], sin[:, None]))  # [N, H, C + R]
        return attn.output(self._attend(q, cache, batch, prefills, attn.scale))

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Run one step: float32 logits [R, V] for batch.logits_rows, in that order."""
        longest = max(batch.context_lens)
        if longest > self.max_context:
            raise CrosschipError(
                f"a sequence reaches {longest} positions, beyond max_context {self.max_context}",
                "raise max_context or shorten the request",
            )
        prefills = self._prefills(batch)
        rope = self.rope.tables(batch.positions)  # [N, R/2] each
        x = F.embedding(batch.tokens, self.embed)  # [N, D]
        for i, layer in enumerate(self.layers):
            x = x + self._attention(layer, rms_norm(x, *layer.norm1), self.kv_cache[i], rope, batch, prefills)
            x = x + layer.mlp(rms_norm(x, *layer.norm2))
        x = rms_norm(x[batch.logits_rows], *self.norm)  # [R, D]
        return F.linear(x, self.lm_head).float()  # [R, V]
