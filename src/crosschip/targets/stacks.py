"""Serving stacks of a target profile: what each engine loads and runs on that chip, and its load rules.

A profile lists its stacks as `[[stacks]]` tables, the default (what `crosschip check` uses without
`--stack`) first. Each stack says:

  formats                  crosschip formats it runs, "fmt" (any layout) or "fmt/layout"
  formats_unverified       formats it runs on related hardware, not documented on this chip
  architectures            HF `architectures` class names it serves, or ["any-transformers-causal-lm"]
  architectures_unverified served on related hardware only; architectures_date: when the list was checked
  fp8_block                [block_n, block_k] of the FP8 block-shape load rule (vLLM validate_fp8_block_shape)
  attention_head_sizes     head sizes its attention kernels take (absent: any)
  mla_head_sizes           MLA latent sizes (kv_lora_rank + qk_rope_head_dim) its MLA kernels take
  mla                      false where the stack has no MLA attention on this chip
  format_cpu_flags         {format = [CPU ISA flags]} a format needs on a cpu target (e.g. AMX for FP8)

and cites, per rule, the sources it comes from: every `[[stacks.sources]]` entry names the rules it
backs (`rules = ["formats", ...]`), and every rule a stack sets must be backed by one. A source is a
public URL or, for crosschip's own loader, a path in this repository.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from crosschip.errors import CrosschipError

STACK_NAMES = ("vllm", "vllm-ascend", "mindie", "transformers")
ANY_TRANSFORMERS_CAUSAL_LM = "any-transformers-causal-lm"
# crosschip.formats.layouts.LAYOUTS, spelled out so that loading a profile does not import the converter
# (tests/test_targets.py checks the two agree).
FORMAT_LAYOUTS: dict[str, tuple[str, ...]] = {
    "fp32": ("hf",), "bf16": ("hf",), "fp16": ("hf",), "fp8-block": ("deepseek-v3",),
    "int8-w8a16": ("compressed-tensors",), "int8-w8a8-dynamic": ("compressed-tensors", "ascend"),
}
RULES = ("formats", "architectures", "fp8_block", "attention_head_sizes", "mla_head_sizes", "mla",
         "format_cpu_flags")
_ARCH_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_FIELDS = {"name", "description", "formats", "formats_unverified", "architectures", "architectures_unverified",
           "architectures_date", "sources", *RULES}

Fail = Callable[[str, str, str], CrosschipError]  # (field, problem, fix) -> error naming the file


@dataclass(frozen=True)
class StackSource:
    """Where a stack's rule comes from: a public URL, or a path in this repository."""

    title: str
    ref: str
    rules: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        key = "url" if self.ref.startswith(("http://", "https://")) else "path"
        return {"title": self.title, key: self.ref, "rules": list(self.rules)}


@dataclass(frozen=True)
class Stack:
    """One serving stack on one target: the formats and architectures it runs, its load rules, its sources."""

    name: str
    description: str
    formats: tuple[str, ...]
    sources: tuple[StackSource, ...]
    formats_unverified: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    architectures_unverified: tuple[str, ...] = ()
    architectures_date: str = ""
    fp8_block: tuple[int, int] | None = None
    attention_head_sizes: tuple[int, ...] = ()
    mla_head_sizes: tuple[int, ...] = ()
    mla: bool = True
    format_cpu_flags: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def format_status(self, fmt: str, layout: str) -> str:
        """'yes', 'unverified' or 'no': whether the stack runs `fmt` stored in `layout`."""
        for status, entries in (("yes", self.formats), ("unverified", self.formats_unverified)):
            if fmt in entries or f"{fmt}/{layout}" in entries:
                return status
        return "no"

    def cite(self, rule: str) -> str:
        """The sources of one rule, for a check's reason: 'title (url); title (url)'."""
        return "; ".join(f"{s.title} ({s.ref})" for s in self.sources if rule in s.rules)

    def source_refs(self, rule: str) -> list[str]:
        return [s.ref for s in self.sources if rule in s.rules]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {
            "name": self.name, "description": self.description, "formats": list(self.formats),
            "formats_unverified": list(self.formats_unverified), "architectures": list(self.architectures),
            "architectures_unverified": list(self.architectures_unverified),
            "architectures_date": self.architectures_date,
            "fp8_block": list(self.fp8_block) if self.fp8_block else None,
            "attention_head_sizes": list(self.attention_head_sizes), "mla_head_sizes": list(self.mla_head_sizes),
            "mla": self.mla, "format_cpu_flags": {k: list(v) for k, v in self.format_cpu_flags.items()},
            "sources": [s.to_dict() for s in self.sources],
        }


