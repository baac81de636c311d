"""The import graph keeps its layers (issue 14, item 7), read from the source with `ast` (imports inside functions
count too): the artifact and the format codecs depend on no stage, and check's sub-checks do not import the module
that runs them."""

from __future__ import annotations

import ast
from pathlib import Path

import crosschip

SRC = Path(crosschip.__file__).parent
# data/tokenizer.py is not among them: the tokenizer files are part of the artifact (checkpoint.write_checkpoint
# saves them), and that module is checked below to import no stage itself.
STAGES = ("convert", "check", "verify", "serve", "train", "probe", "demo", "cli")


def imports(path: Path) -> set[str]:
    """Every crosschip module a file imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crosschip"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("crosschip"))
    return found


def stage_imports(path: Path) -> list[str]:
    return sorted(m for m in imports(path) if m.split(".")[1:2] and m.split(".")[1] in STAGES)


def test_the_checkpoint_and_the_format_codecs_import_no_stage() -> None:
    for path in [SRC / "checkpoint.py", SRC / "data" / "tokenizer.py", *sorted((SRC / "formats").glob("*.py"))]:
        assert stage_imports(path) == [], path.relative_to(SRC)


def test_check_sub_checks_do_not_import_the_runner() -> None:
    subchecks = [p for p in sorted((SRC / "check").glob("*.py")) if p.name not in ("run.py", "__init__.py")]
    assert subchecks
    for path in subchecks:
        assert not {m for m in imports(path) if m.startswith("crosschip.check.run")}, path.name
