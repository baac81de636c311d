"""Shipped target profiles: all load, encode the sourced facts, and bad files are rejected by field."""

from __future__ import annotations

from pathlib import Path

import pytest

from crosschip.errors import CrosschipError
from crosschip.targets import (
    DTYPES,
    SERVING_FORMATS,
    TargetProfile,
    list_targets,
    load_target,
    load_target_file,
)
from targetkit import PROFILE_TOML

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


def test_to_dict_round_trips_through_a_file(tmp_path: Path) -> None:
    profile = load_target("ascend-910b")
    data = profile.to_dict()
    assert data["matmul_dtypes"] == list(profile.matmul_dtypes)
    assert data["sources"][0] == {"title": profile.sources[0].title, "url": profile.sources[0].url}
    lines = []
    for key, value in data.items():
        if key == "sources":
            continue
        if isinstance(value, bool):
            lines.append(f"{key} = {str(value).lower()}")
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(repr(v).replace(chr(39), chr(34)) for v in value)}]")
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        else:
            lines.append(f"{key} = {value}")
    for source in data["sources"]:
        lines += ["[[sources]]", f'title = "{source["title"]}"', f'url = "{source["url"]}"']
    path = tmp_path / "copy.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_target_file(path) == profile


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
    text = GOOD.split("[[sources]]")[0] + "sources = []\n"
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
    for needed in SERVING_FORMATS.values():
        assert set(needed) <= set(DTYPES)
