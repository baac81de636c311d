"""Architecture check: the model class (config.json `architectures`) against what the chosen serving stack runs.

Each stack of a target profile records `architectures` (documented as supported on that chip),
`architectures_unverified` (supported by the same stack on sibling hardware, not documented on this
chip), the date the list was checked, and its source (crosschip.targets.stacks). The cpu target's
transformers stack lists `any-transformers-causal-lm`: crosschip serve runs whatever
AutoModelForCausalLM loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crosschip.check.result import CheckResult
from crosschip.errors import CrosschipError
from crosschip.targets import ANY_TRANSFORMERS_CAUSAL_LM, Stack, TargetProfile, list_targets, load_target


def transformers_causal_lms() -> set[str]:
    """Class names transformers' AutoModelForCausalLM maps a model_type to (no model is imported)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


def _supported(stack: Stack, arch: str) -> bool:
    if ANY_TRANSFORMERS_CAUSAL_LM in stack.architectures and arch in transformers_causal_lms():
        return True
    return arch in stack.architectures


def _other_targets(arch: str, exclude: str) -> list[str]:
    """Shipped targets one of whose serving stacks documents `arch` (for the fix)."""
    return [n for n in list_targets() if n != exclude and any(_supported(s, arch) for s in load_target(n).stacks)]


def _fail_fix(arch: str, profile: TargetProfile, stack: Stack) -> str:
    others = [s.name for s in profile.stacks if s is not stack and _supported(s, arch)]
    if others:
        return f"serve it with --stack {' or '.join(others)}"
    targets = _other_targets(arch, profile.name)
    where = f"targets that list it: {', '.join(targets)}" if targets else "no shipped target lists it"
    return f"serve it on another target ({where}), or port the model to {stack.name}"


def check_architecture(config: dict[str, Any], profile: TargetProfile, stack: Stack | None = None) -> CheckResult:
    """PASS if the stack (default: the profile's first) documents the architecture on this target, WARN if only
    on sibling hardware or the stack has no list, FAIL if the list does not name it."""
    stack = stack or profile.stack()
    archs = config.get("architectures")
    arch = str(archs[0]) if isinstance(archs, list) and archs else None
    refs = stack.source_refs("architectures")
    source = f"rule: architectures; list: {', '.join(refs) or 'none'}, checked {stack.architectures_date or '-'}"
    where = f"{stack.name} on {profile.name}"
    details = {"architecture": arch, "stack": stack.name, "serving_stacks": list(profile.serving_stacks),
               "rule": "architectures", "sources": refs, "date": stack.architectures_date}
    if arch is None:
        return CheckResult("architecture", "WARN", "config.json names no architecture (`architectures` is missing)",
                           "add the model class to config.json, e.g. \"architectures\": [\"LlamaForCausalLM\"]",
                           details)
    if not stack.architectures and not stack.architectures_unverified:
        return CheckResult("architecture", "WARN", f"the {stack.name} stack of {profile.name} lists no architectures",
                           f"run a smoke test of {arch} on {where}, or add architectures (with sources) to the "
                           "profile", details)
    if _supported(stack, arch):
        return CheckResult("architecture", "PASS", f"{arch} is supported by {where} ({source})", None, details)
    if arch in stack.architectures_unverified:
        return CheckResult(
            "architecture", "WARN", f"{arch} is supported by {stack.name} on related hardware but not documented on "
            f"{profile.name} ({source})", f"run a smoke test on one {profile.name} device before booking the cluster",
            details,
        )
    return CheckResult("architecture", "FAIL", f"{arch} is not among the architectures {where} supports ({source})",
                       _fail_fix(arch, profile, stack), details)



def check_loadable(root: Path) -> CheckResult:
    """PASS if this transformers builds the model of root/config.json (on the meta device: no memory) with the
    attention crosschip picks (`models.attention_for`); FAIL with transformers' reason otherwise.

    crosschip's convert, verify and serve all load the model through transformers, so when this fails the
    checkpoint cannot be verified or served here, whatever a target's stacks list.
    """
    import transformers

    from crosschip.check.formats import meta_model, read_config
    from crosschip.models import attention_for

    version = f"transformers {transformers.__version__}"
    details: dict[str, Any] = {"transformers": transformers.__version__}
    fix = "use a transformers release that builds this architecture, or fix config.json"
    try:
        cfg = read_config(root)
        details["model_type"] = cfg.model_type
        attention = attention_for(cfg)
        model = meta_model(cfg, attention)
    except CrosschipError as e:
        return CheckResult("load", "FAIL", f"{version} cannot build this model: {e.problem}", fix, details)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, crosschip cannot load this model
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return CheckResult("load", "FAIL", f"{version} cannot build {details.get('model_type')!r}: {first}", fix,
                           details)
    name = type(model).__name__
    details.update(architecture=name, attention=attention)
    why = "" if attention == "sdpa" else f" ({name} does not support sdpa)"
    return CheckResult("load", "PASS", f"{version} builds {name} with {attention} attention{why}: crosschip can "
                       "convert, verify and serve it", None, details)
