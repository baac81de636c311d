"""Formats check: every stored tensor's dtype against what the target computes; and the tensor inventory.

The inventory lists each stored tensor's name, dtype and byte size without reading tensor data:
from the safetensors headers of a real checkpoint, or -- for a directory that holds only
config.json -- from the model's tensor shapes plus convert's plan for the config's format (exactly
the tensors `crosschip convert` would write: FP8 weights of 1 byte + one fp32 scale per 128x128
block for every Linear in a decoder layer, bf16 embeddings, norms, lm_head and router, as DeepSeek
ships them). The shapes come in closed form for Llama, Qwen2 and DeepSeek-V3 configs (checked
against the meta-device model in tests) and from transformers' model built on the meta device for
every other model type, so a 600B-parameter config is sized in about a second.
"""

from __future__ import annotations

import functools
import json
import math
import shlex
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crosschip.check.result import CheckResult
from crosschip.errors import CrosschipError
from crosschip.formats.layouts import stored_specs
from crosschip.formats.policy import keep_fp32
from crosschip.targets import SERVING_FORMATS, Stack, TargetProfile

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
    torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2", torch.int64: "int64", torch.int32: "int32",
    torch.int16: "int16", torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool",
}
FLOAT_DTYPES = ("fp32", "bf16", "fp16")
# Companions of quantized weights (scales, offsets, shapes): read by the loader, never a matmul operand.
_AUX_SUFFIXES = ("_scale_inv", ".weight_scale", ".weight_offset", ".weight_shape", ".input_scale",
                 ".input_offset", ".deq_scale", ".quant_bias")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# crosschip.checkpoint.SINGLE_NAME / INDEX_NAME, spelled out: importing crosschip.checkpoint pulls in
# transformers' modeling code (~3 s), which a config-only check does not need.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_EXAMPLES = 3


def gib(nbytes: float) -> str:
    """Bytes in binary units, 2 decimals: '14.96 GiB', '3.50 MiB', '0.25 KiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:,.2f} {unit}"
    return f"{nbytes / 2**10:,.2f} KiB"


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as stored: name, dtype name (DTYPE_NAMES), element count, bytes and shape."""

    name: str
    dtype: str
    numel: int
    nbytes: int
    shape: tuple[int, ...] = ()

    @functools.cached_property
    def role(self) -> str:
        """'quantized' (fp8 / int8 codes), 'float' (a weight served in its float dtype), 'aux' (scales,
        offsets, and tensors every format keeps in fp32) or 'other' (integer metadata). Cached: a 600B
        checkpoint has ~90k tensors and every check groups them."""
        if self.name.endswith(_AUX_SUFFIXES) or keep_fp32(self.name):
            return "aux"
        if self.name.endswith(".weight_packed") or self.dtype in ("fp8_e4m3", "fp8_e5m2", "int8"):
            return "quantized"
        return "float" if self.dtype in FLOAT_DTYPES else "other"

    @property
    def compute_dtype(self) -> str:
        """The matmul dtype (crosschip.targets.DTYPES) the target needs for this tensor."""
        if self.role == "quantized":
            return "fp8_e4m3" if self.dtype.startswith("fp8") else "int8"
        return self.dtype


@dataclass
class Inventory:
    """What a checkpoint stores (or, config-only, would store) and in which format."""

    root: Path
    config: dict[str, Any]
    fmt: str  # crosschip format name (layouts.FORMATS)
    layout: str
    tensors: list[StoredTensor]
    config_only: bool

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures")
        return str(archs[0]) if isinstance(archs, list) and archs else None

    def serving_tensors(self) -> list[StoredTensor]:
        """Tensors a server loads: all but DeepSeek multi-token-prediction layers (index >= num_hidden_layers),
        which vLLM loads only as a speculative-decoding draft model."""
        from crosschip.formats.policy import is_mtp_layer

        return [t for t in self.tensors if not is_mtp_layer(t.name, self.config)]

    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.serving_tensors())


# ------------------------------------------------------------------------------------ inventory


