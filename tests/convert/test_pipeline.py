"""`convert()` end to end on real safetensors checkpoints: numerics, layouts, targets, and bad input.

Sources: a hand-written DeepSeek-V3 FP8 checkpoint (tests/convert/conftest.py, built without
crosschip's quantizer, dimensions off the 128 grid, scales in other shards than their weights) and
the `tiny` / `deepseek-tiny` presets as crosschip writes them. Outputs are read back with
safetensors and compared with hand-written references, transformers and crosschip's loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from convert_testkit import (
    FP8_QUANTIZATION_CONFIG,
    INDEX,
    Fp8Checkpoint,
    blockwise_dequant,
    deepseek_fp8_weight,
    edit_header,
    edit_tensors,
    expand_blocks,
    shard_of,
    snapshot,
    write_overflowing,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from crosschip import checkpoint
from crosschip.convert.pipeline import ConvertOptions, convert, open_source, resolve_options
from crosschip.errors import CrosschipError
from crosschip.formats.quant import FP8_REL_ERR, fp8_error_bound

IDS = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(0))
HP = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALL = [("fp32", None), ("bf16", None), ("fp16", None), ("fp8-block", None), ("int8-w8a16", None),
       ("int8-w8a8-dynamic", None), ("int8-w8a8-dynamic", "ascend")]
# Logits of the converted checkpoint (crosschip's loader, fp32 compute) vs the fp32 source's, as
# max |diff| / max |source logits|. fp32 is lossless. bf16 / fp16 round each weight by <= 2^-8 /
# 2^-11 relative, FP8 e4m3 by <= 2^-4 of the value (FP8_REL_ERR), INT8 by <= amax/254 per row (the
# loader dequantizes weights; activations stay fp32). Measured on these two tiny models: 3.7e-3
# (bf16), 4.4e-4 (fp16), 3.9e-2 (fp8), 0.8-1.2e-2 (int8); each bound leaves 2.5-3.5x headroom.
Converted = tuple[Path, dict[str, Any]]  # an output directory and its conversion record
LOGIT_TOL = {"fp32": 0.0, "bf16": 1e-2, "fp16": 1.5e-3, "fp8-block": 0.1, "int8-w8a16": 0.03,
             "int8-w8a8-dynamic": 0.03}


def headers(root: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype code, shape) over every shard in the index (which must list them all)."""
    weight_map = json.loads((root / INDEX).read_text())["weight_map"]
    out: dict[str, tuple[str, list[int]]] = {}
    for file in sorted(set(weight_map.values())):
        with safe_open(root / file, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[name] = (f.get_slice(name).get_dtype(), list(f.get_slice(name).get_shape()))
                assert weight_map[name] == file
    assert set(out) == set(weight_map)
    return out


def tensors(root: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads((root / INDEX).read_text())["weight_map"]
    return {k: v for file in sorted(set(weight_map.values())) for k, v in load_file(root / file).items()}


def run(src: Path, dst: Path, fmt: str, layout: str | None = None, **kw: Any) -> dict[str, Any]:
    return convert(src, dst, ConvertOptions(fmt, layout, **kw))


def loader_logits(path: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model, _ = checkpoint.load_model(path, dtype=dtype)
    with torch.no_grad():
        return model(IDS).logits.float()


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def ds_bf16(fp8_deepseek: Fp8Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """The FP8 checkpoint converted to bf16 (as `fp8_cast_bf16.py` does) in ~300 kB shards, and its record."""
    dst = tmp_path_factory.mktemp("ds-bf16") / "out"
    return dst, run(fp8_deepseek.root, dst, "bf16", shard_bytes=300_000)


# ------------------------------------------------------------------ FP8 block source (DeepSeek-V3)


def test_fp8_block_to_bf16_is_the_exact_blockwise_dequantization(fp8_deepseek: Fp8Checkpoint,
                                                                  ds_bf16: Converted) -> None:
    out = tensors(ds_bf16[0])
    src = fp8_deepseek.tensors
    logical = {n for n in src if not n.endswith("_scale_inv")}
    assert set(out) == logical
    for name in fp8_deepseek.fp8_weights:
        expected = blockwise_dequant(src[name], src[name + "_scale_inv"]).to(torch.bfloat16)
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], expected), name
    for name in logical - set(fp8_deepseek.fp8_weights):
        assert out[name].dtype == src[name].dtype and torch.equal(out[name], src[name]), name
    assert out["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32  # F32, as released


def test_fp8_to_bf16_config_index_and_record(fp8_deepseek: Fp8Checkpoint, ds_bf16: Converted) -> None:
    dst, record = ds_bf16
    config = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == config["dtype"] == "bfloat16"
    weight_map = json.loads((dst / INDEX).read_text())["weight_map"]
    assert not [n for n in weight_map if "scale" in n]
    assert len(set(weight_map.values())) > 2 and set(weight_map) == set(headers(dst))  # sharded, consistent
    manifest = json.loads((dst / "crosschip.json").read_text())
    checkpoint.verify_manifest(dst, manifest)  # every output file hashed
    assert manifest["conversions"] == [json.loads(json.dumps(record))]
    shards = sorted(set(fp8_deepseek.weight_map.values()))
    assert record["source"]["sha256"] == {f: hashlib.sha256((fp8_deepseek.root / f).read_bytes()).hexdigest()
                                          for f in shards}
    assert (record["from"], record["to"], record["layout"]) == ("fp8-block", "bf16", "hf")
    assert record["dtype"] == "bfloat16"
    assert set(record["tensors"]) == set(weight_map)
    assert all(not e["quantized"] and e["max_rel"] <= 2.0**-8 for e in record["tensors"].values())
    assert record["summary"]["tensors"] == len(weight_map) and record["summary"]["quantized"] == 0
    assert record["summary"]["max_rel"] == max(e["max_rel"] for e in record["tensors"].values()) > 0
    # The names this fixture spelled out are the ones transformers' DeepseekV3 expects, and both
    # loaders compute the same logits from them.
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        assert torch.allclose(hf(IDS).logits, loader_logits(dst), rtol=0, atol=1e-5)


def test_bf16_to_fp8_block_and_back_within_the_documented_bound(ds_bf16: Converted, tmp_path: Path) -> None:
    src = tensors(ds_bf16[0])
    record = run(ds_bf16[0], tmp_path / "fp8", "fp8-block")
    out = tensors(tmp_path / "fp8")
    quantized = {n for n, t in src.items() if deepseek_fp8_weight(n, tuple(t.shape))}
    assert {n.removesuffix("_scale_inv") for n in out if n.endswith("_scale_inv")} == quantized
    assert {n for n, e in record["tensors"].items() if e["quantized"]} == quantized
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.mlp.gate.weight", "model.layers.0.self_attn.kv_a_layernorm.weight"):
        assert out[kept].dtype == torch.bfloat16 and torch.equal(out[kept], src[kept])
    assert out["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == FP8_QUANTIZATION_CONFIG
    loaded = checkpoint.dequantized_state_dict(checkpoint.open_checkpoint(tmp_path / "fp8"), torch.float32)
    back = run(tmp_path / "fp8", tmp_path / "back", "bf16")
    assert back["from"] == "fp8-block"
    final = tensors(tmp_path / "back")
    for name in quantized:
        q, scale, ref = out[name], out[name + "_scale_inv"], src[name].float()
        assert q.dtype == torch.float8_e4m3fn and tuple(scale.shape) == tuple(-(-s // 128) for s in q.shape)
        bound = fp8_error_bound(ref, scale)
        assert torch.equal(loaded[name], blockwise_dequant(q, scale)), name  # the loader decodes exactly
        assert bool(((loaded[name] - ref).abs() <= bound).all()), name
        # Back in bf16: the FP8 bound plus one bf16 rounding (2^-8 relative) of the result.
        got = final[name].float()
        assert bool(((got - ref).abs() <= bound + 2.0**-8 * got.abs()).all()), name
        # The bound is not vacuous: 2^-4 relative, plus a subnormal term far below the block's amax.
        assert float(bound.max()) <= (FP8_REL_ERR + 2**-9) * float(ref.abs().max())


@pytest.mark.parametrize(("fmt", "layout"), [("int8-w8a16", None), ("int8-w8a8-dynamic", None),
                                             ("int8-w8a8-dynamic", "ascend")])
def test_int8_within_half_a_scale_after_the_loader_decode(ds_bf16: Converted, tmp_path: Path, fmt: str,
                                                          layout: str | None) -> None:
    src = tensors(ds_bf16[0])
    record = run(ds_bf16[0], tmp_path / "q", fmt, layout)
    stored = tensors(tmp_path / "q")
    decoded = checkpoint.dequantized_state_dict(checkpoint.open_checkpoint(tmp_path / "q"), torch.float32)
    assert set(decoded) == set(src)
    quantized = {n for n, t in src.items() if deepseek_fp8_weight(n, tuple(t.shape))}
    if layout == "ascend":  # msModelSlim's DeepSeek recipe keeps kv_b_proj in float
        quantized = {n for n in quantized if "kv_b_proj" not in n}
    assert {n for n, e in record["tensors"].items() if e["quantized"]} == quantized
    for name, ref in src.items():
        if name not in quantized:
            assert torch.equal(decoded[name], ref.float()), name
            continue
        scale = stored[name.removesuffix("weight") + "weight_scale"].float()
        assert scale.shape == (ref.shape[0], 1)
        err = (decoded[name] - ref.float()).abs()
        # Half a step, plus the float32 rounding of the product code * scale (2^-24 relative).
        assert bool((err <= scale / 2 + 2**-23 * decoded[name].abs()).all()), name
        assert float(err.max()) > 0  # really quantized


# ------------------------------------------------------------------ HF formats, transformers and the loader


@pytest.mark.parametrize("preset", ["tiny", "deepseek-tiny"])
@pytest.mark.parametrize("fmt", HP)
def test_hf_formats_load_in_transformers_with_the_loader_s_logits(preset: str, fmt: str, llama_src: Path,
                                                                  deepseek_src: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = llama_src if preset == "tiny" else deepseek_src
    run(src, tmp_path / fmt, fmt)
    # No dtype given: transformers takes it from config.json, so each format computes in its own dtype.
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / fmt, output_loading_info=True)
    assert not any(info.values()), info
    assert next(hf.parameters()).dtype == DTYPES[fmt]
    with torch.no_grad():
        hf_logits = hf(IDS).logits.float()
    ours = loader_logits(tmp_path / fmt, DTYPES[fmt])
    # Same weights, same dtype, same model class: only kernel-order differences are allowed.
    assert rel(hf_logits, ours) <= {"fp32": 1e-6, "bf16": 8e-3, "fp16": 1e-3}[fmt]


@pytest.mark.parametrize("preset", ["tiny", "deepseek-tiny"])
@pytest.mark.parametrize(("fmt", "layout"), ALL)
def test_every_format_runs_in_the_loader_close_to_the_source(preset: str, fmt: str, layout: str | None,
                                                             llama_src: Path, deepseek_src: Path,
                                                             tmp_path: Path) -> None:
    src = llama_src if preset == "tiny" else deepseek_src
    run(src, tmp_path / "out", fmt, layout)
    got, ref = loader_logits(tmp_path / "out"), loader_logits(src)
    assert rel(got, ref) <= LOGIT_TOL[fmt], rel(got, ref)
    if fmt != "fp32":
        assert rel(got, ref) > 0  # the tolerance is exercised: the format really changed the weights


# ------------------------------------------------------------------ Ascend layout


def ascend_expected(quantized: dict[str, tuple[int, int]], floats: dict[str, tuple[int, ...]],
                    dtype: str) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    """Headers and quant_model_description.json entries of a vllm-ascend W8A8_DYNAMIC checkpoint."""
    table: dict[str, tuple[str, list[int]]] = {}
    kinds: dict[str, str] = {}
    for module, (rows, cols) in quantized.items():
        table |= {f"{module}.weight": ("I8", [rows, cols]), f"{module}.weight_scale": (dtype, [rows, 1]),
                  f"{module}.weight_offset": (dtype, [rows, 1])}
        kinds |= {f"{module}.{leaf}": "W8A8_DYNAMIC" for leaf in ("weight", "weight_scale", "weight_offset")}
    for name, shape in floats.items():
        table[name] = ("F32" if name.endswith("e_score_correction_bias") else dtype, list(shape))
        kinds[name] = "FLOAT"
    return table, kinds


def check_ascend(dst: Path, quantized: dict[str, tuple[int, int]], floats: dict[str, tuple[int, ...]],
                 dtype: str) -> None:
    table, kinds = ascend_expected(quantized, floats, dtype)
    assert headers(dst) == table
    description = json.loads((dst / "quant_model_description.json").read_text())
    assert description == {"version": "1.0.0", "model_quant_type": "W8A8_DYNAMIC", "group_size": 0, **kinds}
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())
    offsets = [t for n, t in tensors(dst).items() if n.endswith("weight_offset")]
    assert offsets and not any(bool(t.any()) for t in offsets)  # symmetric: zero offsets


def test_ascend_layout_of_tiny_llama(llama_src: Path, tmp_path: Path) -> None:
    run(llama_src, tmp_path / "a", "int8-w8a8-dynamic", "ascend")
    quantized, floats = {}, {"model.embed_tokens.weight": (400, 64), "model.norm.weight": (64,),
                             "lm_head.weight": (400, 64)}
    for i in range(2):
        p = f"model.layers.{i}"
        quantized |= {f"{p}.self_attn.q_proj": (64, 64), f"{p}.self_attn.k_proj": (32, 64),
                      f"{p}.self_attn.v_proj": (32, 64), f"{p}.self_attn.o_proj": (64, 64),
                      f"{p}.mlp.gate_proj": (128, 64), f"{p}.mlp.up_proj": (128, 64),
                      f"{p}.mlp.down_proj": (64, 128)}
        floats |= {f"{p}.input_layernorm.weight": (64,), f"{p}.post_attention_layernorm.weight": (64,)}
    check_ascend(tmp_path / "a", quantized, floats, "BF16")
    assert (tmp_path / "a" / "tokenizer.json").is_file()  # side files travel with the weights


def test_ascend_layout_of_deepseek_tiny(deepseek_src: Path, tmp_path: Path) -> None:
    run(deepseek_src, tmp_path / "a", "int8-w8a8-dynamic", "ascend")
    quantized, floats = {}, {"model.embed_tokens.weight": (400, 64), "model.norm.weight": (64,),
                             "lm_head.weight": (400, 64)}
    for i in range(2):
        p = f"model.layers.{i}"
        # MLA, q_lora_rank None: q_proj [heads*(nope+rope), h]; kv_b_proj stays FLOAT (msModelSlim recipe).
        quantized |= {f"{p}.self_attn.q_proj": (96, 64), f"{p}.self_attn.kv_a_proj_with_mqa": (40, 64),
                      f"{p}.self_attn.o_proj": (64, 64)}
        floats |= {f"{p}.input_layernorm.weight": (64,), f"{p}.post_attention_layernorm.weight": (64,),
                   f"{p}.self_attn.kv_a_layernorm.weight": (32,),
                   f"{p}.self_attn.kv_b_proj.weight": (128, 32)}
        mlps = {f"{p}.mlp": 128} if i == 0 else {**{f"{p}.mlp.experts.{e}": 32 for e in range(4)},
                                                  f"{p}.mlp.shared_experts": 32}
        for m, inter in mlps.items():
            quantized |= {f"{m}.gate_proj": (inter, 64), f"{m}.up_proj": (inter, 64),
                          f"{m}.down_proj": (64, inter)}
    floats |= {"model.layers.1.mlp.gate.weight": (4, 64),
               "model.layers.1.mlp.gate.e_score_correction_bias": (4,)}
    check_ascend(tmp_path / "a", quantized, floats, "BF16")


# ------------------------------------------------------------------ fp16 range audit and --target


@pytest.fixture
def overflowing(llama_src: Path, tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "big"
    return root, write_overflowing(llama_src, root)


def test_fp16_overflow_is_refused_unless_clamped(overflowing: tuple[Path, str], tmp_path: Path) -> None:
    src, name = overflowing
    with pytest.raises(CrosschipError, match=f"{name} \\(2 values") as e:
        run(src, tmp_path / "fp16", "fp16")
    assert "--clamp" in str(e.value)
    assert not (tmp_path / "fp16").exists()
    record = run(src, tmp_path / "fp16", "fp16", clamp=True)
    assert record["clamped_tensors"] == [name]
    assert record["fp16_audit"][name]["overflow"] == 2
    out, ref = tensors(tmp_path / "fp16"), load_file(shard_of(src, name))[name]
    assert out[name].dtype == torch.float16 and (out[name][0, 0], out[name][1, 2]) == (65504, -65504)
    assert bool(torch.isfinite(out[name]).all())
    assert torch.equal(out[name][2:], ref[2:].half())  # the rest is a plain cast
    manifest = json.loads((tmp_path / "fp16" / "crosschip.json").read_text())
    assert manifest["conversions"][-1]["clamped_tensors"] == [name]


def test_target_picks_the_default_format_and_refuses_what_the_chip_cannot_run() -> None:
    assert resolve_options(None, "ascend-910b", None, None).fmt == "bf16"
    assert resolve_options(None, "ascend-310p", None, None).fmt == "fp16"
    assert resolve_options("fp8-block", "nvidia-h100", None, None).fmt == "fp8-block"
    with pytest.raises(CrosschipError, match="ascend-910b cannot run fp8-block: its matmul dtypes are") as e:
        resolve_options("fp8-block", "ascend-910b", None, None)
    assert "--to bf16" in str(e.value)
    with pytest.raises(CrosschipError, match="ascend-310p cannot run --dtype bf16"):
        resolve_options("int8-w8a8-dynamic", "ascend-310p", None, "bf16")
    with pytest.raises(CrosschipError, match="no output format"):
        resolve_options(None, None, None, None)


def test_ascend_310p_int8_is_the_ascend_layout_in_fp16(llama_src: Path, tmp_path: Path) -> None:
    opts = resolve_options("int8-w8a8-dynamic", "ascend-310p", None, None)
    assert (opts.layout, opts.dtype) == ("ascend", torch.float16)
    record = convert(llama_src, tmp_path / "a", opts)
    assert (record["target"], record["dtype"], record["layout"]) == ("ascend-310p", "float16", "ascend")
    table = headers(tmp_path / "a")
    assert {d for n, (d, _) in table.items() if not n.endswith(".weight") or "layers" not in n
            or "norm" in n} == {"F16"}  # scales, offsets, embeddings, norms, lm_head: no bf16 on a 310P
    assert table["model.layers.0.mlp.down_proj.weight"] == ("I8", [64, 128])
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == "float16"


# ------------------------------------------------------------------ safety and bad input


def test_src_is_never_written(fp8_deepseek: Fp8Checkpoint, llama_src: Path, tmp_path: Path) -> None:
    before = {p: snapshot(p) for p in (fp8_deepseek.root, llama_src)}
    run(fp8_deepseek.root, tmp_path / "a", "int8-w8a8-dynamic", "ascend")
    run(llama_src, tmp_path / "b", "fp8-block")
    with pytest.raises(CrosschipError, match="DST must not be SRC or inside it"):
        run(llama_src, llama_src / "sub", "bf16")
    with pytest.raises(CrosschipError, match="DST must not be SRC"):
        run(llama_src, llama_src, "bf16", overwrite=True)
    assert {p: snapshot(p) for p in before} == before


def test_existing_dst_is_refused_without_overwrite(llama_src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    before = snapshot(dst)
    with pytest.raises(CrosschipError, match="already exists.*--overwrite"):
        run(llama_src, dst, "bf16")
    assert snapshot(dst) == before
    run(llama_src, dst, "bf16", overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "crosschip.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # the old one moved aside and removed


def test_failure_midway_leaves_no_dst_and_no_temp_files(fp8_deepseek: Fp8Checkpoint, tmp_path: Path) -> None:
    src = Path(shutil.copytree(fp8_deepseek.root, tmp_path / "src"))
    order = list(open_source(src).groups)  # the order tensors are converted in
    last = [n for n in order if n in fp8_deepseek.fp8_weights][-1]

    def nan_code(t: dict[str, torch.Tensor]) -> None:
        t[last].view(torch.uint8)[1, 1] = 0x7F  # e4m3fn NaN: no INT8 code can hold it

    edit_tensors(src, last, nan_code)
    out, seen = tmp_path / "out", []

    def progress(name: str, done: int, nbytes: int) -> None:
        seen.append(sorted(p.name for p in tmp_path.iterdir()))

    with pytest.raises(CrosschipError, match=f"{last}: contains inf or NaN"):
        convert(src, out, ConvertOptions("int8-w8a8-dynamic"), progress)
    assert len(seen) == order.index(last) > len(order) // 2  # failed late, after converting the ones before
    assert any(n.startswith(".out.tmp-") for n in seen[-1])  # output was being written beside DST
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no DST, no temp directory


@pytest.fixture
def watch_reads() -> Any:
    """Paths Python opened while the fixture's list `targets` is non-empty (audit hook, PEP 578)."""
    opened: list[str] = []
    targets: list[str] = []

    def hook(event: str, args: tuple[Any, ...]) -> None:
        path = args[0] if event == "open" and targets else None
        if isinstance(path, str | Path) and any(t in str(path) for t in targets):
            opened.append(str(path))

    sys.addaudithook(hook)  # cannot be removed; inert once `targets` is cleared
    yield targets, opened
    targets.clear()


@pytest.mark.parametrize("absolute", [False, True])
def test_index_paths_outside_the_checkpoint_are_refused_unread(fp8_deepseek: Fp8Checkpoint, tmp_path: Path,
                                                               absolute: bool, watch_reads: Any) -> None:
    src = Path(shutil.copytree(fp8_deepseek.root, tmp_path / "src"))
    name = "model.norm.weight"
    outside = tmp_path / "outside.safetensors"  # a valid shard holding the tensor: only the path is wrong
    save_file({name: fp8_deepseek.tensors[name]}, outside)
    old = time.time() - 3 * 86400  # atime older than a day: even relatime records the next read
    os.utime(outside, (old, outside.stat().st_mtime))
    index = json.loads((src / INDEX).read_text())
    index["weight_map"][name] = str(outside) if absolute else "../outside.safetensors"
    (src / INDEX).write_text(json.dumps(index))
    targets, opened = watch_reads
    targets.append("outside.safetensors")
    with pytest.raises(CrosschipError, match="unsafe path .*outside.safetensors") as e:
        run(src, tmp_path / "out", "bf16")
    targets.clear()
    assert "re-download" in str(e.value)
    assert opened == [] and outside.stat().st_atime == pytest.approx(old, abs=1)
    assert not (tmp_path / "out").exists()


def test_truncated_shard_is_named(fp8_deepseek: Fp8Checkpoint, tmp_path: Path) -> None:
    src = Path(shutil.copytree(fp8_deepseek.root, tmp_path / "src"))
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(CrosschipError, match=f"{shard.name} is truncated: tensor .* ends past the end"):
        run(src, tmp_path / "out", "bf16")
    os.truncate(shard, 5)
    with pytest.raises(CrosschipError, match=f"{shard.name} is truncated \\(no safetensors header\\)"):
        run(src, tmp_path / "out", "bf16")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["garbage", "length"])
def test_corrupt_header_is_refused(fp8_deepseek: Fp8Checkpoint, tmp_path: Path, damage: str) -> None:
    src = Path(shutil.copytree(fp8_deepseek.root, tmp_path / "src"))
    shard = sorted(src.glob("model-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    if damage == "garbage":
        raw[8:40] = b"\xff" * 32
        match = f"{shard.name} has a corrupt safetensors header"
    else:
        raw[:8] = (2**40).to_bytes(8, "little")
        match = f"{shard.name} is not a valid safetensors file \\(header length"
    shard.write_bytes(bytes(raw))
    with pytest.raises(CrosschipError, match=match):
        run(src, tmp_path / "out", "bf16")
    assert not (tmp_path / "out").exists()


def test_missing_scale_inv_is_named(fp8_deepseek: Fp8Checkpoint, tmp_path: Path) -> None:
    src = Path(shutil.copytree(fp8_deepseek.root, tmp_path / "src"))
    name = "model.layers.1.mlp.experts.2.up_proj.weight"

    def drop(t: dict[str, torch.Tensor]) -> None:
        del t[name + "_scale_inv"]

    edit_tensors(src, name + "_scale_inv", drop)
    index = json.loads((src / INDEX).read_text())
    del index["weight_map"][name + "_scale_inv"]
    (src / INDEX).write_text(json.dumps(index))
    with pytest.raises(CrosschipError, match=f"{name} is torch.float8_e4m3fn but has no _scale_inv"):
        run(src, tmp_path / "out", "bf16")
    assert not (tmp_path / "out").exists()


def test_scale_of_the_wrong_shape_is_named(fp8_deepseek: Fp8Checkpoint, tmp_path: Path) -> None:
    src = Path(shutil.copytree(fp8_deepseek.root, tmp_path / "src"))
    name = "model.layers.0.mlp.down_proj.weight"  # [200, 300]: needs a [2, 3] scale

    def shrink(t: dict[str, torch.Tensor]) -> None:
        t[name + "_scale_inv"] = t[name + "_scale_inv"][:, :2].contiguous()  # as if out // 128, not ceil

    edit_tensors(src, name + "_scale_inv", shrink)
    with pytest.raises(CrosschipError, match=f"{name}_scale_inv has shape \\[2, 2\\].*needs \\[2, 3\\]"):
        run(src, tmp_path / "out", "bf16")
    assert not (tmp_path / "out").exists()


def test_unknown_dtype_names_tensor_and_file(fp8_deepseek: Fp8Checkpoint, tmp_path: Path) -> None:
    src = Path(shutil.copytree(fp8_deepseek.root, tmp_path / "src"))
    name = "model.layers.0.self_attn.q_a_proj.weight"
    shard = shard_of(src, name)

    def f4(header: dict[str, Any]) -> None:
        header[name]["dtype"] = "F4"

    edit_header(shard, f4)
    with pytest.raises(CrosschipError, match=f"tensor {name} in {shard.name} has unsupported dtype 'F4'"):
        run(src, tmp_path / "out", "bf16")
    assert not (tmp_path / "out").exists()


def test_expand_blocks_reference_matches_the_layout_rule() -> None:
    # The reference used above: tile (i, j) covers rows 128i.. and cols 128j.., edge tiles cut short.
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    grid = expand_blocks(scale, (130, 129))
    assert grid.shape == (130, 129)
    assert (grid[127, 127], grid[127, 128], grid[128, 127], grid[129, 128]) == (1.0, 2.0, 3.0, 4.0)


def hub_cache_snapshot(src: Path, cache: Path) -> Path:
    """src laid out as huggingface_hub's cache stores a download: blobs named by sha256, and a
    snapshot folder of relative symlinks to them (what `snapshot_download` returns without local_dir)."""
    repo = cache / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in sorted(p for p in src.iterdir() if p.is_file() and p.name != checkpoint.MANIFEST_NAME):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("../../blobs") / digest)
    return snap


def test_a_hub_cache_snapshot_converts_and_loads(llama_src: Path, tmp_path: Path) -> None:
    snap = hub_cache_snapshot(llama_src, tmp_path / "hub")
    record = run(snap, tmp_path / "out", "bf16")
    assert record["from"] == "fp32"
    assert (tmp_path / "out" / "tokenizer.json").is_file() and not (tmp_path / "out" / "tokenizer.json").is_symlink()
    torch.testing.assert_close(loader_logits(snap), loader_logits(llama_src), rtol=0, atol=0)
    torch.testing.assert_close(loader_logits(tmp_path / "out"), loader_logits(llama_src), rtol=0.05, atol=0.05)


def test_a_snapshot_link_leaving_the_model_cache_folder_is_refused(llama_src: Path, tmp_path: Path) -> None:
    snap = hub_cache_snapshot(llama_src, tmp_path / "hub")
    shard = next(p for p in snap.iterdir() if p.name.endswith(".safetensors"))
    outside = tmp_path / "hub" / "elsewhere.safetensors"  # in the cache, but not in this model's folder
    shutil.copyfile(shard, outside)
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(CrosschipError, match="resolves outside"):
        run(snap, tmp_path / "out", "bf16")
    assert not (tmp_path / "out").exists()