# ---------------------------------------------------------------- validation


def _strings(raw: dict[str, Any], key: str, fail: Fail, check: Callable[[str], bool], hint: str) -> tuple[str, ...]:
    values = raw.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) and check(v) for v in values):
        raise fail(key, f"has a bad entry in {values!r}", hint)
    if len(set(values)) != len(values):
        raise fail(key, "lists a value twice", f"remove the duplicate from {key}")
    return tuple(values)


def _sizes(raw: dict[str, Any], key: str, fail: Fail, count: int | None = None) -> tuple[int, ...]:
    values = raw.get(key, [])
    ok = isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok or (count is not None and len(values) != count):
        what = f"{count} positive integers" if count else "a list of positive integers"
        raise fail(key, f"is {values!r}", f"make {key} {what}")
    return tuple(values)


def _is_format(entry: str) -> bool:
    fmt, _, layout = entry.partition("/")
    return fmt in FORMAT_LAYOUTS and (not layout or layout in FORMAT_LAYOUTS[fmt])


def _format_hint() -> str:
    return "use fmt or fmt/layout with " + ", ".join(f"{f} ({'|'.join(ls)})" for f, ls in FORMAT_LAYOUTS.items())


def _is_arch(value: str) -> bool:
    return value == ANY_TRANSFORMERS_CAUSAL_LM or bool(_ARCH_RE.match(value))


def _cpu_flags(raw: dict[str, Any], fail: Fail) -> dict[str, tuple[str, ...]]:
    table = raw.get("format_cpu_flags", {})
    hint = 'e.g. format_cpu_flags = { "fp8-block" = ["amx_tile"] }'
    if not isinstance(table, dict):
        raise fail("format_cpu_flags", f"is {table!r}", hint)
    flags = {}
    for fmt, names in table.items():
        if fmt not in FORMAT_LAYOUTS or not isinstance(names, list) or not names or \
                not all(isinstance(n, str) and n for n in names):
            raise fail("format_cpu_flags", f"has a bad entry {fmt!r} = {names!r}", hint)
        flags[fmt] = tuple(names)
    return flags


def _stack_sources(raw: dict[str, Any], fail: Fail) -> tuple[StackSource, ...]:
    entries = raw.get("sources")
    hint = 'each is {title = "...", url = "https://..." (or path = "src/..."), rules = ["formats", ...]}'
    if not isinstance(entries, list) or not entries:
        raise fail("sources", "is missing or empty", hint)
    sources = []
    for entry in entries:
        ok = isinstance(entry, dict) and set(entry) in ({"title", "url", "rules"}, {"title", "path", "rules"})
        title, ref = (entry.get("title"), entry.get("url", entry.get("path"))) if ok else (None, None)
        rules = entry.get("rules") if ok else None
        if not (isinstance(title, str) and title.strip() and isinstance(ref, str) and ref.strip()):
            raise fail("sources", f"has a bad entry {entry!r}", hint)
        if "url" in entry and not re.match(r"^https?://\S+$", ref):
            raise fail("sources", f"has a non-http(s) url {ref!r}", "use an http:// or https:// url")
        if not (isinstance(rules, list) and rules and all(r in RULES for r in rules)):
            raise fail("sources", f"entry {title!r} has rules {rules!r}", f"name rules from: {', '.join(RULES)}")
        sources.append(StackSource(title.strip(), ref, tuple(rules)))
    return tuple(sources)