def _read_config(root: Path) -> dict[str, Any]:
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CrosschipError(f"{root}/config.json cannot be read ({e})", "restore config.json") from e
    if not isinstance(config, dict):
        raise CrosschipError(f"{root}/config.json is not a JSON object", "restore config.json")
    return config


def _has_weights(root: Path) -> bool:
    if any((root / name).is_file() for name in _WEIGHT_FILES):
        return True
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CrosschipError(
            f"{root} holds {pickles[0]} but no safetensors weights; crosschip never unpickles weights",
            "convert the weights to safetensors first, or check a directory with only config.json",
        )
    return False


def load_inventory(path: Path) -> Inventory:
    """The inventory of a checkpoint directory; config-only when it has config.json and no weight files."""
    path = Path(path)
    if (path / "config.json").is_file() and not _has_weights(path):
        return config_inventory(path, _read_config(path))  # before importing crosschip.checkpoint: speed
    from crosschip.checkpoint import read_manifest, resolve_checkpoint_dir
    from crosschip.formats.layouts import QUANT_DESCRIPTION_NAME, detect_format

    root = resolve_checkpoint_dir(path)
    config = _read_config(root)
    desc_path = root / QUANT_DESCRIPTION_NAME
    try:
        description = json.loads(desc_path.read_text(encoding="utf-8")) if desc_path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CrosschipError(f"{desc_path} cannot be read ({e})", "restore it from the original checkpoint") from e
    fmt, layout = detect_format(config, description)
    read_manifest(root)  # a corrupt crosschip.json is a usage error here too
    return Inventory(root, config, fmt, layout, header_tensors(root), config_only=False)


def header_tensors(root: Path) -> list[StoredTensor]:
    """Every stored tensor's name, dtype and size from the safetensors headers (no tensor data is read)."""
    from crosschip.checkpoint import weight_files
    from crosschip.convert.stream import scan_file

    files = sorted(set(weight_files(root).values()))
    return [
        StoredTensor(i.name, DTYPE_NAMES.get(i.dtype, str(i.dtype)), math.prod(i.shape), i.nbytes, tuple(i.shape))
        for f in files
        for i in scan_file(root, f)
    ]


def read_config(root: Path) -> Any:
    """root/config.json as transformers' config class (quantization_config dropped: sizing and building only)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CrosschipError(f"{root}/config.json is not a config transformers knows ({e})",
                             "check a Hugging Face causal LM config") from e
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the plan decides what is quantized; no quantizer may touch the build
    return cfg


def meta_model(cfg: Any, attention: str | None = None) -> torch.nn.Module:
    """The model of `cfg` with every parameter on the meta device (no memory, no init).

    `attention` set: built with that attention implementation, so a class that refuses it raises here as
    `from_pretrained` would (transformers checks it in `PreTrainedModel.__init__`).
    """
    from crosschip.models import model_class

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    cls = model_class(cfg)
    if attention is not None:
        cfg._attn_implementation = attention
    # The class directly, not from_config: same modules, ~20x faster (no weight-init bookkeeping).
    with torch.device("meta"), no_init_weights():
        model = cls(cfg)
    model.tie_weights()  # no_init_weights also skips tying; a tied lm_head is not stored
    return model


def meta_shapes(root: Path) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes of root/config.json's model, built on the meta device."""
    model = meta_model(read_config(root))
    stored = set(model.state_dict())  # persistent buffers (e.g. DeepSeek's e_score_correction_bias) are stored
    named = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in stored)]
    return checkpoint_shapes(named)


