"""Numerics check: will the values fit the target's float format, and will an overflow be visible there?

- fp16 range probe (only where this checkpoint would be served in fp16: fp16-only chips such as
  ascend-310p, or an fp16 checkpoint): a few calibration texts run through the model in fp32 on
  the CPU, with hooks recording the largest |activation| at every decoder layer, its self_attn and
  mlp, every nn.Linear inside it (input and output) and lm_head. Any point above 65504 (fp16's
  largest finite value) FAILs, named in execution order (the first one is where the overflow starts).
- fp16 weight audit: convert's own `fp16_range_audit` over every tensor convert would cast, streamed
  one tensor at a time (the same audit `crosschip convert --to fp16` refuses on).
- saturating targets (overflow_mode "saturation"): a WARN that Inf/NaN-based overflow checks and
  dynamic loss scaling see nothing there, since overflow gives +-max instead of Inf.

The probe is bounded: PROBE_TEXTS texts of at most PROBE_TOKENS tokens, batch 1, CPU only, and it is
skipped (WARN) when the fp32 model would take more than PROBE_MEMORY_FRACTION of free host memory.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from crosschip.check.formats import Inventory
from crosschip.check.result import CheckResult
from crosschip.formats.quant import FP16_MAX, RangeAudit
from crosschip.targets import TargetProfile

PROBE_TEXTS = 4
PROBE_TOKENS = 64
PROBE_MEMORY_FRACTION = 0.5
HEADROOM_WARN = 4.0  # WARN when the largest activation is within this factor of fp16's max
_NAMED = 8  # points named in the reason (all of them are in the details)


@dataclass(frozen=True)
class Point:
    """The largest |value| seen at one hook point (execution order is the list order)."""

    name: str
    max_abs: float

    @property
    def overflows(self) -> bool:
        return not math.isfinite(self.max_abs) or self.max_abs > FP16_MAX


def serving_dtype(inv: Inventory, profile: TargetProfile) -> str:
    """The float dtype the target computes this checkpoint in: fp16 on fp16-only chips and for fp16
    checkpoints where fp16 runs (vLLM's --dtype auto keeps the checkpoint's dtype), else the target's
    serving float dtype."""
    from crosschip.devices import precision_name
    from crosschip.verify.emulate import serving_float_dtype

    if inv.fmt == "fp16" and profile.supports("fp16"):
        return "fp16"
    return precision_name(serving_float_dtype(profile.name))


# ------------------------------------------------------------------------------------ activation probe


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _probe_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every hook point: decoder layers, self_attn, mlp, Linears, lm_head."""
    from crosschip.verify.emulate import decoder_layers

    names = {id(m): n for n, m in model.named_modules()}
    chosen: list[nn.Module] = []
    for layer in decoder_layers(model):
        chosen.append(layer)
        chosen += [m for m in (getattr(layer, "self_attn", None), getattr(layer, "mlp", None)) if m is not None]
        chosen += [m for m in layer.modules() if isinstance(m, nn.Linear)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        chosen.append(head)
    return [(names[id(m)], m) for m in dict.fromkeys(chosen)]


def activation_maxima(model: nn.Module, batches: list[torch.Tensor]) -> list[Point]:
    """Largest |activation| per hook point over `batches` ([1, T] token ids), in first-execution order."""
    maxima: dict[str, float] = {}

    def record(name: str, value: Any) -> None:
        t = _first_tensor(value)
        if t is None or t.numel() == 0 or not t.is_floating_point():
            return
        a = t.detach().abs()
        m = float("inf") if not bool(torch.isfinite(a).all()) else float(a.amax())
        maxima[name] = max(maxima.get(name, 0.0), m)

    handles = []
    for name, module in _probe_modules(model):
        handles.append(module.register_forward_hook(lambda _m, _a, out, n=name: record(n, out)))
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(lambda _m, args, n=name: record(f"{n}:input", args)))
    try:
        with torch.inference_mode():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [Point(n, v) for n, v in maxima.items()]


