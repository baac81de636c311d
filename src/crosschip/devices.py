"""Device kinds, precisions and the per-device torch calls crosschip needs.

This is the only module that knows device kinds: every other module asks it instead of
writing ``torch.cuda`` or ``"cuda"``. Non-CPU calls go through ``_module(kind)`` (``torch.cuda``,
``torch.npu`` once torch_npu is imported, ``torch.xpu``, ``torch.mps``), which share one API, so the
same code path runs on NVIDIA, Ascend and Intel machines. Only the CPU branches are tested here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import torch

from crosschip.errors import CrosschipError

KINDS = ("cpu", "cuda", "npu", "mps", "xpu")
PRECISIONS = ("fp32", "bf16", "fp16")

# 'auto' prefers the accelerator most likely to be the reason the user has this machine.
_AUTO_ORDER = ("cuda", "npu", "xpu", "mps")
_INDEXED_KINDS = ("cuda", "npu", "xpu")  # mps and cpu are single devices: no ':N'
_VALID_FORMS = "auto, cpu, cuda, cuda:N, npu, npu:N, xpu, xpu:N, mps"
_DEVICE_RE = re.compile(r"^(?P<kind>[a-z]+)(?::(?P<index>\d+))?$")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Flags worth reporting: they decide whether bf16/fp16 run natively or emulated on a CPU.
_X86_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")
_ARM_FLAGS = ("asimdhp", "fphp", "bf16", "i8mm", "sve", "sve2", "sme")
_NATIVE_FP16_FLAGS = ("avx512_fp16", "amx_fp16", "asimdhp")
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")

_ASCEND_GEN1_RE = re.compile(r"^Ascend910(A|ProA|PremiumA|ProB)$")

_INSTALL_FIX = {
    "cuda": "use --device cpu or auto, or install a CUDA build of torch",
    "npu": "use --device cpu or auto, or install torch_npu and the Ascend CANN toolkit",
    "xpu": "use --device cpu or auto, or install an XPU build of torch",
    "mps": "use --device cpu or auto (MPS needs Apple silicon and a macOS build of torch)",
}


@dataclass(frozen=True)
class DeviceSpec:
    """Parsed ``--device`` value: kind is one of KINDS or 'auto'; index only for cuda/npu/xpu."""

    kind: str
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_device(spec: str) -> DeviceSpec:
    """Check the syntax of a device string (no hardware probing)."""
    text = spec.strip().lower() if isinstance(spec, str) else ""
    match = _DEVICE_RE.match(text)
    kind = match.group("kind") if match else ""
    index = match.group("index") if match else None
    valid_kind = kind == "auto" or kind in KINDS
    if not match or not valid_kind or (index is not None and kind not in _INDEXED_KINDS):
        raise CrosschipError(f"unknown device {spec!r}", fix=f"use one of: {_VALID_FORMS}")
    return DeviceSpec(kind, None if index is None else int(index))


# ---------------------------------------------------------------- availability


@functools.lru_cache(maxsize=1)
def _load_torch_npu() -> str | None:
    """Import torch_npu once; it registers Ascend as PrivateUse1 'npu'. Returns why it failed, or None."""
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        return "torch_npu is not installed"
    except (OSError, RuntimeError) as exc:  # installed, but CANN libraries missing or broken
        return f"torch_npu failed to load: {exc}"
    return None


def _module(kind: str) -> ModuleType | None:
    """The torch.<kind> device module (torch.cuda, torch.npu, ...), or None if this build lacks it."""
    if kind == "npu" and _load_torch_npu() is not None:
        return None
    return getattr(torch, kind, None)


def is_available(kind: str) -> bool:
    """True if at least one device of this kind is usable here. Never raises for absent backends."""
    if kind == "cpu":
        return True
    if kind not in KINDS:
        return False
    mod = _module(kind)
    if mod is None or not hasattr(mod, "is_available"):
        return False
    try:
        return bool(mod.is_available())
    except (RuntimeError, AssertionError):  # e.g. driver too old: treat as absent, not as a crash
        return False


def _device_count(kind: str) -> int:
    if kind in ("cpu", "mps"):
        return 1 if is_available(kind) else 0
    mod = _module(kind)
    return int(mod.device_count()) if mod is not None and is_available(kind) else 0


def _why_absent(kind: str) -> str:
    """One clause saying why a kind is missing, for the error message."""
    if kind == "npu":
        return _load_torch_npu() or "torch_npu is installed but sees no NPU"
    if kind == "mps":
        built = torch.backends.mps.is_built()
        return "MPS is built in but not available here" if built else "this torch has no MPS support"
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip}"
    elif kind == "xpu" and getattr(torch.version, "xpu", None):
        build = f"XPU {torch.version.xpu}"
    else:
        build = "cpu"
    return f"torch {torch.__version__} built for {build}; no {kind.upper()} devices"


def resolve_device(spec: str) -> torch.device:
    """Parse a device string and check the device exists here; 'auto' picks cuda > npu > xpu > mps > cpu."""
    parsed = parse_device(spec)
    if parsed.kind == "auto":
        kind = next((k for k in _AUTO_ORDER if is_available(k)), "cpu")
        parsed = DeviceSpec(kind, None)
    kind = parsed.kind
    if not is_available(kind):
        raise CrosschipError(
            f"device {kind} is not available on this machine ({_why_absent(kind)})", fix=_INSTALL_FIX[kind]
        )
    if kind in ("cpu", "mps"):
        return torch.device(kind)
    count = _device_count(kind)
    index = parsed.index if parsed.index is not None else _current_index(kind)
    if index >= count:
        raise CrosschipError(
            f"device {kind}:{index} does not exist (this machine has {count} {kind} device(s))",
            fix=f"use --device {kind}:0" + (f" .. {kind}:{count - 1}" if count > 1 else ""),
        )
    return torch.device(kind, index)


# torch.distributed backend per device kind: gloo on CPU, the vendor's collective library elsewhere.
_DIST_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl", "xpu": "xccl"}


def dist_backend(device: torch.device) -> str:
    """The process-group backend for `device` (hccl comes with torch_npu, imported by _module)."""
    backend = _DIST_BACKENDS.get(device.type)
    if backend is None:
        raise CrosschipError(f"no torch.distributed backend for {device.type}", "train on cpu, cuda or npu")
    return backend


def local_device(spec: str, local_rank: int) -> torch.device:
    """The device of a torchrun worker: an accelerator kind without an index takes the local rank's."""
    parsed = parse_device(spec)
    device = resolve_device(spec)
    if device.type in _INDEXED_KINDS and parsed.index is None:
        device = resolve_device(f"{device.type}:{local_rank}")
    if device.type in _INDEXED_KINDS:
        _module(device.type).set_device(device)  # type: ignore[union-attr]
    return device


