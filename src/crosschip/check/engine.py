"""Engine rules: what the chosen serving stack of a target loads, beyond the chip's dtypes.

Each rule comes from the stack's table in the target profile (crosschip.targets.stacks), which cites
its sources; every row names the stack, the rule and the source, and its fix is another format,
another `--stack`, another `--devices` or a convert command.

  formats      the checkpoint's format and layout against the stack's `formats` (and, on a cpu
               target, the CPU flags a format needs, e.g. AMX for vLLM's CPU FP8 kernels)
  attention    the attention head size (or MLA latent size) against the sizes the stack's kernels take
  fp8-blocks   vLLM's FP8 block-shape rule under `--devices` tensor parallelism (check/fp8_rules.py),
               on the stored FP8 weights, or on the weights `convert --to fp8-block` would quantize

`convert_gate` applies the FP8 rule to `crosschip convert --to fp8-block`, which refuses a checkpoint
no engine can load unless `--force`.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from crosschip.check.fp8_rules import Violation, fp8_violations
from crosschip.check.result import CheckResult
from crosschip.errors import CrosschipError
from crosschip.formats.quant import FP8_BLOCK  # crosschip convert's block: the DeepSeek-V3 layout
from crosschip.targets import TargetProfile
from crosschip.targets.stacks import Stack

_TP_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
_EXAMPLES = 3


# ------------------------------------------------------------------------------------ formats


def _flags_missing(stack: Stack, profile: TargetProfile, fmt: str, host_flags: Collection[str]) -> list[str]:
    """CPU flags `fmt` needs on this stack that the serving host lacks (only for cpu targets)."""
    if profile.device_type != "cpu":
        return []
    return [f for f in stack.format_cpu_flags.get(fmt, ()) if f not in host_flags]


def _runs(stack: Stack, profile: TargetProfile, fmt: str, layout: str, host_flags: Collection[str]) -> bool:
    return stack.format_status(fmt, layout) == "yes" and not _flags_missing(stack, profile, fmt, host_flags)


def format_problem(fmt: str, layout: str, profile: TargetProfile, stack: Stack,
                   host_flags: Collection[str]) -> tuple[str, str] | None:
    """('FAIL' | 'WARN', reason) when the stack does not run this format on this target, else None."""
    where, what = f"{stack.name} on {profile.name}", f"{fmt} ({layout} layout)"
    status = stack.format_status(fmt, layout)
    if status == "no":
        runs = ", ".join(stack.formats)
        return "FAIL", f"{where} does not run {what}; it runs {runs} (rule: formats; source: {stack.cite('formats')})"
    if status == "unverified":
        return "WARN", (f"{where} runs {what} on related hardware only, not documented on {profile.name} "
                        f"(rule: formats; source: {stack.cite('formats')})")
    missing = _flags_missing(stack, profile, fmt, host_flags)
    if missing:
        need = ", ".join(stack.format_cpu_flags[fmt])
        return "FAIL", (f"{where} runs {what} only on CPUs with {need}; this host lacks {', '.join(missing)} "
                        f"(rule: format_cpu_flags; source: {stack.cite('format_cpu_flags')})")
    return None


def _convert_choice(fmt: str, profile: TargetProfile, stack: Stack,
                    host_flags: Collection[str]) -> tuple[str, str | None] | None:
    """A (format, layout) convert can write that this stack runs on this target, closest to `fmt`."""
    from crosschip.formats.layouts import LAYOUTS, QUANTIZED_FORMATS

    choices: list[tuple[str, str | None]] = []
    for entry in stack.formats:
        name, _, layout = entry.partition("/")
        if profile.can_serve(name) and _runs(stack, profile, name, layout or LAYOUTS[name][0], host_flags):
            choices.append((name, layout or None))
    if not choices:
        return None

    def rank(choice: tuple[str, str | None]) -> int:
        if choice[0] == fmt:
            return 0  # the same format in another layout
        if fmt in QUANTIZED_FORMATS and choice[0] == "int8-w8a8-dynamic":
            return 1
        return 2 if choice[0] == profile.default_serving_format else 3

    return min(choices, key=rank)


def format_fix(fmt: str, layout: str, profile: TargetProfile, stack: Stack, ckpt_arg: str,
               host_flags: Collection[str]) -> str:
    """Another stack of the profile that runs it, and/or a convert command to a format this stack runs."""
    options = []
    others = [s.name for s in profile.stacks if s is not stack and _runs(s, profile, fmt, layout, host_flags)]
    if others:
        options.append(f"serve it with --stack {' or '.join(others)}")
    choice = _convert_choice(fmt, profile, stack, host_flags)
    if choice is not None:
        to, to_layout = choice
        out = shlex.quote(f"{ckpt_arg.rstrip('/')}-{stack.name}")
        flags = f" --layout {to_layout}" if to_layout else ""
        options.append(f"`crosschip convert {shlex.quote(ckpt_arg)} {out} --target {profile.name} --to {to}{flags}` "
                       f"({stack.name} runs {to})")
    return "; or ".join(options) or f"serve it on another target (see `crosschip targets`) than {profile.name}"


# ------------------------------------------------------------------------------------ attention


def _attention_size(config: Mapping[str, Any]) -> tuple[str, int | None]:
    """('mla', kv_lora_rank + qk_rope_head_dim) for multi-head latent attention, else ('head', head_dim)."""
    rank, rope = config.get("kv_lora_rank"), config.get("qk_rope_head_dim")
    if isinstance(rank, int) and rank > 0:
        return "mla", rank + rope if isinstance(rope, int) else None
    head_dim, hidden, heads = config.get("head_dim"), config.get("hidden_size"), config.get("num_attention_heads")
    if isinstance(head_dim, int) and head_dim > 0:
        return "head", head_dim
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return "head", hidden // heads
    return "head", None


def _attention_fix(profile: TargetProfile, stack: Stack, ok: Any) -> str:
    others = [s.name for s in profile.stacks if s is not stack and ok(s)]
    if others:
        return f"serve it with --stack {' or '.join(others)}"
    return f"serve it on another target, or a model whose attention {stack.name} on {profile.name} runs"


def check_attention(config: Mapping[str, Any], profile: TargetProfile, stack: Stack) -> CheckResult | None:
    """FAIL when the stack's attention kernels do not take the model's head (or MLA latent) size; None
    when the stack states no attention rule."""
    if not (stack.attention_head_sizes or stack.mla_head_sizes or not stack.mla):
        return None
    kind, size = _attention_size(config)
    where = f"{stack.name} on {profile.name}"
    details = {"stack": stack.name, "attention": kind, "size": size}
    if kind == "mla" and not stack.mla:
        details["rule"] = "mla"
        reason = f"{where} has no multi-head latent attention backend (rule: mla; source: {stack.cite('mla')})"
        return CheckResult("attention", "FAIL", reason, _attention_fix(profile, stack, lambda s: s.mla), details)
    rule = "mla_head_sizes" if kind == "mla" else "attention_head_sizes"
    sizes = stack.mla_head_sizes if kind == "mla" else stack.attention_head_sizes
    details |= {"rule": rule, "supported": list(sizes), "sources": stack.source_refs(rule)}
    what = "MLA latent size (kv_lora_rank + qk_rope_head_dim)" if kind == "mla" else "attention head_dim"
    if sizes and size not in sizes:
        reason = (f"{where} takes {what} in {list(sizes)}; this model's is {size} "
                  f"(rule: {rule}; source: {stack.cite(rule)})")
        fix = _attention_fix(profile, stack, lambda s: not getattr(s, rule) or size in getattr(s, rule))
        return CheckResult("attention", "FAIL", reason, fix, details)
    return CheckResult("attention", "PASS", f"{what} {size}: {where} runs it", None, details)


# ------------------------------------------------------------------------------------ FP8 blocks


def stored_fp8_shapes(inv: Any) -> dict[str, tuple[int, ...]]:
    """Shapes of the FP8 weights a server loads from a checkpoint (formats.Inventory; MTP layers left out)."""
    from crosschip.formats.policy import is_mtp_layer

    fp8 = (t for t in inv.tensors if t.dtype.startswith("fp8") and t.role == "quantized")
    return {t.name: t.shape for t in fp8 if not is_mtp_layer(t.name, inv.config)}


def planned_fp8_shapes(inv: Any) -> dict[str, tuple[int, ...]]:
    """Shapes of the weights `crosschip convert --to fp8-block` would quantize (formats.Inventory)."""
    from crosschip.check.formats import FLOAT_DTYPES, config_shapes
    from crosschip.formats.layouts import make_plan
    from crosschip.formats.policy import is_mtp_layer

    if inv.fmt in FLOAT_DTYPES and not inv.config_only:
        shapes = {t.name: t.shape for t in inv.tensors}  # plain checkpoints store the logical shapes
    else:
        shapes = config_shapes(inv.root, inv.config)
    plan = make_plan("fp8-block", None, shapes, inv.config)
    return {n: tuple(shapes[n]) for n in plan.quantized if n in shapes and not is_mtp_layer(n, inv.config)}


def _describe(violations: list[Violation]) -> str:
    """The first violation of each kind (the same projection in every layer is one kind), with counts."""
    kinds: dict[tuple[str, str, str], list[Violation]] = {}
    for v in violations:
        kinds.setdefault((re.sub(r"\.\d+\.", ".N.", v.tensor), v.dim, v.rule), []).append(v)
    shown = [vs[0].message(rule=False) + (f" (and {len(vs) - 1} more like it)" if len(vs) > 1 else "")
             for vs in list(kinds.values())[:_EXAMPLES]]
    rules = sorted({v.rule for v in violations})
    more = f"; and {len(kinds) - _EXAMPLES} more kinds" if len(kinds) > _EXAMPLES else ""
    return f"{'; '.join(shown)}{more} ({'; '.join(rules)})"


def _passing_devices(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any],
                     block: tuple[int, int]) -> list[int]:
    return [tp for tp in _TP_CANDIDATES if not fp8_violations(shapes, config, tp, block)[0]]


def check_fp8_blocks(inv: Any, profile: TargetProfile, stack: Stack, devices: int, ckpt_arg: str) -> CheckResult | None:
    """vLLM's FP8 block-shape rule at --devices tensor parallelism; None when the stack states no such rule."""
    if stack.fp8_block is None:
        return None
    from crosschip.check.formats import convert_fix

    stored = inv.fmt == "fp8-block"
    shapes = stored_fp8_shapes(inv) if stored else planned_fp8_shapes(inv)
    violations, unclassified = fp8_violations(shapes, inv.config, devices, stack.fp8_block)
    details = {"stack": stack.name, "rule": "fp8_block", "block": list(stack.fp8_block), "devices": devices,
               "applies_to": "stored FP8 weights" if stored else "convert --to fp8-block (planned)",
               "violations": [v.to_dict() for v in violations], "unclassified": unclassified,
               "sources": stack.source_refs("fp8_block")}
    skipped = f"; {len(unclassified)} FP8 tensors in no layer vLLM's rule knows (not checked)" if unclassified else ""
    where = f"{stack.name} on {profile.name} at --devices {devices}"
    if not stored:
        refused = devices == 1 or bool(fp8_violations(shapes, inv.config, 1, stack.fp8_block)[0])
        verdict = f"`crosschip convert --to fp8-block` would load on {where}"
        if violations:
            verdict = ("`crosschip convert --to fp8-block` refuses it" if refused
                       else f"a `crosschip convert --to fp8-block` output would not load on {where}")
            verdict += f": {_describe(violations)}"
        return CheckResult("fp8-blocks", "PASS", f"{inv.fmt} checkpoint, no FP8 weights; {verdict}{skipped}", None,
                           details)
    if not violations:
        reason = f"{len(shapes)} FP8 weights line up with the {stack.fp8_block[0]}-blocks on {where}{skipped}"
        return CheckResult("fp8-blocks", "PASS", reason, None, details)
    passing = _passing_devices(shapes, inv.config, stack.fp8_block)
    details["passing_devices"] = passing
    reason = f"{where} refuses to load it: {_describe(violations)} (source: {', '.join(details['sources'])})"
    dequantize = f"dequantize it: {convert_fix(profile, ckpt_arg)}"
    fix = (f"serve it on --devices {' or '.join(map(str, passing))}; or {dequantize}" if passing
           else f"{dequantize} (no --devices value loads it)")
    return CheckResult("fp8-blocks", "FAIL", reason, fix, details)


def convert_gate(src: Path, force: bool) -> list[str]:
    """`crosschip convert --to fp8-block`: refuse (one line) what vLLM's FP8 rule rejects at tp=1, unless
    `force`; returns the violation messages (recorded as `forced` in the conversion record)."""
    from crosschip.check.formats import load_inventory

    inv = load_inventory(src)
    violations, _ = fp8_violations(planned_fp8_shapes(inv), inv.config, 1, (FP8_BLOCK[0], FP8_BLOCK[1]))
    if violations and not force:
        first = violations[0]
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        raise CrosschipError(f"no engine can load this as fp8-block: {first.message()}{more}",
                             "convert --to bf16 or --to int8-w8a8-dynamic instead, or pass --force to write it anyway")
    return [v.message() for v in violations]
