"""Planted faults for the interop tests: what a buggy converter or a careless tokenizer edit leaves behind.

Each fault is written into a copy of a converted checkpoint, and the copy's crosschip.json is re-recorded
(sha256 and size of every rewritten file). That is what a faulty converter that writes its own manifest
leaves: the checkpoint passes every integrity check, so only `verify` can catch it. Dropping crosschip.json
instead (a third-party tool) would let verify treat the directory as a plain HF checkpoint and lose the
conversion record it may read; the re-recorded manifest is the stricter test.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from crosschip import checkpoint
from crosschip.fsio import atomic_write_json

# Processors that insert special tokens (BOS/EOS/CLS) around an encoding, in tokenizers' JSON `type` names.
_ADDS_SPECIAL_TOKENS = {"TemplateProcessing", "BertProcessing", "RobertaProcessing"}


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A private copy to plant a fault in; the source checkpoint is never modified."""
    shutil.copytree(src, dst)
    return dst


def rerecord_hashes(root: Path, names: Iterable[str]) -> None:
    """Re-record sha256 and size of rewritten files in root's crosschip.json, as the writer of the fault would."""
    manifest = checkpoint.read_manifest(root)
    assert manifest is not None, f"{root} has no {checkpoint.MANIFEST_NAME}"
    for name in names:
        path = root / name
        manifest["files"][name] = {"sha256": checkpoint.sha256_file(path), "bytes": path.stat().st_size}
    atomic_write_json(root / checkpoint.MANIFEST_NAME, manifest)


def scale_tensors(root: Path, suffix: str, factor: float) -> list[str]:
    """Multiply every tensor whose name ends with `suffix` by `factor`, in place; returns the tensor names."""
    weight_map: dict[str, str] = json.loads((root / checkpoint.INDEX_NAME).read_text())["weight_map"]
    names = sorted(k for k in weight_map if k.endswith(suffix))
    assert names, f"no tensor of {root} ends with {suffix!r}"
    shards = sorted({weight_map[k] for k in names})
    for shard in shards:
        path = root / shard
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
        for name in names:
            if weight_map[name] == shard:
                tensors[name] = (tensors[name].double() * factor).to(tensors[name].dtype)
        save_file(tensors, path, metadata=metadata)
    rerecord_hashes(root, shards)
    return names


def _without_special_tokens(processor: dict[str, Any] | None) -> dict[str, Any] | None:
    """The post-processor minus every step that inserts special tokens (ByteLevel offsets are kept)."""
    if processor is None:
        return None
    if processor.get("type") == "Sequence":
        kept = [p for p in (_without_special_tokens(q) for q in processor.get("processors", [])) if p is not None]
        return {**processor, "processors": kept} if kept else None
    return None if processor.get("type") in _ADDS_SPECIAL_TOKENS else processor


def drop_bos(root: Path) -> None:
    """Make root's tokenizer encode text without BOS: post-processor and `add_bos_token`, both in place."""
    tok_json = root / "tokenizer.json"
    spec = json.loads(tok_json.read_text(encoding="utf-8"))
    spec["post_processor"] = _without_special_tokens(spec.get("post_processor"))
    tok_json.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config_path = root / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["add_bos_token"] = False  # transformers rebuilds the post-processor from this flag for some classes
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    rerecord_hashes(root, ["tokenizer.json", "tokenizer_config.json"])
