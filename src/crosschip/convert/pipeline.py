"""`crosschip convert SRC DST --to FORMAT`: stream a checkpoint into another number format.

One pass, one tensor at a time: read (lazily, in file order) -> decode a quantized source to
float32 -> encode in the target format -> append to a pre-planned output shard (background
writer). Peak memory is a small multiple of the largest tensor whatever the model's size, SRC
is never written, and DST appears atomically with a `crosschip.json` that records the conversion.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import crosschip
from crosschip import checkpoint
from crosschip.convert.fp8_stream import dequantize_fp8_parts
from crosschip.convert.stream import (
    OutSpec,
    ShardWriter,
    SourceReader,
    StreamingReader,
    TensorInfo,
    assign_shards,
    scan_file,
)
from crosschip.errors import CrosschipError
from crosschip.formats import layouts
from crosschip.formats.quant import (
    FP8_DTYPE,
    TensorError,
    check_fp16_audits,
)
from crosschip.fsio import atomic_dir, atomic_write_json

# Files rewritten by convert (never copied); weights in pickle formats are never read.
_REWRITTEN = {"config.json", checkpoint.INDEX_NAME, checkpoint.MANIFEST_NAME, layouts.QUANT_DESCRIPTION_NAME}
_SKIPPED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")

Progress = Callable[[str, int, int], None]  # (tensor name, tensors done, bytes done)
_SCALE_INV = "_scale_inv"
_EXACT_DTYPES = (torch.bfloat16, torch.float32)  # plain casts with no range audit


@dataclass
class ConvertOptions:
    fmt: str
    layout: str | None = None
    dtype: torch.dtype | None = None  # high-precision dtype of quantized formats (default bf16)
    target: str | None = None
    clamp: bool = False
    overwrite: bool = False
    shard_bytes: int = 4 * 2**30
    forced: tuple[str, ...] = ()  # engine-rule violations written anyway (`crosschip convert --force`)


@dataclass
class Source:
    """A checkpoint directory read for conversion: config, format and every stored tensor."""

    root: Path
    config: dict[str, Any]
    fmt: str
    layout: str
    infos: dict[str, TensorInfo]  # stored name -> where it is
    groups: dict[str, list[str]]  # logical tensor -> stored names (weight + scales)
    manifest: dict[str, Any] | None
    files: list[str] = field(default_factory=list)

    def logical_shape(self, name: str, reader: SourceReader) -> tuple[int, ...]:
        stored = self.groups[name]
        shape_name = next((s for s in stored if s.endswith(".weight_shape")), None)
        if shape_name is not None:  # packed int8 (compressed-tensors pack-quantized)
            return tuple(int(v) for v in reader.get(shape_name).tolist())
        return self.infos[name].shape if name in self.infos else self.infos[stored[0]].shape


def _bulk_position(names: list[str], infos: dict[str, TensorInfo]) -> tuple[str, int]:
    bulk = max(names, key=lambda n: infos[n].nbytes)
    return infos[bulk].file, infos[bulk].offset


def open_source(path: Path) -> Source:
    root = checkpoint.resolve_checkpoint_dir(Path(path))
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CrosschipError(f"{root}/config.json cannot be read ({e})", "restore config.json") from e
    description = None
    if (root / layouts.QUANT_DESCRIPTION_NAME).is_file():
        description = json.loads((root / layouts.QUANT_DESCRIPTION_NAME).read_text())
    fmt, layout = layouts.detect_format(config, description)
    weight_map = checkpoint.weight_files(root)  # validates every shard path in the index
    files = sorted(set(weight_map.values()))
    infos = {i.name: i for f in files for i in scan_file(root, f)}
    missing = sorted(set(weight_map) - set(infos))
    if missing:
        raise CrosschipError(f"{len(missing)} tensors listed in the index are absent from the shards, e.g. "
                             f"{missing[0]}", "re-download the checkpoint")
    order = sorted(infos.values(), key=lambda i: (i.file, i.offset))
    groups = layouts.group_names([i.name for i in order])
    # Convert in the file order of each group's bulk (its largest tensor), not of its first member:
    # safetensors puts the small fp32 scales before all the bf16 and fp8 data, so ordering by them
    # would send the reads of the big tensors back and forth across the shard.
    groups = dict(sorted(groups.items(), key=lambda item: _bulk_position(item[1], infos)))
    return Source(root, config, fmt, layout, infos, groups, checkpoint.read_manifest(root), files)


def output_specs(plan: layouts.Plan, name: str, shape: tuple[int, ...], stored: torch.dtype,
                 dtype: torch.dtype) -> list[OutSpec]:
    """Names, dtypes and shapes a logical tensor becomes, known before its data is read."""
    if name not in plan.quantized and not stored.is_floating_point:
        return [OutSpec(plan.outputs(name)[0], stored, shape)]  # ids, masks: copied as stored
    return [OutSpec(*spec) for spec in layouts.stored_specs(plan, name, shape, dtype)]


def _stored_dtype(src: Source, name: str) -> torch.dtype:
    """The dtype of the logical tensor as decoded: float for any quantized group."""
    stored = src.groups[name]
    if len(stored) > 1 or src.infos[stored[0]].dtype in (FP8_DTYPE, torch.int8):
        return torch.float32
    return src.infos[stored[0]].dtype


def plan_conversion(src: Source, opts: ConvertOptions, reader: SourceReader) -> tuple[layouts.Plan, list[OutSpec]]:
    shapes = {name: src.logical_shape(name, reader) for name in src.groups}
    plan = layouts.make_plan(opts.fmt, opts.layout, shapes, src.config)
    dtype = layouts.resolve_dtype(opts.fmt, opts.dtype)
    specs = [s for n in src.groups for s in output_specs(plan, n, shapes[n], _stored_dtype(src, n), dtype)]
    return plan, specs


def _error_summary(errors: dict[str, dict[str, Any]]) -> dict[str, Any]:
    measured = {k: v for k, v in errors.items() if v.get("max_rel") is not None}
    if not measured:
        return {"tensors": len(errors)}
    worst = max(measured, key=lambda k: measured[k]["max_rel"])
    rels = [v["max_rel"] for v in measured.values()]
    return {
        "tensors": len(errors),
        "quantized": sum(1 for v in errors.values() if v["quantized"]),
        "max_rel": measured[worst]["max_rel"],
        "mean_max_rel": sum(rels) / len(rels),
        "max_abs": max(v["max_abs"] for v in measured.values()),
        "worst_tensor": worst,
    }


def _encode_whole(src: Source, plan: layouts.Plan, opts: ConvertOptions, name: str,
                  stored: dict[str, torch.Tensor]) -> layouts.Encoded:
    """Decode and encode one tensor whole (every conversion but the block-by-block FP8 one)."""
    quantize, lone = name in plan.quantized, stored.get(name) if len(stored) == 1 else None
    # A lone bf16 / fp32 tensor kept in its dtype is written as read: error 0, without decoding it
    # to fp32 and back and without the 4 temporary copies of measuring that.
    same = (lone is not None and not quantize and lone.dtype in _EXACT_DTYPES
            and _plain_dtype(plan, opts, name) == lone.dtype)
    quantized_source = len(stored) > 1 or src.fmt in layouts.QUANTIZED_FORMATS
    if same or not quantized_source:
        tensor = stored[name]
    else:
        tensor = layouts.decode(src.fmt, src.layout, name, stored, torch.float32)
    # Always encode with clamp=True and collect audits: a refusal then names every overflowing tensor.
    enc = layouts.encode(plan.fmt, plan.layout, name, tensor, quantize=quantize, dtype=opts.dtype, clamp=True,
                         measure=not same)
    return replace(enc, error=TensorError(0.0, 0.0, 0.0, 0.0)) if same else enc


def _plain_dtype(plan: layouts.Plan, opts: ConvertOptions, name: str) -> torch.dtype:
    """The dtype an unquantized floating-point tensor is written in (as `layouts.encode` casts it)."""
    return torch.float32 if layouts.policy.keep_fp32(name) else layouts.resolve_dtype(plan.fmt, opts.dtype)


def _fp8_dequant_dtype(src: Source, plan: layouts.Plan, opts: ConvertOptions, name: str) -> torch.dtype | None:
    """The dtype an FP8-block weight is dequantized to when that can go block by block, else None."""
    if src.fmt != "fp8-block" or name in plan.quantized or set(src.groups[name]) != {name, name + _SCALE_INV}:
        return None
    if src.infos[name].dtype != FP8_DTYPE or len(src.infos[name].shape) != 2:
        return None  # decode names the problem
    dtype = _plain_dtype(plan, opts, name)
    return dtype if dtype in _EXACT_DTYPES else None  # fp16 goes whole: it needs the range audit


def _convert_tensors(src: Source, plan: layouts.Plan, opts: ConvertOptions, reader: SourceReader,
                     writer: ShardWriter, progress: Progress | None) -> tuple[dict[str, Any], list[Any]]:
    """The streaming loop; returns per-tensor errors and fp16 range audits."""
    errors: dict[str, Any] = {}
    audits = []
    done_bytes = 0
    for i, name in enumerate(src.groups):
        fp8_to = _fp8_dequant_dtype(src, plan, opts, name)
        if fp8_to is not None:  # read, dequantized and written in row blocks: never whole in memory
            err = dequantize_fp8_parts(name, src.infos[name].shape, functools.partial(reader.get_rows, name),
                                       reader.get(name + _SCALE_INV), fp8_to, writer)
            enc = layouts.Encoded({}, False, err, None)
        else:
            enc = _encode_whole(src, plan, opts, name, {s: reader.get(s) for s in src.groups[name]})
            for out_name in plan.outputs(name):
                writer.put(out_name, enc.tensors[out_name])
        if enc.audit is not None:
            audits.append(enc.audit)
        err = enc.error
        errors[name] = {"quantized": enc.quantized, "max_abs": err.max_abs if err else None,
                        "max_rel": err.max_rel if err else None, "rmse": err.rmse if err else None}
        done_bytes += sum(src.infos[s].nbytes for s in src.groups[name])
        if progress is not None:
            progress(name, i + 1, done_bytes)
    return errors, audits


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [checkpoint.SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, generation config, chat template, ... (regular files; a link only if it stays inside
    the checkpoint, or inside its model folder for a Hugging Face cache snapshot)."""
    copied = []
    allowed = checkpoint.containment_root(src)
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name in _REWRITTEN or p.name.endswith(_SKIPPED_SUFFIXES):
            continue
        if p.is_symlink() and not p.resolve().is_relative_to(allowed):
            continue
        shutil.copyfile(p, dst / p.name)  # a link's content, not the link
        copied.append(p.name)
    return copied


