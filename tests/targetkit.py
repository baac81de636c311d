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
serving_stacks = ["vllm-ascend"]

[[sources]]
title = "a source"
url = "https://example.org/doc"
"""


def write_profile(directory: Path, extra: str = "") -> Path:
    """PROFILE_TOML with `extra` TOML lines before its [[sources]], as directory/my-chip.toml."""
    path = directory / "my-chip.toml"
    path.write_text(PROFILE_TOML.replace("\n[[sources]]", extra + "\n[[sources]]", 1), encoding="utf-8")
    return path