def calibration_batches(root: Path, vocab_size: int) -> tuple[list[torch.Tensor], str]:
    """Token ids of the shipped verify prompts (crosschip.verify.prompts); random ids without a tokenizer."""
    from crosschip.checkpoint import load_tokenizer_if_present
    from crosschip.verify.prompts import load_prompts, tokenize_prompts

    tokenizer = load_tokenizer_if_present(root)
    if tokenizer is not None:
        prompts = load_prompts(None)
        sequences, _ = tokenize_prompts(prompts, tokenizer, max_tokens=PROBE_TOKENS, min_tokens=8)
        sequences = [s for s in sequences if max(s) < vocab_size][:PROBE_TEXTS]
        if sequences:
            note = f"{len(sequences)} shipped calibration texts, <= {PROBE_TOKENS} tokens each"
            return [torch.tensor([s]) for s in sequences], note
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (PROBE_TEXTS, PROBE_TOKENS), generator=g)
    note = f"no usable tokenizer: {PROBE_TEXTS} sequences of {PROBE_TOKENS} random token ids (seed 0)"
    return [row[None] for row in ids], note


def _fp32_bytes(inv: Inventory) -> int:
    return 4 * sum(t.numel for t in inv.tensors if t.role in ("float", "quantized", "aux"))


def _layers_of(points: list[Point]) -> list[str]:
    layers = dict.fromkeys(p.name.split(".")[2] for p in points if p.name.startswith("model.layers."))
    return list(layers)


def probe_activations(inv: Inventory, profile: TargetProfile) -> CheckResult:
    """Run the calibration texts in fp32 on CPU; FAIL naming every point above fp16's max."""
    from crosschip.checkpoint import load_model

    need, free = _fp32_bytes(inv), int(psutil.virtual_memory().available)
    if need > PROBE_MEMORY_FRACTION * free:
        return CheckResult("numerics.activations", "WARN",
                           f"not probed: the fp32 model ({need / 2**30:.1f} GiB) would take more than "
                           f"{PROBE_MEMORY_FRACTION:.0%} of this host's free memory", "run the check on a larger host")
    model, _ = load_model(inv.root, "cpu", torch.float32, verify=False)
    batches, note = calibration_batches(inv.root, int(model.config.vocab_size))
    points = activation_maxima(model, batches)
    del model
    over = [p for p in points if p.overflows]
    details: dict[str, Any] = {"calibration": note, "fp16_max": FP16_MAX, "over": [p.name for p in over],
                               # null: Inf/NaN already in fp32 (strict JSON has no Infinity)
                               "points": [{"point": p.name, "max_abs": p.max_abs if math.isfinite(p.max_abs)
                                           else None} for p in points]}
    top = max(points, key=lambda p: p.max_abs)
    if over:
        named = ", ".join(f"{p.name} ({p.max_abs:.4g})" for p in over[:_NAMED])
        more = f" and {len(over) - _NAMED} more (see --json)" if len(over) > _NAMED else ""
        layers = ", ".join(_layers_of(over))
        reason = (f"{len(over)} of {len(points)} activation points exceed fp16's max 65504 ({note}); decoder "
                  f"layers {layers}; first: {over[0].name}; points: {named}{more}")
        fix = (f"{profile.name} computes in fp16 and cannot hold these values: serve on a bf16 target, or bring the "
               f"activations into range at {over[0].name} (rescale it, or fine-tune with activation regularisation); "
               f"`crosschip verify --emulate {profile.name}` shows the effect")
        return CheckResult("numerics.activations", "FAIL", reason, fix, details)
    headroom = FP16_MAX / top.max_abs if top.max_abs else math.inf
    reason = f"largest activation {top.max_abs:.4g} at {top.name} ({note}): {headroom:.1f}x below fp16's max 65504"
    if headroom < HEADROOM_WARN:
        return CheckResult("numerics.activations", "WARN", reason + "; other inputs may overflow",
                           "probe with longer, representative prompts before serving in fp16", details)
    return CheckResult("numerics.activations", "PASS", reason, None, details)


# ------------------------------------------------------------------------------------ weight audit


