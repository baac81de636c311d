"""Target device profiles: what a chip can compute and serve, shipped as one TOML file per target.

The profiles are data, not code, so a new accelerator is a new TOML file; each one cites its sources.
Each lists its serving stacks as `[[stacks]]` tables (crosschip.targets.stacks): the formats and
architectures each engine runs on that chip and its load rules, every rule with its sources.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from crosschip.devices import KINDS, PRECISIONS
from crosschip.errors import CrosschipError
from crosschip.targets.stacks import ANY_TRANSFORMERS_CAUSAL_LM, STACK_NAMES, Stack, parse_stacks

__all__ = ["ANY_TRANSFORMERS_CAUSAL_LM", "DTYPES", "SERVING_FORMATS", "STACK_NAMES", "Source", "Stack",
           "TargetProfile", "list_targets", "load_target", "load_target_file"]

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

DTYPES = ("fp32", "bf16", "fp16", "fp8_e4m3", "int8", "int4")
OVERFLOW_MODES = ("ieee", "saturation")
# Serving format -> matmul dtypes the target must run for it. int8-w8a16 keeps 16-bit activations,
# so it needs int8 plus bf16 or fp16 (checked separately in _serving_dtypes_ok).
SERVING_FORMATS: dict[str, tuple[str, ...]] = {
    "fp32": ("fp32",),
    "bf16": ("bf16",),
    "fp16": ("fp16",),
    "fp8-block": ("fp8_e4m3",),
    "int8-w8a16": ("int8",),
    "int8-w8a8-dynamic": ("int8",),
}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "description": str,
    "device_type": str,
    "memory_per_device_gib": (int, float),
    "matmul_dtypes": list,
    "training_dtypes": list,
    "fp8_block_scaling": bool,
    "overflow_mode": str,
    "default_serving_format": str,
    "sources": list,
    "stacks": list,
}
# Fields of profiles before the per-stack tables: refused with the way to move them.
_REPLACED_FIELDS = ("serving_stacks", "serving_architectures", "serving_architectures_unverified",
                    "serving_architectures_source", "serving_architectures_date")


@dataclass(frozen=True)
class Source:
    """A public reference backing a profile's facts."""

    title: str
    url: str