def _repair_tokenizer(src: Source, out: Path) -> bool:
    """Give a crosschip-trained checkpoint's BOS-less tokenizer (saved before crosschip's added BOS) the BOS
    post-processor; True when the written tokenizer was changed. Any other tokenizer stays a plain copy."""
    from crosschip.data.tokenizer import add_bos_to_saved, load_tokenizer, needs_bos_repair

    provenance = (src.manifest or {}).get("provenance", {})
    if "train_config" not in provenance or not (out / "tokenizer.json").is_file():
        return False  # not crosschip-trained: nothing says which BOS its training used
    if not needs_bos_repair(provenance, load_tokenizer(out)):
        return False
    return add_bos_to_saved(out)


def _check_source_hashes(src: Source, hashes: dict[str, str]) -> None:
    recorded = (src.manifest or {}).get("files", {})
    for name, digest in hashes.items():
        if name in recorded and recorded[name].get("sha256") != digest:
            raise CrosschipError(f"source {src.root}: sha256 of {name} does not match its crosschip.json",
                                 "re-copy the source checkpoint")


def _record(src: Source, plan: layouts.Plan, opts: ConvertOptions, hashes: dict[str, str],
            errors: dict[str, Any], audits: list[Any]) -> dict[str, Any]:
    clamped = [a.name for a in audits if not a.ok]
    return {
        "tool": "crosschip convert",
        "crosschip_version": crosschip.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(src.root), "format": src.fmt, "layout": src.layout, "sha256": hashes},
        "from": src.fmt,
        "to": plan.fmt,
        "layout": plan.layout,
        "dtype": str(layouts.resolve_dtype(plan.fmt, opts.dtype)).removeprefix("torch."),
        "target": opts.target,
        "clamped_tensors": clamped,
        "forced": list(opts.forced),
        "fp16_audit": {a.name: {"overflow": a.overflow, "underflow_to_zero": a.underflow_to_zero,
                                "subnormal": a.subnormal} for a in audits if a.overflow or a.underflow_to_zero},
        "summary": _error_summary(errors),
        "tensors": errors,
    }


