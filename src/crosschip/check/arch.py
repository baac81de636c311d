"""Architecture check: the model class (config.json `architectures`) against what the target's serving stacks run.

Each target profile records `serving_architectures` (documented as supported on that chip),
`serving_architectures_unverified` (supported by the same stack on sibling hardware, not documented
on this chip), the URL of that list and the date it was checked. The cpu target lists
`any-transformers-causal-lm`: crosschip serve runs whatever AutoModelForCausalLM loads.
"""

from __future__ import annotations

from typing import Any

from crosschip.check.run import CheckResult
from crosschip.targets import ANY_TRANSFORMERS_CAUSAL_LM, TargetProfile, list_targets, load_target


def transformers_causal_lms() -> set[str]:
    """Class names transformers' AutoModelForCausalLM maps a model_type to (no model is imported)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


def _supported(profile: TargetProfile, arch: str) -> bool:
    if ANY_TRANSFORMERS_CAUSAL_LM in profile.serving_architectures and arch in transformers_causal_lms():
        return True
    return arch in profile.serving_architectures


def _other_targets(arch: str, exclude: str) -> list[str]:
    """Shipped targets whose serving stacks document `arch` (for the fix)."""
    return [n for n in list_targets() if n != exclude and _supported(load_target(n), arch)]


def check_architecture(config: dict[str, Any], profile: TargetProfile) -> CheckResult:
    """PASS if the target's stacks document the architecture, WARN if only on sibling hardware or the
    profile has no list, FAIL if the list does not name it."""
    archs = config.get("architectures")
    arch = str(archs[0]) if isinstance(archs, list) and archs else None
    stacks = ", ".join(profile.serving_stacks)
    source = f"list: {profile.serving_architectures_source}, checked {profile.serving_architectures_date}"
    details = {"architecture": arch, "serving_stacks": list(profile.serving_stacks),
               "source": profile.serving_architectures_source, "date": profile.serving_architectures_date}
    if arch is None:
        return CheckResult("architecture", "WARN", "config.json names no architecture (`architectures` is missing)",
                           "add the model class to config.json, e.g. \"architectures\": [\"LlamaForCausalLM\"]",
                           details)
    if not profile.serving_architectures and not profile.serving_architectures_unverified:
        return CheckResult("architecture", "WARN", f"the {profile.name} profile lists no serving architectures",
                           "add serving_architectures (with source and date) to the target profile", details)
    if _supported(profile, arch):
        return CheckResult("architecture", "PASS", f"{arch} is supported by {stacks} ({source})", None, details)
    if arch in profile.serving_architectures_unverified:
        return CheckResult(
            "architecture", "WARN",
            f"{arch} is supported by {stacks} on related hardware but not documented on {profile.name} ({source})",
            f"run a smoke test on one {profile.name} device before booking the cluster", details,
        )
    others = _other_targets(arch, profile.name)
    where = f"targets that list it: {', '.join(others)}" if others else "no shipped target lists it"
    return CheckResult(
        "architecture", "FAIL", f"{arch} is not among the architectures {stacks} support on {profile.name} ({source})",
        f"serve it on another target ({where}), or port the model to {stacks}", details,
    )
