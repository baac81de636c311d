"""Architecture check against the architectures each serving stack of a target profile records (source, date)."""

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


def test_every_shipped_default_stack_records_its_list_source_and_date() -> None:
    for name in list_targets():
        stack = load_target(name).stack()
        assert stack.architectures, name
        assert stack.source_refs("architectures")[0].startswith("https://"), name
        assert dt.date.fromisoformat(stack.architectures_date) <= dt.date.today(), name


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
        assert load_target(target).stack().architectures_date in row.reason
        assert f"{load_target(target).stack().name} on {target}" in row.reason


def test_fail_names_targets_that_do_serve_it() -> None:
    row = check_architecture(_config("GPT2LMHeadModel"), load_target("ascend-910b"))
    assert "nvidia-h100" in row.fix and "cpu" in row.fix and "ascend-910c" not in row.fix


def test_cpu_transformers_stack_accepts_what_auto_model_for_causal_lm_maps() -> None:
    cpu = load_target("cpu")
    assert cpu.stack("transformers").architectures == (ANY_TRANSFORMERS_CAUSAL_LM,)
    assert {"LlamaForCausalLM", "DeepseekV3ForCausalLM"} <= transformers_causal_lms()
    # vLLM does not list it; crosschip serve (transformers) runs it: the FAIL points at the other stack
    arch = "BertLMHeadModel"
    assert arch in transformers_causal_lms() and arch not in cpu.stack("vllm").architectures
    row = check_architecture(_config(arch), cpu, cpu.stack("vllm"))
    assert row.status == "FAIL" and "--stack transformers" in row.fix
    assert check_architecture(_config(arch), cpu, cpu.stack("transformers")).status == "PASS"


def test_mindie_has_no_recorded_list_and_warns() -> None:
    profile = load_target("ascend-910b")
    row = check_architecture(_config("LlamaForCausalLM"), profile, profile.stack("mindie"))
    assert row.status == "WARN" and "mindie stack of ascend-910b lists no architectures" in row.reason
    assert row.details["stack"] == "mindie"


def test_profile_without_a_list_warns(tmp_path: Path) -> None:
    path = write_profile(tmp_path)
    row = check_architecture(_config("LlamaForCausalLM"), load_target_file(path))
    assert row.status == "WARN" and "lists no architectures" in row.reason


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ('architectures = ["LlamaForCausalLM"]\n', "architectures_date"),
        ('architectures = ["LlamaForCausalLM"]\narchitectures_date = "last week"\n', "architectures_date"),
        ('architectures = ["Llama ForCausalLM"]\n', "architectures"),
        ('architectures = "LlamaForCausalLM"\n', "architectures"),
        ('architectures = ["A", "A"]\narchitectures_date = "2026-11-29"\n', "architectures"),
        ('architectures = ["LlamaForCausalLM"]\narchitectures_date = "2026-11-29"\n', "sources"),  # no source
    ],
)
def test_bad_architecture_fields_are_refused_by_name(tmp_path: Path, extra: str, field: str) -> None:
    path = write_profile(tmp_path, stack_extra=extra)
    with pytest.raises(CrosschipError, match=f"field '{field}'"):
        load_target_file(path)


def test_a_complete_custom_list_loads(tmp_path: Path) -> None:
    extra = ('architectures = ["LlamaForCausalLM"]\narchitectures_unverified = ["Qwen2ForCausalLM"]\n'
             'architectures_date = "2026-11-01"\n')
    path = write_profile(tmp_path, stack_extra=extra)
    text = path.read_text(encoding="utf-8").replace('rules = ["formats"]', 'rules = ["formats", "architectures"]')
    path.write_text(text, encoding="utf-8")
    profile = load_target_file(path)
    assert check_architecture(_config("Qwen2ForCausalLM"), profile).status == "WARN"
    assert check_architecture(_config("LlamaForCausalLM"), profile).status == "PASS"


def _gemma2_config_dir(root: Path) -> Path:
    """A config-only Gemma2 directory: transformers' Gemma2 has no sdpa (softcapping)."""
    import json

    from archkit import tiny_config

    root.mkdir()
    config = tiny_config("gemma2", 400, 1, 2, 0).to_dict()
    config["architectures"] = ["Gemma2ForCausalLM"]
    (root / "config.json").write_text(json.dumps(config))
    return root


def test_load_row_names_the_attention_crosschip_builds(tmp_path: Path) -> None:
    from crosschip.check.arch import check_loadable

    row = check_loadable(_gemma2_config_dir(tmp_path / "gemma2"))
    assert row.status == "PASS" and row.details["attention"] == "eager", row.reason
    assert "Gemma2ForCausalLM does not support sdpa" in row.reason


def test_load_fails_where_crosschip_cannot_build_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before issue 14 crosschip forced sdpa: Gemma2 then could not be loaded, yet check said PASS on 910B.
    Forcing sdpa again must turn the load row, and so the verdict, into FAIL with transformers' reason."""
    import crosschip.models
    from crosschip.check.run import run_check

    monkeypatch.setattr(crosschip.models, "attention_for", lambda config: "sdpa")
    report = run_check(_gemma2_config_dir(tmp_path / "gemma2"), "ascend-910b", numerics=False)
    row = next(r for r in report.checks if r.check == "load")
    assert row.status == "FAIL" and report.verdict == "fail"
    assert "does not support an attention implementation through torch.nn.functional.scaled_dot_product_attention" \
        in row.reason and row.fix
