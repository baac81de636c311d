"""A valid custom target profile for tests that write their own (targets, check)."""

from __future__ import annotations

from pathlib import Path

PROFILE_TOML = """\
name = "my-chip"
description = "test chip"
device_type = "npu"
memory_per_device_gib = 32
matmul_dtypes = ["fp16", "int8"]
training_dtypes = ["fp16"]
fp8_block_scaling = false
overflow_mode = "ieee"
default_serving_format = "fp16"

[[sources]]
title = "a source"
url = "https://example.org/doc"

[[stacks]]
name = "vllm-ascend"
formats = ["fp16", "int8-w8a8-dynamic/ascend"]

[[stacks.sources]]
title = "a stack source"
url = "https://example.org/stack"
rules = ["formats"]
"""


def write_profile(directory: Path, extra: str = "", stack_extra: str = "") -> Path:
    """PROFILE_TOML as directory/my-chip.toml, with `extra` TOML lines before its [[sources]] (profile fields)
    and `stack_extra` lines in its stack table (after `formats`)."""
    text = PROFILE_TOML.replace("\n[[sources]]", extra + "\n[[sources]]", 1)
    text = text.replace('"int8-w8a8-dynamic/ascend"]\n', '"int8-w8a8-dynamic/ascend"]\n' + stack_extra, 1)
    path = directory / "my-chip.toml"
    path.write_text(text, encoding="utf-8")
    return path
