"""Shipped target profiles: all load, encode the sourced facts, and bad files are rejected by field."""

from __future__ import annotations

from pathlib import Path

import pytest

from crosschip.errors import CrosschipError
from crosschip.targets import (
    DTYPES,
    SERVING_FORMATS,
    STACK_NAMES,
    TargetProfile,
    list_targets,
    load_target,
    load_target_file,
)
from crosschip.targets.stacks import FORMAT_LAYOUTS, RULES
from targetkit import PROFILE_TOML, write_profile

EXPECTED = {"cpu", "nvidia-h100", "nvidia-h200", "nvidia-h20", "ascend-910b", "ascend-910c", "ascend-310p"}
HOPPER = ("nvidia-h100", "nvidia-h200", "nvidia-h20")

GOOD = PROFILE_TOML


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "my-chip.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_all_seven_targets_load() -> None:
    assert set(list_targets()) == EXPECTED
    for name in list_targets():
        profile = load_target(name)
        assert isinstance(profile, TargetProfile)
        assert profile.name == name
        assert profile.sources and all(s.url.startswith("https://") for s in profile.sources)
        assert profile.can_serve(profile.default_serving_format)
        assert set(profile.training_dtypes) <= set(profile.matmul_dtypes)


def test_ascend_910b_and_910c_have_bf16_but_no_fp8() -> None:
    for name in ("ascend-910b", "ascend-910c"):
        profile = load_target(name)
        assert profile.supports("bf16") and profile.supports("fp16") and profile.supports("int8")
        assert not profile.supports("fp8_e4m3")
        assert not profile.fp8_block_scaling
        assert not profile.can_serve("fp8-block")
        assert profile.overflow_mode == "ieee"
        assert profile.default_serving_format == "bf16"
        assert profile.memory_per_device_gib == 64


def test_ascend_310p_fp16_only_and_saturates() -> None:
    profile = load_target("ascend-310p")
    assert not profile.supports("bf16")
    assert profile.supports("fp16") and profile.supports("int8")
    assert not profile.supports("fp8_e4m3")
    assert profile.overflow_mode == "saturation"
    assert profile.default_serving_format == "fp16"
    assert not profile.can_serve("bf16")
    assert profile.can_serve("int8-w8a16")


def test_hopper_has_fp8_block_scaling() -> None:
    memory = {"nvidia-h100": 80, "nvidia-h200": 141, "nvidia-h20": 96}
    for name in HOPPER:
        profile = load_target(name)
        assert profile.device_type == "cuda"
        assert profile.supports("fp8_e4m3") and profile.fp8_block_scaling
        assert profile.can_serve("fp8-block")
        assert profile.default_serving_format == "bf16"  # fp8 allowed, never the default
        assert profile.memory_per_device_gib == memory[name]


def test_cpu_target() -> None:
    profile = load_target("cpu")
    assert profile.device_type == "cpu"
    assert profile.memory_per_device_gib == 0
    assert profile.default_serving_format in ("fp32", "bf16")
    assert not profile.supports("fp8_e4m3")


def test_supports_rejects_unknown_dtype_names() -> None:
    with pytest.raises(CrosschipError):
        load_target("cpu").supports("float8")
    with pytest.raises(CrosschipError):
        load_target("cpu").can_serve("gguf")


def test_a_copy_of_a_shipped_file_loads_equal_and_to_dict_is_json(tmp_path: Path) -> None:
    import json
    from importlib import resources

    for name in list_targets():
        copy = tmp_path / f"{name}.toml"
        copy.write_bytes(resources.files("crosschip.targets").joinpath(f"{name}.toml").read_bytes())
        profile = load_target(name)
        assert load_target_file(copy) == profile
        data = json.loads(json.dumps(profile.to_dict()))
        assert data["serving_stacks"] == [s["name"] for s in data["stacks"]] == list(profile.serving_stacks)
        assert data["sources"][0] == {"title": profile.sources[0].title, "url": profile.sources[0].url}