def audit_weights(root: Path) -> list[RangeAudit]:
    """convert's fp16 range audit of every tensor `crosschip convert --to fp16` would cast (one at a time)."""
    from crosschip.convert.pipeline import open_source
    from crosschip.convert.stream import SourceReader
    from crosschip.formats import layouts
    from crosschip.formats.quant import fp16_range_audit

    src = open_source(root)
    reader = SourceReader(src.root, src.infos)
    audits = []
    try:
        for name, stored in src.groups.items():
            if layouts.policy.keep_fp32(name):
                continue  # convert keeps these in fp32 in every format
            tensor = layouts.decode(src.fmt, src.layout, name, {n: reader.get(n) for n in stored}, torch.float32)
            if tensor.is_floating_point():
                audits.append(fp16_range_audit(name, tensor))
    finally:
        reader.close()
    return audits


def check_weight_range(inv: Inventory, profile: TargetProfile, ckpt_arg: str) -> CheckResult:
    """FAIL naming the weights a cast to fp16 would overflow (convert refuses them without --clamp)."""
    audits = audit_weights(inv.root)
    bad = [a for a in audits if not a.ok]
    top = max(audits, key=lambda a: a.max_abs, default=None)
    details = {"tensors": len(audits), "overflowing": [{"tensor": a.name, "values": a.overflow, "max_abs": a.max_abs}
                                                        for a in bad],
               "underflow_to_zero": sum(a.underflow_to_zero for a in audits)}
    if bad:
        named = ", ".join(f"{a.name} ({a.overflow} values, max {a.max_abs:.4g})" for a in bad[:_NAMED])
        out = shlex.quote(f"{ckpt_arg.rstrip('/')}-{profile.name}")
        fix = (f"`crosschip convert {shlex.quote(ckpt_arg)} {out} --target {profile.name} --clamp` saturates them to "
               f"+-65504 (recorded in crosschip.json); verify the result before serving")
        return CheckResult("numerics.weights", "FAIL",
                           f"{len(bad)} weight tensors exceed fp16's max 65504: {named}", fix, details)
    reason = f"all {len(audits)} weight tensors fit fp16"
    if top is not None:
        reason += f" (largest |w| {top.max_abs:.4g} in {top.name})"
    return CheckResult("numerics.weights", "PASS", reason, None, details)


# ------------------------------------------------------------------------------------ the check


def saturation_warning(profile: TargetProfile) -> CheckResult:
    """What saturating overflow hides (CANN aclrtFloatOverflowMode; see the profile's sources)."""
    reason = (f"{profile.name} saturates on overflow: a value beyond the dtype's range becomes +-max (65504 in fp16) "
              f"instead of Inf, and NaN becomes 0, so Inf/NaN-based overflow checks (isfinite guards, parity "
              f"checks) and dynamic loss scaling (which skips a step only on Inf/NaN gradients) never see an overflow")
    fix = (f"check value ranges instead (the numerics rows above), and compare outputs against a reference with "
           f"`crosschip verify --emulate {profile.name}`, which emulates saturation")
    return CheckResult("numerics.overflow", "WARN", reason, fix, {"overflow_mode": profile.overflow_mode})


def check_numerics(inv: Inventory, profile: TargetProfile, *, probe: bool = True,
                   ckpt_arg: str | None = None) -> list[CheckResult]:
    """The numerics rows: fp16 activation probe and weight audit where fp16 is served; saturation warning."""
    dtype = serving_dtype(inv, profile)
    rows: list[CheckResult] = []
    if dtype != "fp16":
        rows.append(CheckResult("numerics", "PASS", f"{profile.name} serves this checkpoint in {dtype}, whose range "
                                f"covers the checkpoint's values: no fp16 range probe needed", None,
                                {"serving_dtype": dtype}))
    elif inv.config_only:
        rows.append(CheckResult("numerics", "WARN", f"{profile.name} serves in fp16 but {inv.root} has no weights "
                                "(config only): activations and weights were not probed",
                                "run crosschip check on the checkpoint with its weights", {"serving_dtype": dtype}))
    elif not probe:
        rows.append(CheckResult("numerics", "WARN", f"{profile.name} serves in fp16; the range probe was skipped",
                                "run the check without --no-numerics", {"serving_dtype": dtype}))
    else:
        rows.append(check_weight_range(inv, profile, ckpt_arg or str(inv.root)))
        rows.append(probe_activations(inv, profile))
    if profile.overflow_mode == "saturation":
        rows.append(saturation_warning(profile))
    return rows