def _current_index(kind: str) -> int:
    mod = _module(kind)
    current = getattr(mod, "current_device", None)
    return int(current()) if callable(current) else 0


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else _current_index(device.type)


# ---------------------------------------------------------------- names and CPU facts


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux
        return ""


def _cpuinfo_field(*names: str) -> str | None:
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in names and value.strip():
            return value.strip()
    return None


def cpu_isa_flags() -> list[str]:
    """ISA flags that matter for bf16/fp16/int8 speed on this CPU, from /proc/cpuinfo; [] if unknown."""
    flags = set((_cpuinfo_field("flags", "features") or "").split())
    wanted = _ARM_FLAGS if platform.machine().lower() in ("aarch64", "arm64") else _X86_FLAGS
    return [flag for flag in wanted if flag in flags]


def _cpu_name() -> str:
    name = _cpuinfo_field("model name", "hardware", "cpu model")
    return name or platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """Human name of a device, e.g. 'NVIDIA H200', 'Ascend910B3', or the CPU model."""
    if device.type == "cpu":
        return _cpu_name()
    if device.type == "mps":
        return f"Apple {platform.machine()} GPU (MPS)"
    mod = _module(device.type)
    getter = getattr(mod, "get_device_name", None)
    if not callable(getter):
        return device.type
    try:
        return str(getter(_index(device)))
    except (RuntimeError, AssertionError):
        return device.type