def _architectures(raw: dict[str, Any], fail: Fail) -> dict[str, Any]:
    hint = "list Hugging Face class names, e.g. LlamaForCausalLM"
    archs = _strings(raw, "architectures", fail, _is_arch, hint)
    unverified = _strings(raw, "architectures_unverified", fail, _is_arch, hint)
    both = set(archs) & set(unverified)
    if both:
        raise fail("architectures_unverified", f"repeats {sorted(both)[0]!r}", "list it only once")
    date = raw.get("architectures_date", "")
    if archs or unverified:
        try:
            _dt.date.fromisoformat(date)
        except (TypeError, ValueError) as exc:
            fix = "give the ISO date it was checked, e.g. 2026-11-29"
            raise fail("architectures_date", f"is {date!r}", fix) from exc
    return {"architectures": archs, "architectures_unverified": unverified, "architectures_date": date}


def parse_stack(raw: Any, origin: str, index: int) -> Stack:
    """One validated `[[stacks]]` table; errors name the file, the stack and the field."""
    label = raw.get("name") if isinstance(raw, dict) and isinstance(raw.get("name"), str) else f"#{index + 1}"

    def fail(key: str, problem: str, fix: str) -> CrosschipError:
        return CrosschipError(f"{origin}: stack {label!r} field '{key}' {problem}", fix=fix)

    if not isinstance(raw, dict):
        raise CrosschipError(f"{origin}: stacks entry #{index + 1} is not a table", fix="write it as [[stacks]]")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise fail(unknown[0], "is not a known field", f"known fields: {', '.join(sorted(_FIELDS))}")
    if raw.get("name") not in STACK_NAMES:
        raise fail("name", f"is {raw.get('name')!r}", f"use one of: {', '.join(STACK_NAMES)}")
    formats = _strings(raw, "formats", fail, _is_format, _format_hint())
    if not formats:
        raise fail("formats", "is missing or empty", _format_hint())
    mla = raw.get("mla", True)
    if not isinstance(mla, bool):
        raise fail("mla", f"is {mla!r}", "make mla true or false")
    block = _sizes(raw, "fp8_block", fail, 2) if "fp8_block" in raw else None
    stack = Stack(
        name=raw["name"], description=str(raw.get("description", "")).strip(), formats=formats,
        sources=_stack_sources(raw, fail),
        formats_unverified=_strings(raw, "formats_unverified", fail, _is_format, _format_hint()),
        fp8_block=(block[0], block[1]) if block else None,
        attention_head_sizes=_sizes(raw, "attention_head_sizes", fail),
        mla_head_sizes=_sizes(raw, "mla_head_sizes", fail), mla=mla, format_cpu_flags=_cpu_flags(raw, fail),
        **_architectures(raw, fail),
    )
    for rule in RULES:
        if rule in raw and not any(rule in s.rules for s in stack.sources):
            raise fail("sources", f"backs no {rule!r}", f"add a source with rules = [\"{rule}\"]")
    if stack.architectures and not stack.source_refs("architectures"):
        raise fail("sources", "backs no 'architectures'", 'add a source with rules = ["architectures"]')
    return stack


def parse_stacks(raw: Any, origin: str) -> tuple[Stack, ...]:
    """The profile's `[[stacks]]` tables, validated, in order (the first is the default)."""
    if not isinstance(raw, list) or not raw:
        raise CrosschipError(f"{origin}: field 'stacks' is missing or empty",
                             fix="add [[stacks]] tables with name, formats and sources")
    stacks = tuple(parse_stack(entry, origin, i) for i, entry in enumerate(raw))
    names = [s.name for s in stacks]
    if len(set(names)) != len(names):
        raise CrosschipError(f"{origin}: field 'stacks' lists a stack twice", fix="keep one table per stack")
    return stacks
