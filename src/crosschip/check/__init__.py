"""Preflight: will this checkpoint and this code run on that chip? (`crosschip check`).

Each check returns a `CheckResult` (PASS / WARN / FAIL, the reason and the fix); `run.run_check`
runs them all and returns a `CheckReport` whose JSON form has a versioned schema (`run.REPORT_SCHEMA`).

  formats      every stored tensor's dtype against the target's compute dtypes, and the format against
               what the chosen serving stack (`--stack`) runs there (`formats.py`, `engine.py`)
  memory       weights + KV cache + a stated reserve against memory x devices (`memory.py`)
  architecture the model class against what the chosen stack lists (`arch.py`)
  load         this transformers builds the model with the attention crosschip picks (`arch.py`)
  attention    the head (or MLA latent) size against the stack's kernels (`engine.py`)
  fp8-blocks   vLLM's FP8 block-shape rule under --devices tensor parallelism (`engine.py`, `fp8_rules.py`)
  numerics     fp16 range of activations (CPU probe) and weights; saturating overflow (`numerics.py`)
  code         CUDA-only usage in training / serving scripts (`code.py`)
"""

from __future__ import annotations

from crosschip.check.result import CheckResult
from crosschip.check.run import SCHEMA_VERSION, CheckReport, run_check

__all__ = ["SCHEMA_VERSION", "CheckReport", "CheckResult", "run_check"]
