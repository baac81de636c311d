"""Memory check: weights + KV cache for batch x context + a stated reserve, against memory x devices.

The model (every figure is in the JSON details):

- weights: the stored bytes of every tensor a server loads (formats.Inventory.weight_bytes: the
  safetensors headers, or convert's plan for a config-only directory); DeepSeek multi-token-
  prediction layers are left out (vLLM loads them only as a speculative-decoding draft).
- KV cache per token and sequence, in the target's serving float dtype (2 bytes; 4 on cpu):
    standard / grouped-query attention: 2 * layers * num_key_value_heads * head_dim * bytes;
    multi-head latent attention (DeepSeek-V2/V3, `kv_lora_rank` in the config):
      layers * (kv_lora_rank + qk_rope_head_dim) * bytes -- the compressed latent plus the decoupled
      RoPE key, the single per-token entry vLLM's MLA backends cache (vllm/v1/attention/backends/mla/
      common.py: "a single latent vector to represent the per-token entry of the KV cache",
      head size 576 = 512 + 64 for DeepSeek-V3); vllm-ascend caches the same latent.
  Sliding-window and linear-attention layers are counted as full attention (an upper bound).
- reserve per device: RESERVE_FRACTION of its memory (vLLM's default gpu_memory_utilization 0.9
  leaves 10% unused) + RUNTIME_RESERVE_GIB for the CUDA / CANN context, communication buffers and
  the activations of one forward pass.
- devices: tensor parallel over N devices, weights split evenly; KV heads split across devices
  but never below one per device (vLLM replicates KV heads when N > num_key_value_heads), and the
  MLA latent, which has a single head, replicated on every device.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from crosschip.check.formats import Inventory, gib
from crosschip.check.result import CheckResult
from crosschip.errors import CrosschipError
from crosschip.targets import TargetProfile

RESERVE_FRACTION = 0.10
RUNTIME_RESERVE_GIB = 1.0
DEFAULT_CONTEXT_CAP = 32768  # default --context: the config's max_position_embeddings, capped here
FALLBACK_CONTEXT = 4096  # default --context when the config names no max_position_embeddings
MAX_DEVICES = 4096  # search bound for the minimum device count


@dataclass(frozen=True)
class KvLayout:
    """What one token of one sequence puts in the KV cache, summed over layers."""

    kind: str  # "mla" or "mha" (standard / grouped-query)
    layers: int
    kv_heads: int  # 1 for MLA: the latent is shared by every head
    width: int  # elements per layer per KV head: head_dim for mha (x2 for K and V), rank + rope for mla

    def bytes_per_token(self, dtype_bytes: int, devices: int = 1) -> int:
        """KV bytes per token per sequence held by ONE of `devices` tensor-parallel devices."""
        if self.kind == "mla":
            return self.layers * self.width * dtype_bytes  # replicated on every device
        heads = max(1, math.ceil(self.kv_heads / devices))
        return 2 * self.layers * heads * self.width * dtype_bytes


def _int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or value < 1:
        raise CrosschipError(f"config.json has no usable {key!r} ({value!r})", "check a complete model config")
    return value


def kv_layout(config: dict[str, Any]) -> KvLayout:
    """The KV-cache layout of a config: MLA when it has kv_lora_rank, else (grouped-query) multi-head."""
    layers = _int(config, "num_hidden_layers")
    if config.get("kv_lora_rank"):
        return KvLayout("mla", layers, 1, _int(config, "kv_lora_rank") + int(config.get("qk_rope_head_dim") or 0))
    heads = _int(config, "num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or _int(config, "hidden_size") // heads
    return KvLayout("mha", layers, int(kv_heads), int(head_dim))


def default_context(config: dict[str, Any]) -> int:
    """--context when none is given: max_position_embeddings capped at DEFAULT_CONTEXT_CAP."""
    max_pos = config.get("max_position_embeddings")
    return min(max_pos, DEFAULT_CONTEXT_CAP) if isinstance(max_pos, int) and max_pos > 0 else FALLBACK_CONTEXT


@dataclass(frozen=True)
class MemoryPlan:
    """Per-device budget of serving one checkpoint on `devices` devices (all figures in bytes)."""

    device_bytes: int
    devices: int
    batch: int
    context: int
    weights_bytes: int
    kv_bytes_per_token: int  # per sequence, all layers, one device's share at `devices`
    reserve_per_device: int
    usable_per_device: int  # device_bytes - reserve
    need_per_device: int  # weights / devices + KV for batch x context
    fits: bool
    min_devices: int | None  # None: no device count up to MAX_DEVICES fits
    max_context: int  # longest context at `batch` that fits on `devices` (0: not even the weights fit)

    @property
    def kv_bytes(self) -> int:
        return self.batch * self.context * self.kv_bytes_per_token


def _need(weights: int, layout: KvLayout, dtype_bytes: int, devices: int, batch: int, context: int) -> int:
    return math.ceil(weights / devices) + batch * context * layout.bytes_per_token(dtype_bytes, devices)


def plan_memory(
    weights_bytes: int, layout: KvLayout, dtype_bytes: int, device_bytes: int, devices: int, batch: int, context: int
) -> MemoryPlan:
    """Fit weights + KV + reserve on `devices` devices; the minimum device count and the longest context."""
    reserve = int(RESERVE_FRACTION * device_bytes + RUNTIME_RESERVE_GIB * 2**30)
    usable = device_bytes - reserve
    need = _need(weights_bytes, layout, dtype_bytes, devices, batch, context)
    min_devices = next(
        (n for n in range(1, MAX_DEVICES + 1)
         if _need(weights_bytes, layout, dtype_bytes, n, batch, context) <= usable),
        None,
    )
    per_token = layout.bytes_per_token(dtype_bytes, devices)
    room = usable - math.ceil(weights_bytes / devices)
    max_context = max(0, room // (batch * per_token)) if per_token else 0
    return MemoryPlan(device_bytes, devices, batch, context, weights_bytes, per_token, reserve, usable, need,
                      need <= usable, min_devices, int(max_context))


def device_memory_bytes(profile: TargetProfile) -> tuple[int, str]:
    """Memory of one device of the target, and where the figure comes from (cpu: this host's RAM)."""
    if profile.memory_per_device_gib:
        return int(profile.memory_per_device_gib * 2**30), f"{profile.memory_per_device_gib:g} GiB per device (profile)"
    total = int(psutil.virtual_memory().total)
    return total, f"{gib(total)} host memory (this machine)"


_FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def served_weight_bytes(inv: Inventory, profile: TargetProfile) -> tuple[int, str]:
    """Weight bytes as the target will hold them, and what they are: the stored bytes when the target runs
    the stored format, else the size after `crosschip convert --target` to its default float format
    (quantized codes dequantized, scales dropped, tensors every format keeps in fp32 kept)."""
    from crosschip.check.formats import runnable
    from crosschip.formats.policy import keep_fp32

    fmt = profile.default_serving_format
    if runnable(inv, profile) or fmt not in _FLOAT_BYTES:
        return inv.weight_bytes(), f"{inv.fmt} as stored"
    total = 0
    for t in inv.serving_tensors():
        if t.role == "quantized":  # int8-w8a16 packs 4 codes per int32
            total += t.numel * (4 if t.name.endswith(".weight_packed") else 1) * _FLOAT_BYTES[fmt]
        elif t.role == "float":
            total += t.numel * _FLOAT_BYTES[fmt]
        elif keep_fp32(t.name) or t.role == "other":
            total += t.nbytes
    return total, f"as converted to {fmt} (the stored {inv.fmt} cannot run on {profile.name})"


def _kv_dtype_bytes(profile: TargetProfile) -> int:
    from crosschip.verify.emulate import serving_float_dtype

    return serving_float_dtype(profile.name).itemsize


def _summary(p: MemoryPlan, layout: KvLayout, dtype_bytes: int) -> str:
    kv_kind = "MLA latent" if layout.kind == "mla" else f"{layout.kv_heads} KV heads"
    return (
        f"per device: weights {gib(math.ceil(p.weights_bytes / p.devices))} + KV {gib(p.kv_bytes)} "
        f"(batch {p.batch} x context {p.context}, {p.kv_bytes_per_token:,} B/token, {kv_kind}, {dtype_bytes}-byte) "
        f"= {gib(p.need_per_device)} of {gib(p.usable_per_device)} usable "
        f"({gib(p.device_bytes)} - reserve {gib(p.reserve_per_device)}) on each of {p.devices} device(s)"
    )


def check_memory(inv: Inventory, profile: TargetProfile, *, devices: int, batch: int, context: int) -> CheckResult:
    """FAIL when weights + KV + reserve do not fit `devices` devices; names the minimum count and longest context."""
    layout = kv_layout(inv.config)
    dtype_bytes = _kv_dtype_bytes(profile)
    device_bytes, memory_source = device_memory_bytes(profile)
    weights, basis = served_weight_bytes(inv, profile)
    plan = plan_memory(weights, layout, dtype_bytes, device_bytes, devices, batch, context)
    max_pos = inv.config.get("max_position_embeddings")
    details: dict[str, Any] = {
        **asdict(plan), "kv_bytes": plan.kv_bytes, "kv_layout": asdict(layout), "kv_dtype_bytes": dtype_bytes,
        "memory_source": memory_source, "reserve_rule": f"{RESERVE_FRACTION:.0%} of device memory + "
        f"{RUNTIME_RESERVE_GIB:g} GiB", "parallelism": "tensor parallel, weights split evenly",
        "max_position_embeddings": max_pos, "weights_basis": basis,
    }
    summary = f"weights {gib(weights)} total, {basis}; " + _summary(plan, layout, dtype_bytes)
    longest = f"longest context at batch {batch} on {devices} device(s): {plan.max_context:,} tokens"
    if isinstance(max_pos, int) and plan.max_context >= max_pos:
        longest = (f"longest context at batch {batch} on {devices} device(s): the model's max {max_pos:,} "
                   f"(memory allows {plan.max_context:,})")
    elif isinstance(max_pos, int):
        longest += f" (model max {max_pos:,})"
    if not plan.fits:
        need = (f"needs at least {plan.min_devices} devices" if plan.min_devices
                else f"does not fit on any number of devices up to {MAX_DEVICES}")
        fix = _memory_fix(inv, profile, plan)
        return CheckResult("memory", "FAIL", f"does not fit: {summary}; {need}; {longest}", fix, details)
    reason = f"fits: {summary}; minimum devices {plan.min_devices}; {longest}"
    if isinstance(max_pos, int) and context > max_pos:
        return CheckResult("memory", "WARN", f"{reason}; but --context {context:,} exceeds the model's "
                           f"max_position_embeddings {max_pos:,}", f"use --context {max_pos}", details)
    return CheckResult("memory", "PASS", reason, None, details)


def _memory_fix(inv: Inventory, profile: TargetProfile, plan: MemoryPlan) -> str:
    options = []
    if plan.min_devices:
        options.append(f"book {plan.min_devices} devices (--devices {plan.min_devices})")
    if plan.max_context > 0:
        options.append(f"serve a shorter context (--context {plan.max_context})")
    if inv.fmt != "int8-w8a8-dynamic" and profile.can_serve("int8-w8a8-dynamic"):
        layout = " --layout ascend" if profile.device_type == "npu" else ""
        src, dst = shlex.quote(str(inv.root)), shlex.quote(f"{inv.root}-int8")
        options.append(f"quantize: `crosschip convert {src} {dst} --target {profile.name} --to int8-w8a8-dynamic"
                       f"{layout}` (1 byte per weight; lossy)")
    return "; or ".join(options) or "use a target with more memory per device"
