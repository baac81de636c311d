"""The golden: the reference converted by crosschip into the target's format, run with the target's numerics.

A parity gate needs to know how far a *correct* target sits from the reference. A constant per format cannot
know it: the error of an INT8 or FP8 conversion depends on the model (its weight and activation ranges) and on
the prompts, so constants must be loose enough for the worst model, and then a broken checkpoint of a
well-behaved model passes (a W8A8 with every down_proj scale x1.3 passed the old INT8 gate at mean KL 2.3e-3).
The golden measures it instead: crosschip converts the reference into the target's stored format (format,
layout, dtype and clamping taken from the target's own conversion record, else from its config.json) and runs
it on the target's device, dtype and emulation. Every metric of the target is then judged against the same
metric of the golden on the same tokens, per layer and per distribution statistic (see gates.measured_gates
and layers.golden_gate). A correct conversion by another tool rounds to the same grid and lands near the
golden; a fault adds its own error on top.

The golden is written to a temporary directory (under $TMPDIR) and removed afterwards; a target stored in the
reference's own format needs no conversion (the golden is the reference run with the target's numerics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from crosschip import checkpoint
from crosschip.errors import CrosschipError
from crosschip.fsio import scratch_dir

Log = Callable[[str], None]
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class GoldenSpec:
    """How the golden is made: the target's stored format, and where that was read."""

    fmt: str
    layout: str
    dtype: str | None  # high-precision dtype of a quantized format's unquantized parts (fp32 / bf16 / fp16)
    clamp: bool  # fp16: saturate out-of-range values instead of refusing (as the target's converter did)
    basis: str  # "conversion record" or "config.json"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _config_dtype(ckpt: checkpoint.Checkpoint) -> str | None:
    name = str(getattr(ckpt.config, "dtype", None) or getattr(ckpt.config, "torch_dtype", None) or "")
    return _DTYPE_NAMES.get(name.removeprefix("torch."))


def golden_spec(target: checkpoint.Checkpoint) -> GoldenSpec:
    """The conversion that reproduces the target's format: its last crosschip conversion record if that
    record produced the stored format, else the format in its config.json (a checkpoint from another tool)."""
    fmt, layout = checkpoint.storage_format(target)
    records = (target.manifest or {}).get("conversions") or []
    last = records[-1] if records and isinstance(records[-1], dict) else None
    if last is not None and last.get("to") == fmt and last.get("layout") == layout:
        dtype = _DTYPE_NAMES.get(str(last.get("dtype")))
        return GoldenSpec(fmt, layout, dtype, bool(last.get("clamped_tensors")), "conversion record")
    # Another tool's checkpoint: clamp like a saturating converter rather than refuse the golden.
    return GoldenSpec(fmt, layout, _config_dtype(target), True, "config.json")


def _same_storage(ref: checkpoint.Checkpoint, spec: GoldenSpec) -> bool:
    return checkpoint.storage_format(ref) == (spec.fmt, spec.layout) and (
        spec.fmt in ("fp32", "bf16", "fp16") or _config_dtype(ref) == spec.dtype
    )


@contextmanager
def golden_checkpoint(ref_path: Path, target_path: Path, log: Log) -> Iterator[tuple[Path | None, dict[str, Any]]]:
    """(path of the golden checkpoint, description for the report); path None when none can be made.

    The reference itself when it is already stored like the target; else a temporary crosschip conversion,
    removed on exit.
    """
    from crosschip.convert.pipeline import ConvertOptions, convert

    ref = checkpoint.open_checkpoint(ref_path, verify=False)
    spec = golden_spec(checkpoint.open_checkpoint(target_path, verify=False))
    info: dict[str, Any] = {"spec": spec.to_dict(), "converted": False}
    if _same_storage(ref, spec):
        info["path"] = str(ref.path)
        yield ref.path, info
        return
    with scratch_dir("crosschip-golden") as tmp:  # owner-tagged: a killed verify's copy is reclaimed next time
        out = Path(tmp) / "golden"
        log(f"golden: converting the reference to {spec.fmt} ({spec.layout}) from the target's {spec.basis}")
        dtype = _TORCH_DTYPES[spec.dtype] if spec.dtype else None
        try:
            convert(ref.path, out, ConvertOptions(spec.fmt, spec.layout, dtype, clamp=spec.clamp))
        except CrosschipError as e:
            info["error"] = str(e)
            log(f"golden: not available ({e}); gates fall back to the precision-class constants")
            yield None, info
            return
        info.update(converted=True, path="(temporary)")
        yield out, info
