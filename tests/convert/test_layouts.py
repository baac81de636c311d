"""Convert layouts on real tiny checkpoints: policy, names/dtypes/shapes, config files, round trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from crosschip import models
from crosschip.errors import CrosschipError
from crosschip.formats import layouts, policy

Q, F = "W8A8_DYNAMIC", "FLOAT"
ALL_LAYOUTS = [(fmt, layout) for fmt in layouts.FORMATS for layout in layouts.LAYOUTS[fmt]]


class Tiny:
    """A freshly initialised preset model and the tensors `save_pretrained` wrote for it."""

    def __init__(self, preset: str, root: Path) -> None:
        self.hf_config = models.get_preset(preset).build_config(400, 0, 1, 2)
        self.model = models.build_model(self.hf_config, seed=0).eval()
        self.model.save_pretrained(root)
        # transformers 5.x writes per-expert names (`mlp.experts.0.gate_proj.weight`); read them back.
        self.state = load_file(root / "model.safetensors")
        self.config: dict[str, Any] = self.hf_config.to_dict()
        self.shapes = {name: tuple(t.shape) for name, t in self.state.items()}

    def plan(self, fmt: str, layout: str | None = None) -> layouts.Plan:
        return layouts.make_plan(fmt, layout, self.shapes, self.config)

    def encode_all(self, plan: layouts.Plan) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, t in self.state.items():
            out.update(layouts.encode(plan.fmt, plan.layout, name, t, quantize=name in plan.quantized).tensors)
        return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return Tiny("tiny", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return Tiny("deepseek-tiny", tmp_path_factory.mktemp("deepseek"))


def _layer_linears(i: int, dense: bool) -> list[str]:
    """Quantized modules of a deepseek-tiny layer (q_lora_rank None: plain q_proj)."""
    attn = [f"model.layers.{i}.self_attn.{m}" for m in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
    mlps = [f"model.layers.{i}.mlp"] if dense else [f"model.layers.{i}.mlp.experts.{e}" for e in range(4)]
    if not dense:
        mlps.append(f"model.layers.{i}.mlp.shared_experts")
    return attn + [f"{m}.{p}" for m in mlps for p in ("gate_proj", "up_proj", "down_proj")]


def test_policy_on_llama_quantizes_every_decoder_linear_only(llama: Tiny) -> None:
    plan = llama.plan("fp8-block")
    expected = {
        f"model.layers.{i}.{m}.weight"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    assert plan.quantized == expected
    assert plan.ignore() == ["lm_head"]  # embeddings and norms are not Linear: never listed


def test_policy_on_deepseek_follows_the_released_fp8_checkpoint(deepseek: Tiny) -> None:
    plan = deepseek.plan("fp8-block")
    expected = {f"{m}.weight" for m in _layer_linears(0, dense=True) + _layer_linears(1, dense=False)}
    assert plan.quantized == expected
    # DeepSeek-V3 keeps kv_a_proj_with_mqa and the shared experts in FP8, the router in BF16.
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in plan.quantized
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in plan.quantized
    for kept in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.1.self_attn.kv_a_layernorm.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
    ):
        assert kept in deepseek.state and kept not in plan.quantized
    assert plan.ignore() == ["lm_head", "model.layers.1.mlp.gate"]
    ascend = deepseek.plan("int8-w8a8-dynamic", "ascend")
    assert ascend.quantized == expected - {f"model.layers.{i}.self_attn.kv_b_proj.weight" for i in range(2)}


def test_policy_mtp_layers_are_quantized_only_for_fp8() -> None:
    config = {"num_hidden_layers": 2}
    expert = "model.layers.2.mlp.experts.0.gate_proj.weight"
    assert policy.quantizable(expert, (32, 64), config, include_mtp=True)
    assert not policy.quantizable(expert, (32, 64), config)
    for bf16_in_release in ("model.layers.2.eh_proj.weight", "model.layers.2.shared_head.head.weight"):
        assert not policy.quantizable(bf16_in_release, (64, 128), config, include_mtp=True)
    assert not policy.quantizable("model.layers.0.mlp.up_proj.bias", (128,), config)
    assert not policy.quantizable("model.layers.0.mlp.gate_up_proj", (4, 64, 64), config)  # fused 3-D experts
    assert policy.keep_fp32("model.layers.1.mlp.gate.e_score_correction_bias")


def test_ascend_layout_spelled_out(deepseek: Tiny) -> None:
    # vllm-ascend quantization/w8a8_dynamic.py (AscendW8A8DynamicLinearMethod): weight int8
    # [out, in]; weight_scale and weight_offset [out, 1] in params_dtype. modelslim_config.py reads
    # quant_description[prefix + ".weight"] for every layer, so every tensor needs an entry.
    plan = deepseek.plan("int8-w8a8-dynamic", "ascend")
    out = deepseek.encode_all(plan)
    table = {name: (t.dtype, tuple(t.shape)) for name, t in out.items()}
    i8, bf16, f32 = torch.int8, torch.bfloat16, torch.float32
    expert = "model.layers.1.mlp.experts.2.down_proj"
    assert table[f"{expert}.weight"] == (i8, (64, 32))
    assert table[f"{expert}.weight_scale"] == (bf16, (64, 1))
    assert table[f"{expert}.weight_offset"] == (bf16, (64, 1))
    assert not bool(out[f"{expert}.weight_offset"].any())
    assert table["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (i8, (40, 64))
    assert table["model.layers.0.self_attn.kv_b_proj.weight"] == (bf16, (128, 32))
    assert table["model.layers.1.mlp.gate.weight"] == (bf16, (4, 64))
    assert table["model.layers.1.mlp.gate.e_score_correction_bias"] == (f32, (4,))
    assert table["lm_head.weight"] == (bf16, (400, 64))
    assert table["model.embed_tokens.weight"] == (bf16, (400, 64))

    expected: dict[str, Any] = {"version": "1.0.0", "model_quant_type": Q, "group_size": 0}
    expected |= {"model.embed_tokens.weight": F, "model.norm.weight": F, "lm_head.weight": F}
    for i in range(2):
        for leaf in ("input_layernorm", "post_attention_layernorm", "self_attn.kv_a_layernorm", "self_attn.kv_b_proj"):
            expected[f"model.layers.{i}.{leaf}.weight"] = F
        for module in _layer_linears(i, dense=i == 0):
            if not module.endswith("kv_b_proj"):
                expected |= {f"{module}.weight": Q, f"{module}.weight_scale": Q, f"{module}.weight_offset": Q}
    expected |= {"model.layers.1.mlp.gate.weight": F, "model.layers.1.mlp.gate.e_score_correction_bias": F}
    description = layouts.extra_files(plan)[layouts.QUANT_DESCRIPTION_NAME]
    assert description == expected
    assert set(description) - {"version", "model_quant_type", "group_size"} == set(out)
    config = layouts.convert_config(plan, {**deepseek.config, "quantization_config": {"quant_method": "fp8"}})
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"


def test_compressed_tensors_configs_spelled_out(deepseek: Tiny) -> None:
    # compressed-tensors quant_scheme.py preset INT8_W8A8 / quant_args.py QuantizationArgs fields;
    # vLLM compressed_tensors.py: W8A8 int needs an activation format ("int-quantized"), int8
    # weight-only needs "pack-quantized" (CompressedTensorsWNA16). MoE routers are Linear-like for
    # compressed-tensors (quant_config.py get_vllm_module_type), so they are listed in `ignore`.
    weights = {
        "actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
        "observer": "minmax", "observer_kwargs": {}, "strategy": "channel", "symmetric": True, "type": "int",
    }  # fmt: skip
    tokens = {**weights, "dynamic": True, "observer": None, "strategy": "token"}

    def expected(inputs: dict[str, Any] | None, storage: str) -> dict[str, Any]:
        group = {"input_activations": inputs, "output_activations": None, "targets": ["Linear"], "weights": weights}
        return {
            "config_groups": {"group_0": group},
            "format": storage,
            "global_compression_ratio": None,
            "ignore": ["lm_head", "model.layers.1.mlp.gate"],
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
        }

    w8a8 = deepseek.plan("int8-w8a8-dynamic", "compressed-tensors")
    assert layouts.convert_config(w8a8, deepseek.config)["quantization_config"] == expected(tokens, "int-quantized")
    w8a16 = deepseek.plan("int8-w8a16")
    assert layouts.convert_config(w8a16, deepseek.config)["quantization_config"] == expected(None, "pack-quantized")

    # Tensors: W8A8 = int8 weight + float32 [out, 1] scale, no zero point (symmetric);
    # W8A16 = int32 weight_packed [out, ceil(in/4)] + scale in the model dtype + int64 weight_shape.
    module = "model.layers.0.mlp.down_proj"
    out = deepseek.encode_all(w8a8)
    assert (out[f"{module}.weight"].dtype, out[f"{module}.weight_scale"].dtype) == (torch.int8, torch.float32)
    assert out[f"{module}.weight_scale"].shape == (64, 1) and f"{module}.weight_zero_point" not in out
    out = deepseek.encode_all(w8a16)
    assert f"{module}.weight" not in out
    assert (out[f"{module}.weight_packed"].dtype, out[f"{module}.weight_packed"].shape) == (torch.int32, (64, 32))
    assert (out[f"{module}.weight_scale"].dtype, out[f"{module}.weight_scale"].shape) == (torch.bfloat16, (64, 1))
    assert out[f"{module}.weight_shape"].dtype == torch.int64 and out[f"{module}.weight_shape"].tolist() == [64, 128]


def test_fp8_layout_both_ways(deepseek: Tiny) -> None:
    plan = deepseek.plan("fp8-block")
    out = deepseek.encode_all(plan)
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"
    assert out[name].dtype == torch.float8_e4m3fn and out[name].shape == (32, 64)
    assert out[name + "_scale_inv"].dtype == torch.float32 and out[name + "_scale_inv"].shape == (1, 1)
    assert out["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert out["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    config = layouts.convert_config(plan, deepseek.config)
    # DeepSeek-V3 README_WEIGHTS.md "FP8 Configuration", key for key.
    assert config["quantization_config"] == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]
    }  # fmt: skip
    assert layouts.detect_format(config) == ("fp8-block", "deepseek-v3")
    # Dequantize: decode every group, re-encode as bf16; scales and quantization_config disappear.
    groups = layouts.group_names(list(out))
    assert groups[name] == [name, name + "_scale_inv"]
    back = layouts.make_plan("bf16", None, {n: out[g[0]].shape for n, g in groups.items()}, config)
    bf16 = {}
    for src, members in groups.items():
        t = layouts.decode("fp8-block", None, src, {m: out[m] for m in members}, dtype=torch.bfloat16)
        bf16.update(layouts.encode("bf16", None, src, t, quantize=False).tensors)
    assert set(bf16) == set(deepseek.state) and not any(n.endswith("_scale_inv") for n in bf16)
    assert bf16[name].dtype == torch.bfloat16
    assert "quantization_config" not in layouts.convert_config(back, config)


@pytest.mark.parametrize(("fmt", "layout"), ALL_LAYOUTS)
def test_every_layout_round_trips_a_real_model(deepseek: Tiny, fmt: str, layout: str) -> None:
    plan = deepseek.plan(fmt, layout)
    encoded = {
        name: layouts.encode(fmt, layout, name, t, quantize=name in plan.quantized)
        for name, t in deepseek.state.items()
    }
    out = {k: v for enc in encoded.values() for k, v in enc.tensors.items()}
    assert list(out) == plan.all_outputs()
    decoded = {
        src: layouts.decode(fmt, layout, src, {m: out[m] for m in members})
        for src, members in layouts.group_names(list(out)).items()
    }
    assert set(decoded) == set(deepseek.state)
    # The recorded error is the error of what decode returns.
    for name, enc in encoded.items():
        assert enc.error is not None and enc.error.max_abs == pytest.approx(
            float((decoded[name] - deepseek.state[name]).abs().max()), abs=1e-9
        )
    model = models.model_class(deepseek.hf_config).from_pretrained(
        None, config=deepseek.hf_config, state_dict=decoded, dtype=torch.float32
    )
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = deepseek.model(ids).logits, model.eval()(ids).logits
    rel = float((got - ref).norm() / ref.norm())
    limit = {"fp32": 0.0, "fp16": 2e-3, "bf16": 1e-2, "fp8-block": 0.08}.get(fmt, 0.03)
    assert rel <= limit, rel
    assert rel > 0 or fmt == "fp32"


def test_decode_rejects_incomplete_or_foreign_tensors(deepseek: Tiny) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    w = deepseek.state[name]
    fp8 = layouts.encode("fp8-block", None, name, w, quantize=True).tensors
    with pytest.raises(CrosschipError, match="no _scale_inv"):
        layouts.decode("fp8-block", None, name, {name: fp8[name]})
    ct = layouts.encode("int8-w8a8-dynamic", "compressed-tensors", name, w, quantize=True).tensors
    zp = {**ct, "model.layers.0.mlp.up_proj.weight_zero_point": torch.zeros(128, 1, dtype=torch.int8)}
    with pytest.raises(CrosschipError, match="unexpected companions.*weight_zero_point"):
        layouts.decode("int8-w8a8-dynamic", "compressed-tensors", name, zp)
    asc = layouts.encode("int8-w8a8-dynamic", "ascend", name, w, quantize=True).tensors
    asc["model.layers.0.mlp.up_proj.weight_offset"] = torch.ones(128, 1, dtype=torch.bfloat16)
    with pytest.raises(CrosschipError, match="weight_offset is not zero"):
        layouts.decode("int8-w8a8-dynamic", "ascend", name, asc)
    packed = layouts.encode("int8-w8a16", None, name, w, quantize=True).tensors
    del packed["model.layers.0.mlp.up_proj.weight_shape"]
    with pytest.raises(CrosschipError, match="missing .*weight_shape"):
        layouts.decode("int8-w8a16", None, name, packed)


def test_fp16_encode_audits_and_refuses_overflow_unless_clamped() -> None:
    t = torch.tensor([[1e5, 1.0], [1e-9, -2.0]])
    with pytest.raises(CrosschipError, match=r"model\.x\.weight"):
        layouts.encode("fp16", None, "model.x.weight", t, quantize=False)
    enc = layouts.encode("fp16", None, "model.x.weight", t, quantize=False, clamp=True)
    assert enc.clamped and enc.audit is not None
    assert (enc.audit.overflow, enc.audit.underflow_to_zero) == (1, 1)
    assert enc.tensors["model.x.weight"].tolist() == [[65504.0, 1.0], [0.0, -2.0]]
    ok = layouts.encode("int8-w8a8-dynamic", "ascend", "model.y.weight", t[1:], quantize=False, dtype=torch.float16)
    assert not ok.clamped and ok.audit is not None and ok.audit.ok


def test_format_and_layout_choices_are_validated() -> None:
    assert layouts.resolve_layout("int8-w8a8-dynamic") == "compressed-tensors"
    assert layouts.resolve_layout("int8-w8a8-dynamic", "ascend") == "ascend"
    with pytest.raises(CrosschipError, match="no layout 'ascend'") as excinfo:
        layouts.resolve_layout("int8-w8a16", "ascend")
    assert excinfo.value.fix == "use --layout compressed-tensors (or omit it)"
    with pytest.raises(CrosschipError, match="unknown format 'int4'"):
        layouts.resolve_layout("int4")
    assert layouts.resolve_dtype("int8-w8a8-dynamic", torch.float16) == torch.float16
    with pytest.raises(CrosschipError, match="stores torch.bfloat16"):
        layouts.resolve_dtype("bf16", torch.float16)
    with pytest.raises(CrosschipError, match="does not quantize"):
        layouts.encode("bf16", None, "model.layers.0.mlp.up_proj.weight", torch.ones(2, 2), quantize=True)


def test_detect_format_reads_configs_and_descriptions() -> None:
    assert layouts.detect_format({"dtype": "bfloat16"}) == ("bf16", "hf")
    assert layouts.detect_format({"torch_dtype": "float16"}) == ("fp16", "hf")
    ct = {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized"}}
    assert layouts.detect_format(ct) == ("int8-w8a16", "compressed-tensors")
    ct["quantization_config"]["format"] = "int-quantized"
    assert layouts.detect_format(ct) == ("int8-w8a8-dynamic", "compressed-tensors")
    assert layouts.detect_format({}, {"model_quant_type": Q}) == ("int8-w8a8-dynamic", "ascend")
    with pytest.raises(CrosschipError, match="W4A8_DYNAMIC"):
        layouts.detect_format({}, {"model_quant_type": "W4A8_DYNAMIC"})
    with pytest.raises(CrosschipError, match="quant_method='awq'"):
        layouts.detect_format({"quantization_config": {"quant_method": "awq"}})