def test_good_custom_file_loads(tmp_path: Path) -> None:
    profile = load_target_file(_write(tmp_path, GOOD))
    assert profile.name == "my-chip" and profile.memory_per_device_gib == 32.0
    assert profile.matmul_dtypes == ("fp16", "int8")


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ('matmul_dtypes = ["fp16", "int8"]', 'matmul_dtypes = ["fp16", "fp8"]', "matmul_dtypes"),
        ('overflow_mode = "ieee"', 'overflow_mode = "clamp"', "overflow_mode"),
        ('overflow_mode = "ieee"\n', "", "overflow_mode"),
        ('device_type = "npu"\n', "", "device_type"),
        ("memory_per_device_gib = 32", 'memory_per_device_gib = "32"', "memory_per_device_gib"),
        ("memory_per_device_gib = 32", "memory_per_device_gib = true", "memory_per_device_gib"),
        ('training_dtypes = ["fp16"]', 'training_dtypes = ["bf16"]', "training_dtypes"),
        ('default_serving_format = "fp16"', 'default_serving_format = "bf16"', "default_serving_format"),
        ('default_serving_format = "fp16"', 'default_serving_format = "fp8-block"', "default_serving_format"),
        ("fp8_block_scaling = false", "fp8_block_scaling = true", "fp8_block_scaling"),
        ('device_type = "npu"', 'device_type = "tpu"', "device_type"),
        ('url = "https://example.org/doc"', 'url = "example.org/doc"', "sources"),
        ('name = "vllm-ascend"', 'name = "tgi"', "name"),
        ('formats = ["fp16", "int8-w8a8-dynamic/ascend"]', 'formats = ["fp16", "int8-w8a8-dynamic/gguf"]', "formats"),
        ('formats = ["fp16", "int8-w8a8-dynamic/ascend"]', 'formats = []', "formats"),
        ('rules = ["formats"]', 'rules = ["speed"]', "sources"),
        ('rules = ["formats"]\n', "", "sources"),
        ('url = "https://example.org/stack"', 'url = "ftp://example.org/stack"', "sources"),
        ('name = "my-chip"', 'name = "my-chip"\nmatmul_dtype = ["fp16"]', "matmul_dtype"),
    ],
)
def test_bad_file_is_rejected_naming_the_field(tmp_path: Path, old: str, new: str, field: str) -> None:
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(CrosschipError) as err:
        load_target_file(path)
    assert f"'{field}'" in err.value.problem
    assert str(path) in err.value.problem
    assert err.value.fix


def test_empty_sources_rejected(tmp_path: Path) -> None:
    text = GOOD.split("[[sources]]")[0] + "sources = []\n\n[[stacks]]" + GOOD.split("[[stacks]]", 1)[1]
    with pytest.raises(CrosschipError) as err:
        load_target_file(_write(tmp_path, text))
    assert "'sources'" in err.value.problem


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CrosschipError) as err:
        load_target_file(_write(tmp_path, "name = \n"))
    assert "not valid TOML" in err.value.problem
    with pytest.raises(CrosschipError):
        load_target_file(tmp_path / "absent.toml")


def test_unknown_target_lists_known_ones() -> None:
    with pytest.raises(CrosschipError) as err:
        load_target("nvidia-b200")
    for name in EXPECTED:
        assert name in err.value.fix


def test_constants_are_consistent() -> None:
    from crosschip.formats.layouts import LAYOUTS

    for needed in SERVING_FORMATS.values():
        assert set(needed) <= set(DTYPES)
    assert FORMAT_LAYOUTS == LAYOUTS  # spelled out in targets/stacks.py so that loading a profile stays light