def checkpoint_shapes(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, tuple[int, ...]]:
    """Parameter names/shapes as a checkpoint stores them: transformers' fused 3-D expert tensors
    (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) split per expert into the
    `experts.N.gate_proj.weight` [I, H] / `up_proj` / `down_proj` [H, I] that DeepSeek releases carry."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, param in named:
        shape = tuple(int(s) for s in param.shape)
        prefix, _, leaf = name.rpartition(".")
        if len(shape) != 3 or not prefix.endswith("experts"):
            shapes[name] = shape
            continue
        for e in range(shape[0]):
            if leaf == "gate_up_proj":
                half = (shape[1] // 2, shape[2])
                shapes[f"{prefix}.{e}.gate_proj.weight"] = half
                shapes[f"{prefix}.{e}.up_proj.weight"] = half
            else:
                shapes[f"{prefix}.{e}.{leaf}.weight"] = shape[1:]
    return shapes


def _config_float_dtype(config: dict[str, Any]) -> torch.dtype | None:
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    return names.get(str(config.get("dtype") or config.get("torch_dtype")))


class _Unsized(Exception):
    """The config lacks a field the closed-form shapes need: size it on the meta device instead."""


def _req(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _Unsized(key)
    return value


def _mlp(shapes: dict[str, tuple[int, ...]], prefix: str, h: int, inter: int, bias: bool = False) -> None:
    for name, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
        shapes[f"{prefix}.{name}.weight"] = shape
        if bias:
            shapes[f"{prefix}.{name}.bias"] = (shape[0],)


def _dense_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """LlamaForCausalLM / Qwen2ForCausalLM tensors (transformers' modeling_llama / modeling_qwen2)."""
    h, vocab, heads = _req(config, "hidden_size"), _req(config, "vocab_size"), _req(config, "num_attention_heads")
    kv_heads, head_dim = config.get("num_key_value_heads") or heads, config.get("head_dim") or h // heads
    qwen2 = config.get("model_type") == "qwen2"  # q/k/v always biased, o never
    bias = bool(config.get("attention_bias", False))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(_req(config, "num_hidden_layers")):
        p = f"model.layers.{i}"
        projections = {"q_proj": (heads * head_dim, h), "k_proj": (kv_heads * head_dim, h),
                       "v_proj": (kv_heads * head_dim, h), "o_proj": (h, heads * head_dim)}
        for name, shape in projections.items():
            shapes[f"{p}.self_attn.{name}.weight"] = shape
            if (qwen2 and name != "o_proj") or (not qwen2 and bias):
                shapes[f"{p}.self_attn.{name}.bias"] = (shape[0],)
        _mlp(shapes, f"{p}.mlp", h, _req(config, "intermediate_size"), not qwen2 and bool(config.get("mlp_bias")))
        shapes[f"{p}.input_layernorm.weight"] = shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
    return _head(shapes, config, h, vocab)


def _head(shapes: dict[str, tuple[int, ...]], config: dict[str, Any], h: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def _mla_shapes(config: dict[str, Any], p: str, h: int, heads: int) -> dict[str, tuple[int, ...]]:
    """DeepSeek-V3 multi-head latent attention tensors of one layer (modeling_deepseek_v3 DeepseekV3Attention)."""
    if "q_lora_rank" not in config:
        raise _Unsized("q_lora_rank")
    rope, nope, v_dim = (_req(config, k) for k in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"))
    rank, q_rank, bias = _req(config, "kv_lora_rank"), config["q_lora_rank"], bool(config.get("attention_bias"))
    a = f"{p}.self_attn"
    shapes: dict[str, tuple[int, ...]] = {}
    if q_rank:
        shapes |= {f"{a}.q_a_proj.weight": (q_rank, h), f"{a}.q_a_layernorm.weight": (q_rank,),
                   f"{a}.q_b_proj.weight": (heads * (nope + rope), q_rank)}
    else:
        shapes[f"{a}.q_proj.weight"] = (heads * (nope + rope), h)
    shapes |= {f"{a}.kv_a_proj_with_mqa.weight": (rank + rope, h), f"{a}.kv_a_layernorm.weight": (rank,),
               f"{a}.kv_b_proj.weight": (heads * (nope + v_dim), rank), f"{a}.o_proj.weight": (h, heads * v_dim)}
    if bias:
        biased = [n for n in ("q_a_proj", "kv_a_proj_with_mqa", "o_proj") if f"{a}.{n}.weight" in shapes]
        shapes |= {f"{a}.{n}.bias": (shapes[f"{a}.{n}.weight"][0],) for n in biased}
    return shapes


def _deepseek_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """DeepseekV3ForCausalLM tensors as the DeepSeek-V3 release names them (per-expert MLPs; MTP layers,
    which transformers does not build, are not included)."""
    h, vocab, heads = _req(config, "hidden_size"), _req(config, "vocab_size"), _req(config, "num_attention_heads")
    experts, moe_inter = _req(config, "n_routed_experts"), _req(config, "moe_intermediate_size")
    shared, dense = _req(config, "n_shared_experts"), config.get("first_k_dense_replace")
    if not isinstance(dense, int):
        raise _Unsized("first_k_dense_replace")
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(_req(config, "num_hidden_layers")):
        p = f"model.layers.{i}"
        shapes |= _mla_shapes(config, p, h, heads)
        if i < dense:
            _mlp(shapes, f"{p}.mlp", h, _req(config, "intermediate_size"))
        else:
            for e in range(experts):
                _mlp(shapes, f"{p}.mlp.experts.{e}", h, moe_inter)
            _mlp(shapes, f"{p}.mlp.shared_experts", h, moe_inter * shared)
            shapes |= {f"{p}.mlp.gate.weight": (experts, h), f"{p}.mlp.gate.e_score_correction_bias": (experts,)}
        shapes[f"{p}.input_layernorm.weight"] = shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
    return _head(shapes, config, h, vocab)


# model_type -> closed-form tensor shapes; other model types are built on the meta device. Closed form
# because importing transformers' modeling code alone takes ~3 s, the whole budget of a config-only check
# (tests/check/test_check_memory.py checks both give the same tensors).
CLOSED_FORM = {"llama": _dense_shapes, "qwen2": _dense_shapes, "deepseek_v3": _deepseek_shapes}


def config_shapes(root: Path, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes of a config: closed form for CLOSED_FORM, else the meta model."""
    shapes_of = CLOSED_FORM.get(str(config.get("model_type")))
    if shapes_of is not None:
        try:
            return shapes_of(config)
        except _Unsized:
            pass  # an unusual config: let transformers apply its defaults
    return meta_shapes(root)


def config_inventory(root: Path, config: dict[str, Any]) -> Inventory:
    """Tensors a checkpoint of this config stores in the config's format (convert's plan for that format)."""
    from crosschip.formats import layouts

    fmt, layout = layouts.detect_format(config)
    shapes = config_shapes(root, config)
    hp = _config_float_dtype(config) if fmt in layouts.QUANTIZED_FORMATS else None
    dtype = layouts.resolve_dtype(fmt, hp)
    plan = layouts.make_plan(fmt, layout, shapes, config)
    tensors = [
        StoredTensor(out, DTYPE_NAMES[dt], math.prod(shp), math.prod(shp) * dt.itemsize, tuple(shp))
        for name, shape in shapes.items()
        for out, dt, shp in stored_specs(plan, name, shape, dtype)
    ]
    return Inventory(root, config, fmt, plan.layout, tensors, config_only=True)


# ------------------------------------------------------------------------------------ the check


def _group(tensors: Iterable[StoredTensor], role: str) -> dict[str, list[StoredTensor]]:
    groups: dict[str, list[StoredTensor]] = defaultdict(list)
    for t in tensors:
        if t.role == role:
            groups[t.dtype].append(t)
    return dict(groups)


def _describe(dtype: str, tensors: list[StoredTensor]) -> str:
    examples = ", ".join(t.name for t in tensors[:_EXAMPLES])
    more = ", ..." if len(tensors) > _EXAMPLES else ""
    return f"{len(tensors)} {dtype} tensors ({gib(sum(t.nbytes for t in tensors))}, e.g. {examples}{more})"


def convert_fix(profile: TargetProfile, ckpt_arg: str) -> str:
    """The convert command that makes a checkpoint runnable on `profile`, with its caveats."""
    out = shlex.quote(f"{ckpt_arg.rstrip('/')}-{profile.name}")
    base = f"crosschip convert {shlex.quote(ckpt_arg)} {out} --target {profile.name}"
    fmt = profile.default_serving_format
    fix = f"`{base}` ({fmt})"
    if fmt == "fp16":
        fix += ("; convert audits the fp16 range and refuses values above 65504 "
                "(see the numerics rows; --clamp saturates them and records it)")
    if profile.device_type == "npu" and profile.can_serve("int8-w8a8-dynamic") and fmt != "int8-w8a8-dynamic":
        fix += f", or `{base} --to int8-w8a8-dynamic --layout ascend` (about half the memory; lossy)"
    return fix


def _problems(inv: Inventory, profile: TargetProfile, stack: Stack | None = None) -> tuple[list[str], list[str]]:
    """(failures, warnings) of the stored dtypes on this target's chip. A quantized format the chip cannot
    compute in natively is not a failure when `stack` runs it there (e.g. FP8 weights dequantized on load)."""
    fails: list[str] = []
    warns: list[str] = []
    quantized = _group(inv.tensors, "quantized")
    servable = inv.fmt in SERVING_FORMATS and profile.can_serve(inv.fmt)
    if stack is not None and stack.format_status(inv.fmt, inv.layout) == "yes":
        servable = True
    for dtype, tensors in quantized.items():
        if not servable:
            fails.append(f"{_describe(dtype, tensors)} in {inv.fmt}: {profile.name} cannot run {inv.fmt}")
    for dtype, tensors in _group(inv.tensors, "float").items():
        if not profile.supports(dtype):
            fails.append(f"{_describe(dtype, tensors)}: {profile.name} has no {dtype} compute")
        elif dtype == "fp32" and profile.default_serving_format != "fp32" and profile.supports("bf16"):
            warns.append(f"{_describe(dtype, tensors)}: fp32 weights take 2x the memory of bf16 on {profile.name}")
    return fails, warns


def runnable(inv: Inventory, profile: TargetProfile) -> bool:
    """Whether the target can compute in every stored dtype (no formats failure)."""
    return not _problems(inv, profile)[0]


def _counts(inv: Inventory) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for t in inv.tensors:
        entry = counts.setdefault(t.dtype, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += t.nbytes
    return counts


def check_formats(inv: Inventory, profile: TargetProfile, ckpt_arg: str, stack: Stack | None = None,
                  host_flags: Collection[str] = ()) -> CheckResult:
    """FAIL when a stored dtype is one the target cannot compute in, or the stack (default: the profile's
    first) does not run the checkpoint's format; WARN for fp32 on a bf16 target or an unverified format."""
    from crosschip.check.engine import format_fix, format_problem

    stack = stack or profile.stack()
    fails, warns = _problems(inv, profile, stack)
    chip_failed = bool(fails)
    engine = format_problem(inv.fmt, inv.layout, profile, stack, host_flags)
    if engine is not None:
        (fails if engine[0] == "FAIL" else warns).append(engine[1])
    details = {"format": inv.fmt, "layout": inv.layout, "config_only": inv.config_only, "dtypes": _counts(inv),
               "target_matmul_dtypes": list(profile.matmul_dtypes), "stack": stack.name,
               "stack_formats": list(stack.formats), "sources": stack.source_refs("formats"),
               "problems": fails + warns}
    source = "sized from config.json" if inv.config_only else "from the safetensors headers"
    if fails:
        fix = (convert_fix(profile, ckpt_arg) if chip_failed
               else format_fix(inv.fmt, inv.layout, profile, stack, ckpt_arg, host_flags))
        return CheckResult("formats", "FAIL", "; ".join(fails), fix, details)
    if warns:
        out = shlex.quote(f"{ckpt_arg.rstrip('/')}-bf16")
        fix = (f"`crosschip convert {shlex.quote(ckpt_arg)} {out} --to bf16` halves the weight memory"
               if engine is None else f"run a smoke test of {stack.name} on one {profile.name} device first")
        return CheckResult("formats", "WARN", "; ".join(warns), fix, details)
    stored = ", ".join(f"{d}: {c['tensors']} tensors" for d, c in sorted(details["dtypes"].items()))
    reason = (f"{inv.fmt} ({inv.layout}) checkpoint, {source} ({stored}); {profile.name} runs "
              f"{', '.join(profile.matmul_dtypes)}; {stack.name} runs {inv.fmt}")
    return CheckResult("formats", "PASS", reason, None, details)
