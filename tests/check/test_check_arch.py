"""Architecture check against the serving_architectures each target profile records (with source and date)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from crosschip.check.arch import check_architecture, transformers_causal_lms
from crosschip.errors import CrosschipError
from crosschip.targets import ANY_TRANSFORMERS_CAUSAL_LM, list_targets, load_target, load_target_file
from targetkit import write_profile


def _config(arch: str | None) -> dict:
    return {"architectures": [arch]} if arch else {"model_type": "llama"}


def test_every_shipped_profile_records_its_list_source_and_date() -> None:
    for name in list_targets():
        p = load_target(name)
        assert p.serving_architectures, name
        assert p.serving_architectures_source.startswith("https://"), name
        assert dt.date.fromisoformat(p.serving_architectures_date) <= dt.date.today(), name


@pytest.mark.parametrize(
    ("arch", "target", "status"),
    [
        ("DeepseekV3ForCausalLM", "nvidia-h100", "PASS"),
        ("DeepseekV3ForCausalLM", "ascend-910b", "PASS"),
        ("LlamaForCausalLM", "ascend-910c", "PASS"),
        ("Qwen2ForCausalLM", "ascend-310p", "PASS"),
        ("LlamaForCausalLM", "ascend-310p", "WARN"),  # vllm-ascend supports it on A2/A3, not documented on 310P
        ("GPT2LMHeadModel", "nvidia-h100", "PASS"),
        ("GPT2LMHeadModel", "ascend-910b", "FAIL"),
        ("LlamaForCausalLM", "cpu", "PASS"),
        ("NotARealModelForCausalLM", "cpu", "FAIL"),
        (None, "nvidia-h100", "WARN"),
    ],
)
def test_architecture_status(arch: str | None, target: str, status: str) -> None:
    row = check_architecture(_config(arch), load_target(target))
    assert row.status == status, row.reason
    if status == "FAIL":
        assert row.fix
    if arch and status != "WARN":
        assert load_target(target).serving_architectures_date in row.reason


def test_fail_names_targets_that_do_serve_it() -> None:
    row = check_architecture(_config("GPT2LMHeadModel"), load_target("ascend-910b"))
    assert "nvidia-h100" in row.fix and "cpu" in row.fix and "ascend-910c" not in row.fix


def test_cpu_accepts_what_auto_model_for_causal_lm_maps() -> None:
    assert load_target("cpu").serving_architectures == (ANY_TRANSFORMERS_CAUSAL_LM,)
    assert {"LlamaForCausalLM", "DeepseekV3ForCausalLM"} <= transformers_causal_lms()


def test_profile_without_a_list_warns(tmp_path: Path) -> None:
    path = write_profile(tmp_path)
    row = check_architecture(_config("LlamaForCausalLM"), load_target_file(path))
    assert row.status == "WARN" and "lists no serving architectures" in row.reason


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ('serving_architectures = ["LlamaForCausalLM"]\nserving_architectures_date = "2026-11-29"\n',
         "serving_architectures_source"),
        ('serving_architectures = ["LlamaForCausalLM"]\nserving_architectures_source = "https://x.org"\n'
         'serving_architectures_date = "last week"\n', "serving_architectures_date"),
        ('serving_architectures = ["Llama ForCausalLM"]\n', "serving_architectures"),
        ('serving_architectures = "LlamaForCausalLM"\n', "serving_architectures"),
        ('serving_architectures = ["A", "A"]\nserving_architectures_source = "https://x.org"\n'
         'serving_architectures_date = "2026-11-29"\n', "serving_architectures"),
    ],
)
def test_bad_architecture_fields_are_refused_by_name(tmp_path: Path, extra: str, field: str) -> None:
    path = write_profile(tmp_path, extra)
    with pytest.raises(CrosschipError, match=field):
        load_target_file(path)


def test_a_complete_custom_list_loads(tmp_path: Path) -> None:
    extra = ('serving_architectures = ["LlamaForCausalLM"]\nserving_architectures_unverified = ["Qwen2ForCausalLM"]\n'
             'serving_architectures_source = "https://example.org/models"\nserving_architectures_date = "2026-11-01"\n')
    path = write_profile(tmp_path, extra)
    profile = load_target_file(path)
    assert check_architecture(_config("Qwen2ForCausalLM"), profile).status == "WARN"
    assert check_architecture(_config("LlamaForCausalLM"), profile).status == "PASS"