def _manifest(src: Source, dst: Path, record: dict[str, Any], new_config: dict[str, Any],
              written: dict[str, str]) -> dict[str, Any]:
    base = src.manifest or {}
    numel = sum(math.prod(src.infos[n[0]].shape) for n in src.groups.values())
    model = {**base.get("model", {}), "architecture": (new_config.get("architectures") or ["?"])[0],
             "model_type": new_config.get("model_type"), "num_parameters": base.get("model", {}).get(
                 "num_parameters", numel), "dtype": new_config.get("dtype"), "format": record["to"],
             "layout": record["layout"]}
    manifest = checkpoint.build_manifest(dst, base.get("provenance", {"source": "external checkpoint"}), model, written)
    manifest["conversions"] = [*base.get("conversions", []), record]
    return manifest


def convert(src_path: Path, dst: Path, opts: ConvertOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Convert SRC into DST (atomically); returns the conversion record written to crosschip.json."""
    src = open_source(src_path)
    if Path(dst).resolve() == src.root.resolve() or src.root.resolve() in Path(dst).resolve().parents:
        raise CrosschipError("DST must not be SRC or inside it", "choose an output directory outside SRC")
    planner = SourceReader(src.root, src.infos)
    try:
        plan, specs = plan_conversion(src, opts, planner)
    finally:
        planner.close()
    shards = assign_shards(specs, opts.shard_bytes)
    names = _shard_names(len(shards))
    with atomic_dir(Path(dst), overwrite=opts.overwrite) as tmp:
        writer = ShardWriter(tmp, shards, names)
        reader = StreamingReader(src.root, src.infos, src.files)  # reads each shard once, hashing it
        try:
            errors, audits = _convert_tensors(src, plan, opts, reader, writer, progress)
            hashes = reader.digests()
        except BaseException:
            writer.abort()  # stop the writer thread; the conversion's own error is the one to report
            raise
        finally:
            reader.close()
        writer.close()
        if not opts.clamp:
            check_fp16_audits(audits)
        _check_source_hashes(src, hashes)
        weight_map = {s.name: names[i] for i, shard in enumerate(shards) for s in shard}
        total = sum(s.nbytes for s in specs)
        atomic_write_json(tmp / checkpoint.INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        new_config = layouts.convert_config(plan, src.config, opts.dtype)
        atomic_write_json(tmp / "config.json", new_config)
        for fname, content in layouts.extra_files(plan).items():
            atomic_write_json(tmp / fname, content)
        _copy_side_files(src.root, tmp)
        record = _record(src, plan, opts, hashes, errors, audits)
        record["tokenizer_repaired"] = _repair_tokenizer(src, tmp)
        atomic_write_json(tmp / checkpoint.MANIFEST_NAME, _manifest(src, tmp, record, new_config, writer.sha256))
    return record


def resolve_options(
    to: str | None, target: str | None, layout: str | None, dtype: str | None, **kw: Any
) -> ConvertOptions:
    """--to/--target/--layout/--dtype -> options; refuses a format the target cannot run, with why."""
    from crosschip.targets import load_target

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype is not None and dtype not in dtypes:
        raise CrosschipError(f"unknown --dtype {dtype!r}", "use fp32, bf16 or fp16")
    torch_dtype = dtypes.get(dtype) if dtype else None
    if target is None:
        if to is None:
            raise CrosschipError("no output format given", "pass --to FORMAT or --target PROFILE")
        if to not in layouts.FORMATS:
            raise CrosschipError(f"unknown format {to!r}", f"use one of {', '.join(layouts.FORMATS)}")
        return ConvertOptions(to, layout, torch_dtype, None, **kw)
    profile = load_target(target)
    fmt = to or profile.default_serving_format
    if fmt not in layouts.FORMATS:
        raise CrosschipError(f"unknown format {fmt!r}", f"use one of {', '.join(layouts.FORMATS)}")
    if not profile.can_serve(fmt):
        raise CrosschipError(
            f"{target} cannot run {fmt}: its matmul dtypes are {', '.join(profile.matmul_dtypes)}",
            f"use --to {profile.default_serving_format} (the {target} default) or another target",
        )
    if torch_dtype is None and fmt in layouts.QUANTIZED_FORMATS and not profile.supports("bf16"):
        torch_dtype = torch.float16  # e.g. ascend-310p: no bf16 units, so unquantized parts go fp16
    if dtype is not None and not profile.supports(dtype):
        raise CrosschipError(f"{target} cannot run --dtype {dtype}", "choose a dtype the target supports")
    if layout is None and fmt == "int8-w8a8-dynamic" and profile.device_type == "npu":
        layout = "ascend"  # what vllm-ascend loads with --quantization ascend
    return ConvertOptions(fmt, layout, torch_dtype, target, **kw)
