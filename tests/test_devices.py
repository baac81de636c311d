"""crosschip.devices on this (CPU-only) machine: parsing, resolution, precisions, RNG, listing."""

from __future__ import annotations

import os

import pytest
import torch

from crosschip import devices
from crosschip.devices import DeviceSpec
from crosschip.errors import CrosschipError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("cpu", DeviceSpec("cpu", None)),
        ("auto", DeviceSpec("auto", None)),
        ("cuda", DeviceSpec("cuda", None)),
        ("cuda:1", DeviceSpec("cuda", 1)),
        ("npu:7", DeviceSpec("npu", 7)),
        ("xpu:0", DeviceSpec("xpu", 0)),
        ("mps", DeviceSpec("mps", None)),
        (" CUDA:2 ", DeviceSpec("cuda", 2)),
    ],
)
def test_parse_device_valid(spec: str, expected: DeviceSpec) -> None:
    assert devices.parse_device(spec) == expected


def test_device_spec_str_round_trips() -> None:
    assert str(devices.parse_device("npu:3")) == "npu:3"
    assert str(devices.parse_device("mps")) == "mps"


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cuda:x", "cpu:0", "mps:0", "auto:1", "", "tpu"])
def test_parse_device_invalid_names_valid_forms(spec: str) -> None:
    with pytest.raises(CrosschipError) as err:
        devices.parse_device(spec)
    assert "cuda:N" in err.value.fix and "npu:N" in err.value.fix and "auto" in err.value.fix


def test_resolve_cpu_and_auto_on_this_machine() -> None:
    assert devices.resolve_device("cpu") == CPU
    auto = devices.resolve_device("auto")
    # 'auto' must pick an accelerator only if one is really present.
    expected = next((k for k in ("cuda", "npu", "xpu", "mps") if devices.is_available(k)), "cpu")
    assert auto.type == expected


@pytest.mark.skipif(devices.is_available("cuda"), reason="this machine has CUDA")
def test_absent_cuda_is_a_crosschip_error_with_fix() -> None:
    with pytest.raises(CrosschipError) as err:
        devices.resolve_device("cuda")
    assert "device cuda is not available on this machine" in err.value.problem
    assert torch.__version__ in err.value.problem
    assert "--device cpu" in err.value.fix and "CUDA build" in err.value.fix


@pytest.mark.skipif(devices.is_available("npu"), reason="this machine has an NPU")
def test_absent_npu_does_not_crash() -> None:
    assert devices.is_available("npu") is False
    with pytest.raises(CrosschipError) as err:
        devices.resolve_device("npu:0")
    assert "torch_npu" in err.value.fix


def test_is_available_unknown_kind_is_false() -> None:
    assert devices.is_available("tpu") is False
    assert devices.is_available("cpu") is True


def test_cpu_precisions_follow_isa_flags() -> None:
    precisions = devices.train_precisions(CPU)
    assert precisions[:2] == ["fp32", "bf16"]
    native_fp16 = {"avx512_fp16", "amx_fp16", "asimdhp"} & set(devices.cpu_isa_flags())
    assert ("fp16" in precisions) == bool(native_fp16)


def test_check_precision_accepts_supported_and_rejects_others() -> None:
    devices.check_precision(CPU, "fp32")
    devices.check_precision(CPU, "bf16")
    with pytest.raises(CrosschipError) as err:
        devices.check_precision(CPU, "fp8")
    assert "fp32, bf16, fp16" in err.value.fix
    if "fp16" not in devices.train_precisions(CPU):
        with pytest.raises(CrosschipError) as err:
            devices.check_precision(CPU, "fp16")
        assert err.value.fix == "use --precision bf16 or fp32"


def test_torch_dtype_mapping() -> None:
    assert devices.torch_dtype("fp32") is torch.float32
    assert devices.torch_dtype("bf16") is torch.bfloat16
    assert devices.torch_dtype("fp16") is torch.float16
    with pytest.raises(CrosschipError):
        devices.torch_dtype("float32")


def test_autocast_bf16_really_computes_in_bf16_on_cpu() -> None:
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with devices.autocast(CPU, "bf16"):
        out = a @ b
    assert out.dtype == torch.bfloat16
    with devices.autocast(CPU, "fp32"):
        out32 = a @ b
    assert out32.dtype == torch.float32
    # bf16 keeps ~3 significant digits: close to, but not bit-identical with, the fp32 product.
    assert torch.allclose(out.float(), out32, rtol=0.05, atol=0.1)


def test_grad_scaler_only_for_fp16() -> None:
    assert devices.make_grad_scaler(CPU, "fp32") is None
    assert devices.make_grad_scaler(CPU, "bf16") is None
    assert isinstance(devices.make_grad_scaler(CPU, "fp16"), torch.amp.GradScaler)


def test_rng_round_trip_reproduces_numbers() -> None:
    state = devices.get_rng_state(CPU)
    assert set(state) == {"cpu"}
    first = torch.rand(5)
    torch.rand(100)  # advance the generator further
    devices.set_rng_state(CPU, state)
    assert torch.equal(torch.rand(5), first)


def test_set_rng_state_rejects_bad_state() -> None:
    with pytest.raises(CrosschipError):
        devices.set_rng_state(CPU, {})
    with pytest.raises(CrosschipError):
        devices.set_rng_state(CPU, {"cpu": torch.zeros(3, dtype=torch.float32)})


def test_memory_info_on_cpu() -> None:
    info = devices.memory_info(CPU)
    assert set(info) == {"total_bytes", "allocated_bytes", "peak_allocated_bytes"}
    assert info["total_bytes"] > info["allocated_bytes"] > 0
    assert info["peak_allocated_bytes"] is None or info["peak_allocated_bytes"] >= info["allocated_bytes"]


def test_synchronize_cpu_is_noop() -> None:
    devices.synchronize(CPU)


def test_fused_adamw_supported_is_bool() -> None:
    result = devices.fused_adamw_supported(CPU)
    assert isinstance(result, bool)
    assert devices.fused_adamw_supported(CPU) is result  # cached


def test_list_devices_has_cpu_with_cores_and_flags() -> None:
    entries = devices.list_devices()
    cpu = entries[0]
    assert cpu["device"] == "cpu"
    assert cpu["cores"]["logical"] == os.cpu_count()
    assert cpu["cores"]["physical"] is None or 1 <= cpu["cores"]["physical"] <= os.cpu_count()
    assert isinstance(cpu["isa_flags"], list)
    assert cpu["isa_flags"] == devices.cpu_isa_flags()
    assert cpu["memory_bytes"] > 0 and cpu["name"]
    assert cpu["train_precisions"] == devices.train_precisions(CPU)
    # every listed accelerator must resolve
    for entry in entries[1:]:
        assert str(devices.resolve_device(entry["device"])) == entry["device"]


def test_cpu_isa_flags_match_proc_cpuinfo() -> None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    line = next((ln for ln in text.splitlines() if ln.lower().startswith(("flags", "features"))), "")
    present = set(line.partition(":")[2].split())
    flags = devices.cpu_isa_flags()
    assert set(flags) <= present
    for flag in ("avx2", "avx512f", "avx512_bf16"):
        if flag in present:
            assert flag in flags