# ---------------------------------------------------------------- precisions


def torch_dtype(precision: str) -> torch.dtype:
    """torch dtype for a precision name (fp32, bf16, fp16)."""
    try:
        return _DTYPES[precision]
    except (KeyError, TypeError):
        raise CrosschipError(
            f"unknown precision {precision!r}", fix=f"use one of: {', '.join(PRECISIONS)}"
        ) from None


def precision_name(dtype: torch.dtype) -> str:
    """The precision name (fp32, bf16, fp16) of a torch dtype: the inverse of torch_dtype."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise CrosschipError(f"no precision name for {dtype}", fix=f"use one of: {', '.join(PRECISIONS)}")


def _cpu_precisions() -> list[str]:
    # fp32 always. bf16 always: torch's CPU autocast runs bf16 on every CPU and bf16 keeps fp32's
    # exponent range, so no loss scaling is needed; it is native (fast) only with avx512_bf16/amx_bf16,
    # elsewhere oneDNN emulates it - slower but numerically sound. fp16 only with native fp16 compute
    # (avx512_fp16, amx_fp16, Arm asimdhp): emulated fp16 is slow AND needs loss scaling for its narrow
    # range, so it buys nothing over bf16 on such CPUs.
    flags = set(cpu_isa_flags())
    native_fp16 = any(flag in flags for flag in _NATIVE_FP16_FLAGS)
    return ["fp32", "bf16"] + (["fp16"] if native_fp16 else [])


def _accelerator_bf16(device: torch.device) -> bool:
    if device.type == "npu":
        # CANN has no bf16 kernels on 310P-class (Atlas inference) chips, named 'Ascend310P3' etc. by
        # torch_npu, nor on first-generation Atlas training chips (Ascend910A/ProA/PremiumA/ProB).
        name = device_name(device)
        return "310" not in name and not _ASCEND_GEN1_RE.match(name)
    if device.type == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device=device).sum().item()
        except (RuntimeError, TypeError):
            return False
        return True
    checker = getattr(_module(device.type), "is_bf16_supported", None)
    if not callable(checker):
        return True
    try:
        # including_emulation=False: emulated bf16 on pre-Ampere GPUs is far too slow to train with.
        return bool(checker(including_emulation=False))
    except TypeError:  # older torch / other backends take no argument
        return bool(checker())


def train_precisions(device: torch.device) -> list[str]:
    """Precisions this device can train in, in PRECISIONS order."""
    if device.type == "cpu":
        return _cpu_precisions()
    supported = ["fp32", "bf16", "fp16"] if _accelerator_bf16(device) else ["fp32", "fp16"]
    return [p for p in PRECISIONS if p in supported]


def default_precision(device: torch.device) -> str:
    """The precision `--precision auto` trains in: bf16 autocast where it is native, else fp32.

    bf16 keeps fp32's exponent range (no loss scaling) and, on CPUs with avx512_bf16/AMX and on
    every modern accelerator, runs matmuls several times faster than fp32. Where bf16 is only
    emulated (older CPUs) fp32 is faster; fp16 is never the default because it needs loss scaling.
    """
    supported = train_precisions(device)
    if device.type == "cpu":
        native = any(flag in _NATIVE_BF16_FLAGS for flag in cpu_isa_flags())
        return "bf16" if native else "fp32"
    for precision in ("bf16", "fp16"):
        if precision in supported:
            return precision
    return "fp32"


def serve_precision(stored: str, device: torch.device) -> tuple[str, str]:
    """The precision `serve --dtype auto` computes in for floats stored as `stored`, and why (one line).

    On CPUs, a checkpoint runs in its stored precision where the CPU computes it natively; otherwise its
    16-bit weights are upcast to fp32, which is exact (every bf16/fp16 value is an fp32 value) and faster:
    emulated bf16 matmuls ran 1.5x (1 row) to 7x (64 rows) slower than fp32 on an AVX2 CPU here. On
    accelerators, 16-bit checkpoints keep their precision (fp16 for bf16 where bf16 is missing, e.g. Ascend
    310P) and fp32 checkpoints are served in bf16 (else fp16), as vLLM's `--dtype auto` downcasts them.
    """
    if stored not in PRECISIONS:
        raise CrosschipError(f"unknown stored precision {stored!r}", fix=f"use one of: {', '.join(PRECISIONS)}")
    if device.type == "cpu":
        flags = set(cpu_isa_flags())
        native = {"fp32": True, "bf16": bool(flags & set(_NATIVE_BF16_FLAGS)),
                  "fp16": bool(flags & set(_NATIVE_FP16_FLAGS))}[stored]
        if native:
            return stored, f"{stored} weights, computed natively by this CPU"
        return "fp32", f"{stored} weights upcast to fp32 (exact): this CPU has no native {stored} compute"
    half = "bf16" if _accelerator_bf16(device) else "fp16"
    if stored == "fp16":
        return "fp16", "fp16 weights, native on this accelerator"
    reason = "fp32 weights downcast to 16 bits as vLLM does" if stored == "fp32" else "bf16 weights"
    return half, f"{reason}; {half} is this accelerator's native 16-bit type"


def _refusal_reason(device: torch.device, precision: str) -> str:
    if device.type == "cpu" and precision == "fp16":
        return "this CPU has no native fp16 compute (needs avx512_fp16, amx_fp16 or Arm asimdhp)"
    if precision == "bf16":
        return "this device has no native bf16 support"
    return "not supported by this device"


def check_precision(device: torch.device, precision: str) -> None:
    """Raise CrosschipError if ``precision`` is unknown or this device cannot train in it."""
    torch_dtype(precision)
    supported = train_precisions(device)
    if precision in supported:
        return
    others = [p for p in reversed(supported) if p != precision]  # bf16/fp16 first: closest alternative
    raise CrosschipError(
        f"{device} ({device_name(device)}) cannot train in {precision}: {_refusal_reason(device, precision)}",
        fix=f"use --precision {' or '.join(others)}",
    )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed-precision context for the forward pass: a no-op for fp32."""
    dtype = torch_dtype(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """Loss scaler for fp16 only: bf16/fp32 share fp32's exponent range and need none."""
    torch_dtype(precision)
    if precision != "fp16":
        return None
    # Caveat: Ascend chips in saturation mode (310P) clamp overflow to +-max instead of inf, so the
    # scaler's inf check never fires there; the training loop must also watch for loss blow-ups.
    return torch.amp.GradScaler(device.type)


# ---------------------------------------------------------------- runtime helpers


def synchronize(device: torch.device) -> None:
    """Wait for queued work on the device (for honest timings); no-op on CPU."""
    if device.type == "cpu":
        return
    mod = _module(device.type)
    if device.type == "mps":
        mod.synchronize()
    else:
        mod.synchronize(device)


def _cpu_peak_rss() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def _optional_int(fn: Any, *args: Any) -> int | None:
    """Call an optional backend memory getter; None when the backend lacks it."""
    if not callable(fn):
        return None
    try:
        return int(fn(*args))
    except (RuntimeError, TypeError, AssertionError):
        return None


def memory_info(device: torch.device) -> dict[str, int | None]:
    """Total / allocated / peak-allocated bytes. On CPU: host total and this process's RSS."""
    if device.type == "cpu":
        rss = int(psutil.Process().memory_info().rss)
        peak = _cpu_peak_rss()
        return {
            "total_bytes": int(psutil.virtual_memory().total),
            "allocated_bytes": rss,
            # the kernel's high-water mark is sampled, so it can trail the live RSS read just above
            "peak_allocated_bytes": None if peak is None else max(peak, rss),
        }
    mod = _module(device.type)
    if device.type == "mps":
        return {
            "total_bytes": _optional_int(getattr(mod, "recommended_max_memory", None)),
            "allocated_bytes": _optional_int(getattr(mod, "current_allocated_memory", None)),
            "peak_allocated_bytes": None,
        }
    index = _index(device)
    props = getattr(mod, "get_device_properties", None)
    total = getattr(props(index), "total_memory", None) if callable(props) else None
    return {
        "total_bytes": None if total is None else int(total),
        "allocated_bytes": _optional_int(getattr(mod, "memory_allocated", None), index),
        "peak_allocated_bytes": _optional_int(getattr(mod, "max_memory_allocated", None), index),
    }


def get_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """Torch CPU generator state plus the device generator's, keyed 'cpu' and the device kind."""
    state = {"cpu": torch.get_rng_state()}
    if device.type != "cpu":
        mod = _module(device.type)
        args = () if device.type == "mps" else (_index(device),)  # mps: one device, older torch takes no arg
        state[device.type] = mod.get_rng_state(*args)
    return state


def set_rng_state(device: torch.device, state: dict[str, torch.Tensor]) -> None:
    """Restore states saved by get_rng_state.

    The device generator is restored only if ``state`` holds one for this device kind: generator states
    do not transfer between kinds, so resuming a CUDA run on an NPU restores the CPU generator only.
    """
    if "cpu" not in state:
        raise CrosschipError(
            "RNG state has no 'cpu' entry",
            fix="pass the dict returned by get_rng_state (is the checkpoint corrupt?)",
        )
    try:
        torch.set_rng_state(state["cpu"])
        if device.type != "cpu" and device.type in state:
            mod = _module(device.type)
            args = () if device.type == "mps" else (_index(device),)
            mod.set_rng_state(state[device.type], *args)
    except (RuntimeError, TypeError) as exc:
        raise CrosschipError(
            f"RNG state is not a valid generator state: {exc}", fix="resume from an intact checkpoint"
        ) from exc


@functools.cache
def _fused_adamw_probe(device_str: str) -> bool:
    device = torch.device(device_str)
    try:
        param = torch.nn.Parameter(torch.zeros(4, device=device))
        param.grad = torch.ones_like(param)
        optimizer = torch.optim.AdamW([param], lr=1e-3, fused=True)
        optimizer.step()
        synchronize(device)
        # One AdamW step with grad 1 moves every weight by about -lr: check the kernel really ran.
        return bool(torch.all(param.detach().cpu() < 0))
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return False


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether torch's fused AdamW kernel works on this device (probed once with a tiny tensor, cached)."""
    return _fused_adamw_probe(str(device))


# ---------------------------------------------------------------- listing


def _cpu_entry() -> dict[str, Any]:
    device = torch.device("cpu")
    return {
        "device": "cpu",
        "name": device_name(device),
        "memory_bytes": int(psutil.virtual_memory().total),
        "train_precisions": train_precisions(device),
        "cores": {"logical": os.cpu_count(), "physical": psutil.cpu_count(logical=False)},
        "isa_flags": cpu_isa_flags(),
    }


def _accelerator_entry(device: torch.device) -> dict[str, Any]:
    return {
        "device": str(device),
        "name": device_name(device),
        "memory_bytes": memory_info(device)["total_bytes"],
        "train_precisions": train_precisions(device),
    }


def list_devices() -> list[dict[str, Any]]:
    """One entry per device present on this machine, CPU first (what `crosschip devices` prints)."""
    entries = [_cpu_entry()]
    for kind in _AUTO_ORDER:
        if not is_available(kind):
            continue
        if kind == "mps":
            entries.append(_accelerator_entry(torch.device("mps")))
            continue
        entries.extend(_accelerator_entry(torch.device(kind, i)) for i in range(_device_count(kind)))
    return entries