@dataclass(frozen=True)
class TargetProfile:
    """What one target chip computes, trains and serves in."""

    name: str
    description: str
    device_type: str
    memory_per_device_gib: float  # 0 for cpu: host memory
    matmul_dtypes: tuple[str, ...]
    training_dtypes: tuple[str, ...]
    fp8_block_scaling: bool  # 128x128 block-scaled FP8 weights as in DeepSeek-V3
    overflow_mode: str  # "ieee" (inf/nan) or "saturation" (clamp to +-max)
    default_serving_format: str
    sources: tuple[Source, ...]
    stacks: tuple[Stack, ...]  # serving stacks, the default first (crosschip.targets.stacks)

    @property
    def serving_stacks(self) -> tuple[str, ...]:
        """Names of the serving stacks, the default first."""
        return tuple(s.name for s in self.stacks)

    def stack(self, name: str | None = None) -> Stack:
        """A serving stack by name (None: the default); an unknown name is a usage error listing the stacks."""
        if name is None:
            return self.stacks[0]
        for stack in self.stacks:
            if stack.name == name:
                return stack
        raise CrosschipError(f"target {self.name} has no serving stack {name!r}",
                             fix=f"use --stack {' or '.join(self.serving_stacks)}")

    def supports(self, dtype: str) -> bool:
        """Whether the target runs matmuls in ``dtype`` (one of DTYPES)."""
        if dtype not in DTYPES:
            raise CrosschipError(f"unknown dtype {dtype!r}", fix=f"use one of: {', '.join(DTYPES)}")
        return dtype in self.matmul_dtypes

    def can_serve(self, serving_format: str) -> bool:
        """Whether the target can run a checkpoint in ``serving_format`` (one of SERVING_FORMATS)."""
        if serving_format not in SERVING_FORMATS:
            raise CrosschipError(
                f"unknown serving format {serving_format!r}", fix=f"use one of: {', '.join(SERVING_FORMATS)}"
            )
        return _serving_dtypes_ok(serving_format, self.matmul_dtypes, self.fp8_block_scaling)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (lists, not tuples)."""
        return {
            "name": self.name,
            "description": self.description,
            "device_type": self.device_type,
            "memory_per_device_gib": self.memory_per_device_gib,
            "matmul_dtypes": list(self.matmul_dtypes),
            "training_dtypes": list(self.training_dtypes),
            "fp8_block_scaling": self.fp8_block_scaling,
            "overflow_mode": self.overflow_mode,
            "default_serving_format": self.default_serving_format,
            "serving_stacks": list(self.serving_stacks),
            "sources": [{"title": s.title, "url": s.url} for s in self.sources],
            "stacks": [s.to_dict() for s in self.stacks],
        }


def _serving_dtypes_ok(serving_format: str, matmul_dtypes: tuple[str, ...], fp8_block: bool) -> bool:
    if not all(d in matmul_dtypes for d in SERVING_FORMATS[serving_format]):
        return False
    if serving_format == "fp8-block":
        return fp8_block
    if serving_format == "int8-w8a16":
        return "bf16" in matmul_dtypes or "fp16" in matmul_dtypes
    return True


# ---------------------------------------------------------------- validation


def _fail(origin: str, field: str, problem: str, fix: str) -> CrosschipError:
    return CrosschipError(f"{origin}: field '{field}' {problem}", fix=fix)


def _check_fields(raw: dict[str, Any], origin: str) -> None:
    replaced = [f for f in _REPLACED_FIELDS if f in raw]
    if replaced:
        raise _fail(origin, replaced[0], "is replaced by [[stacks]] tables",
                    "give each serving stack a [[stacks]] table: name, formats, architectures, sources")
    for field, expected in _FIELDS.items():
        if field not in raw:
            how = "[[stacks]] tables (name, formats, sources)" if field == "stacks" else field
            raise _fail(origin, field, "is missing", f"add {how} to the target file")
        value = raw[field]
        # bool is an int subclass: reject `memory_per_device_gib = true` explicitly
        wrong_bool = isinstance(value, bool) and expected is not bool
        if wrong_bool or not isinstance(value, expected):
            raise _fail(
                origin, field, f"has type {type(value).__name__}", f"make {field} a {_type_name(expected)}"
            )
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise _fail(origin, unknown[0], "is not a known field", f"known fields: {', '.join(_FIELDS)}")


def _type_name(expected: type | tuple[type, ...]) -> str:
    names = {str: "string", int: "number", float: "number", bool: "boolean (true/false)", list: "list"}
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _check_names(raw: dict[str, Any], field: str, allowed: tuple[str, ...], origin: str) -> tuple[str, ...]:
    values = raw[field]
    for value in values:
        if value not in allowed:
            raise _fail(
                origin, field, f"has unknown value {value!r}", f"use values from: {', '.join(allowed)}"
            )
    if len(set(values)) != len(values):
        raise _fail(origin, field, "lists a value twice", f"remove the duplicate from {field}")
    return tuple(values)


def _check_choice(raw: dict[str, Any], field: str, allowed: tuple[str, ...], origin: str) -> str:
    if raw[field] not in allowed:
        raise _fail(origin, field, f"is {raw[field]!r}", f"use one of: {', '.join(allowed)}")
    return str(raw[field])


def _check_sources(raw: dict[str, Any], origin: str) -> tuple[Source, ...]:
    entries = raw["sources"]
    if not entries:
        raise _fail(origin, "sources", "is empty", "cite at least one public source as {title, url}")
    sources = []
    for entry in entries:
        ok = isinstance(entry, dict) and set(entry) == {"title", "url"}
        title, url = (entry.get("title"), entry.get("url")) if ok else (None, None)
        if not (isinstance(title, str) and title.strip() and isinstance(url, str)):
            raise _fail(
                origin, "sources", f"has a bad entry {entry!r}", "each source is {title = ..., url = ...}"
            )
        if not re.match(r"^https?://\S+$", url):
            raise _fail(origin, "sources", f"has a non-http(s) url {url!r}", "use an http:// or https:// url")
        sources.append(Source(title=title.strip(), url=url))
    return tuple(sources)


def _check_memory(raw: dict[str, Any], device_type: str, origin: str) -> float:
    memory = float(raw["memory_per_device_gib"])
    if device_type == "cpu" and memory != 0:
        raise _fail(origin, "memory_per_device_gib", "must be 0 for cpu (host memory)", "set it to 0")
    if device_type != "cpu" and memory <= 0:
        raise _fail(origin, "memory_per_device_gib", f"is {memory}", "give the memory of one device in GiB")
    return memory


def _check_consistency(profile: TargetProfile, origin: str) -> None:
    extra = [d for d in profile.training_dtypes if d not in profile.matmul_dtypes]
    if extra:
        raise _fail(
            origin, "training_dtypes", f"has {extra[0]!r} not in matmul_dtypes", "add it to matmul_dtypes"
        )
    if profile.fp8_block_scaling and "fp8_e4m3" not in profile.matmul_dtypes:
        raise _fail(origin, "fp8_block_scaling", "is true without fp8_e4m3", "add fp8_e4m3 to matmul_dtypes")
    if not profile.can_serve(profile.default_serving_format):
        needs = ", ".join(SERVING_FORMATS[profile.default_serving_format])
        raise _fail(
            origin,
            "default_serving_format",
            f"{profile.default_serving_format!r} is not runnable on this target (needs {needs})",
            "pick a format whose dtypes are in matmul_dtypes",
        )
    if not profile.description:
        raise _fail(origin, "description", "is empty", "describe the target in one line")
    if not _NAME_RE.match(profile.name):
        raise _fail(origin, "name", f"is {profile.name!r}", "use lower-case letters, digits and '-'")


def _profile_from_dict(raw: dict[str, Any], origin: str) -> TargetProfile:
    _check_fields(raw, origin)
    device_type = _check_choice(raw, "device_type", KINDS, origin)
    profile = TargetProfile(
        name=raw["name"],
        description=raw["description"].strip(),
        device_type=device_type,
        memory_per_device_gib=_check_memory(raw, device_type, origin),
        matmul_dtypes=_check_names(raw, "matmul_dtypes", DTYPES, origin),
        training_dtypes=_check_names(raw, "training_dtypes", PRECISIONS, origin),
        fp8_block_scaling=raw["fp8_block_scaling"],
        overflow_mode=_check_choice(raw, "overflow_mode", OVERFLOW_MODES, origin),
        default_serving_format=_check_choice(raw, "default_serving_format", tuple(SERVING_FORMATS), origin),
        sources=_check_sources(raw, origin),
        stacks=parse_stacks(raw["stacks"], origin),
    )
    if not profile.matmul_dtypes:
        raise _fail(origin, "matmul_dtypes", "is empty", f"list dtypes from: {', '.join(DTYPES)}")
    _check_consistency(profile, origin)
    return profile


def _parse(data: bytes, origin: str) -> TargetProfile:
    if tomllib is None:
        raise ImportError(
            "reading target profiles on Python 3.10 needs the 'tomli' package (pip install tomli)"
        )
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CrosschipError(
            f"{origin}: not valid TOML: {exc}", fix="fix the syntax of the target file"
        ) from exc
    return _profile_from_dict(raw, origin)


# ---------------------------------------------------------------- public API


def list_targets() -> list[str]:
    """Names of the targets shipped with crosschip, sorted."""
    folder = resources.files(__name__)
    return sorted(entry.name[: -len(".toml")] for entry in folder.iterdir() if entry.name.endswith(".toml"))


@functools.cache
def load_target(name: str) -> TargetProfile:
    """Load a shipped target by name, e.g. 'ascend-910b'."""
    known = list_targets()
    if name not in known:
        raise CrosschipError(f"unknown target {name!r}", fix=f"use one of: {', '.join(known)}")
    origin = f"crosschip/targets/{name}.toml"
    profile = _parse(resources.files(__name__).joinpath(f"{name}.toml").read_bytes(), origin)
    if profile.name != name:
        raise _fail(origin, "name", f"is {profile.name!r} but the file is {name}.toml", "make them match")
    return profile


def load_target_file(path: Path) -> TargetProfile:
    """Load and validate a target profile from any TOML file (e.g. a user's own accelerator)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CrosschipError(f"cannot read target file {path}: {exc.strerror}", fix="check the path") from exc
    return _parse(data, str(path))