def test_every_shipped_stack_is_known_and_cites_a_source_for_each_rule_it_sets() -> None:
    for name in list_targets():
        profile = load_target(name)
        assert profile.serving_stacks and set(profile.serving_stacks) <= set(STACK_NAMES), name
        for stack in profile.stacks:
            data = stack.to_dict()
            set_rules = {"formats", "architectures"} if stack.architectures else {"formats"}
            set_rules |= {r for r in RULES if r not in ("formats", "architectures", "mla") and data[r]}
            for rule in set_rules:
                assert stack.source_refs(rule), (name, stack.name, rule)
            assert all(s.ref.startswith("https://") or (Path(__file__).parents[1] / s.ref).is_file()
                       for s in stack.sources), (name, stack.name)


def test_stacks_record_what_each_engine_runs() -> None:
    cpu = load_target("cpu")
    assert cpu.serving_stacks == ("vllm", "transformers")  # vLLM first: `check --target cpu` applies its rules
    vllm = cpu.stack("vllm")
    assert vllm.format_status("int8-w8a16", "compressed-tensors") == "no"  # no CPU W8A16 int8 kernel
    assert vllm.format_status("int8-w8a8-dynamic", "compressed-tensors") == "yes"
    assert vllm.format_status("int8-w8a8-dynamic", "ascend") == "no"
    assert vllm.format_cpu_flags["fp8-block"] == ("amx_tile",)
    assert 16 not in vllm.attention_head_sizes and 64 in vllm.attention_head_sizes
    assert cpu.stack("transformers").format_status("int8-w8a16", "compressed-tensors") == "yes"
    for name in ("ascend-910b", "ascend-910c"):
        asc = load_target(name).stack("vllm-ascend")
        assert asc.format_status("fp8-block", "deepseek-v3") == "no"
        assert asc.format_status("int8-w8a8-dynamic", "ascend") == "yes"
        assert asc.format_status("fp32", "hf") == "unverified"
    p310 = load_target("ascend-310p").stack("vllm-ascend")
    assert p310.format_status("bf16", "hf") == "no" and not p310.mla
    assert load_target("ascend-310p").stack("mindie").format_status("fp16", "hf") == "yes"
    for name in HOPPER:
        stack = load_target(name).stack()
        assert stack.name == "vllm" and stack.fp8_block == (128, 128)
        assert stack.format_status("int8-w8a8-dynamic", "ascend") == "no"


def test_unknown_stack_lists_the_profiles_stacks() -> None:
    with pytest.raises(CrosschipError) as err:
        load_target("ascend-910b").stack("vllm")
    assert "ascend-910b has no serving stack 'vllm'" in err.value.problem
    assert "vllm-ascend" in err.value.fix and "mindie" in err.value.fix


def test_old_profile_fields_are_refused_with_the_way_to_move_them(tmp_path: Path) -> None:
    path = write_profile(tmp_path, 'serving_stacks = ["vllm-ascend"]\n')
    with pytest.raises(CrosschipError, match="'serving_stacks' is replaced by \\[\\[stacks\\]\\] tables"):
        load_target_file(path)


@pytest.mark.parametrize(
    ("stack_extra", "field"),
    [
        ("fp8_block = [128]\n", "fp8_block"),
        ("fp8_block = [128, 128]\n", "sources"),  # a rule with no source backing it
        ("attention_head_sizes = [64, 0]\n", "attention_head_sizes"),
        ("mla = 1\n", "mla"),
        ('format_cpu_flags = { "gguf" = ["amx_tile"] }\n', "format_cpu_flags"),
        ('architectures = ["LlamaForCausalLM"]\n', "architectures_date"),
        ('speed = "fast"\n', "speed"),
    ],
)
def test_bad_stack_fields_are_refused_by_name(tmp_path: Path, stack_extra: str, field: str) -> None:
    with pytest.raises(CrosschipError) as err:
        load_target_file(write_profile(tmp_path, stack_extra=stack_extra))
    assert f"stack 'vllm-ascend' field '{field}'" in err.value.problem and err.value.fix
