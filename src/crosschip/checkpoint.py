"""The hand-off artifact: a standard Hugging Face checkpoint directory plus `crosschip.json`.

Layout of a checkpoint directory (what `AutoModelForCausalLM.from_pretrained` loads unchanged):
  config.json, generation_config.json, model-0000K-of-0000N.safetensors,
  model.safetensors.index.json, tokenizer files, crosschip.json

`crosschip.json` records provenance, the sha256 of every other file, and the `conversions` and
`verifications` lists that later stages append to. This module owns reading, validating and
writing it; nothing else writes the manifest.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import safetensors
import torch
import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

import crosschip
from crosschip.errors import CrosschipError
from crosschip.fsio import atomic_dir, atomic_write_json, normalize_modes, sha256_file

# crosschip reports its own progress; transformers' per-call bars would interleave with it.
transformers.utils.logging.disable_progress_bar()

MANIFEST_NAME = "crosschip.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FORMAT_VERSION = 1
LATEST_POINTER = "latest"  # a training run directory names its newest checkpoint in this file


def safe_member(root: Path, name: str, what: str) -> Path:
    """Resolve a file name read from an index or manifest, refusing anything outside `root`.

    Index files come from whoever published the checkpoint; a name like `../../.ssh/x` or
    `/etc/passwd` must never be opened.
    """
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or "\\" in name or any(p in ("..", "") for p in pure.parts):
        raise CrosschipError(
            f"{what} names an unsafe path {name!r} (absolute or containing '..')",
            "the checkpoint is malformed or malicious: re-download it from a trusted source",
        )
    path = (root / pure).resolve()
    if not path.is_relative_to(containment_root(root)):
        raise CrosschipError(f"{what} names {name!r}, which resolves outside {root}", "re-download the checkpoint")
    return path


def containment_root(root: Path) -> Path:
    """The folder a checkpoint's files may resolve into: the checkpoint itself, or, for a snapshot
    in the Hugging Face cache (`<cache>/models--org--name/snapshots/<revision>/`, whose files are
    symlinks to `../../blobs/<hash>`), that model's cache folder, and no further."""
    resolved = Path(root).resolve()
    repo = resolved.parent.parent
    if resolved.parent.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
        return repo
    return resolved


def resolve_checkpoint_dir(path: Path) -> Path:
    """Accept a checkpoint directory, or a training run directory whose `latest` names one."""
    path = Path(path)
    if not path.exists():
        raise CrosschipError(f"checkpoint {path} does not exist", "pass a checkpoint directory or a training --out dir")
    if (path / "config.json").is_file():
        return path
    pointer = path / LATEST_POINTER
    if pointer.is_file():
        model_dir = safe_member(path, pointer.read_text().strip(), f"{pointer}") / "model"
        if not (model_dir / "config.json").is_file():
            raise CrosschipError(
                f"{pointer} names {model_dir.parent.name!r}, which holds no checkpoint (deleted or incomplete)",
                f"write an existing step-N directory name into {pointer}, or pass a step's model/ folder",
            )
        return model_dir
    raise CrosschipError(
        f"{path} is not a checkpoint: no config.json (nor a training run's '{LATEST_POINTER}' file)",
        "pass the directory that holds config.json and the safetensors files",
    )


def _tensor_names(path: Path) -> list[str]:
    """Tensor names in a safetensors header; a torn or foreign file is a CrosschipError."""
    try:
        with safetensors.safe_open(path, "pt") as f:
            return list(f.keys())  # noqa: SIM118 - safe_open has no __iter__
    except (safetensors.SafetensorError, OSError) as e:
        raise CrosschipError(f"{path} is not a readable safetensors file ({e})", "re-copy the file") from e


def weight_files(root: Path) -> dict[str, str]:
    """Map every tensor name to its safetensors file (validated), from the index or the single file."""
    index_path = root / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CrosschipError(f"{index_path} is not a valid safetensors index ({e})", "re-create it") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CrosschipError(f"{index_path}: weight_map is not a {{tensor: file}} table", "re-create it")
        for name in set(weight_map.values()):
            if not safe_member(root, name, str(index_path)).is_file():
                raise CrosschipError(
                    f"checkpoint {root} is incomplete: shard {name} listed in {INDEX_NAME} is missing",
                    "copy the missing shard or re-save the checkpoint",
                )
        return dict(weight_map)
    if (root / SINGLE_NAME).is_file():
        # Through safe_member too: a model.safetensors symlink may point anywhere.
        return {k: SINGLE_NAME for k in _tensor_names(safe_member(root, SINGLE_NAME, str(root)))}
    raise CrosschipError(
        f"checkpoint {root} has no weights ({SINGLE_NAME} or {INDEX_NAME})",
        "only safetensors checkpoints are loaded; convert .bin/.pt weights to safetensors first",
    )


@dataclass
class Checkpoint:
    """A validated checkpoint directory."""

    path: Path
    config: PretrainedConfig
    manifest: dict[str, Any] | None  # None for a plain HF checkpoint not written by crosschip
    weight_map: dict[str, str]

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


def _manifest_files(root: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's {name: {"sha256", "bytes"}} table, checked for shape (a hand-edited one may not be)."""
    files = manifest.get("files", {})
    well_formed = isinstance(files, dict) and all(
        isinstance(meta, dict) and {"sha256", "bytes"} <= meta.keys() for meta in files.values()
    )
    if not well_formed:
        raise CrosschipError(f"{root / MANIFEST_NAME} has a malformed 'files' table", "restore it from the original")
    return files


def verify_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists is present with the recorded sha256."""
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CrosschipError(
            f"{root / MANIFEST_NAME} has format_version {version!r}; this crosschip reads {FORMAT_VERSION}",
            "upgrade crosschip or re-save the checkpoint",
        )
    for name, meta in _manifest_files(root, manifest).items():
        path = safe_member(root, name, MANIFEST_NAME)
        if not path.is_file():
            raise CrosschipError(f"checkpoint {root} is incomplete: {name} is missing", "re-copy the checkpoint")
        if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            raise CrosschipError(
                f"checkpoint {root}: sha256 of {name} does not match {MANIFEST_NAME} (corrupt or modified)",
                "re-copy the file from the original checkpoint",
            )


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CrosschipError(f"{path} is not valid JSON ({e})", "restore it from the original checkpoint") from e
    if not isinstance(manifest, dict):
        raise CrosschipError(f"{path} is not a crosschip manifest", "restore it from the original checkpoint")
    return manifest


def open_checkpoint(path: Path, verify: bool = True) -> Checkpoint:
    """Validate a checkpoint: config, weight files, and (if present) the manifest's sha256s."""
    root = resolve_checkpoint_dir(Path(path))
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CrosschipError(f"{root}/config.json cannot be read ({e})", "restore config.json") from e
    weight_map = weight_files(root)
    manifest = read_manifest(root)
    if manifest is not None and verify:
        verify_manifest(root, manifest)
    return Checkpoint(root, config, manifest, weight_map)


def read_state_dict(ckpt: Checkpoint, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor from the checkpoint's safetensors files (never pickle)."""
    state: dict[str, torch.Tensor] = {}
    for name in ckpt.files:
        path = safe_member(ckpt.path, name, INDEX_NAME)
        try:
            with safetensors.safe_open(path, "pt") as f:
                for key in f.keys():  # noqa: SIM118
                    t = f.get_tensor(key)
                    state[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except (safetensors.SafetensorError, OSError) as e:
            raise CrosschipError(f"{path} is not a readable safetensors file ({e})", "re-copy the file") from e
    missing = set(ckpt.weight_map) - set(state)
    if missing:
        raise CrosschipError(
            f"checkpoint {ckpt.path}: {len(missing)} tensors listed in the index are absent, e.g. {min(missing)}",
            "re-save the checkpoint",
        )
    return state


def storage_format(ckpt: Checkpoint) -> tuple[str, str]:
    """(format, layout) a checkpoint is stored in, from config.json and any Ascend description."""
    from crosschip.formats.layouts import QUANT_DESCRIPTION_NAME, detect_format

    config = json.loads((ckpt.path / "config.json").read_text())
    desc_path = ckpt.path / QUANT_DESCRIPTION_NAME
    description = json.loads(desc_path.read_text()) if desc_path.is_file() else None
    return detect_format(config, description)


def dequantized_state_dict(ckpt: Checkpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every logical tensor in `dtype`, whatever format `convert` wrote (FP8 blocks, INT8 layouts)."""
    from crosschip.formats.layouts import QUANTIZED_FORMATS, decode, group_names

    fmt, layout = storage_format(ckpt)
    stored = read_state_dict(ckpt)
    if fmt not in QUANTIZED_FORMATS:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in stored.items()}
    return {
        name: decode(fmt, layout, name, {n: stored.pop(n) for n in parts}, dtype)
        for name, parts in group_names(list(stored)).items()
    }


def load_model(
    path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, verify: bool = True
) -> tuple[PreTrainedModel, Checkpoint]:
    """crosschip's loader: validate, read safetensors, dequantize any convert format, build in eval mode.

    Attention is sdpa where the class supports it and eager where it does not (`models.attention_for`);
    `models.attention_of(model)` says which one was built, for reports.
    """
    from crosschip.models import attention_for, model_class

    ckpt = open_checkpoint(path, verify=verify)
    state = dequantized_state_dict(ckpt, dtype)
    config = copy.deepcopy(ckpt.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are dequantized here: no quantizer must touch them
    cls = model_class(config)
    fix = "check that config.json matches the weights, or use a transformers release that has this architecture"
    verbosity = transformers.utils.logging.get_verbosity()
    # transformers logs a multi-line load report before it raises; crosschip reports the problem in one line.
    transformers.utils.logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                          attn_implementation=attention_for(config), output_loading_info=True,
                                          ignore_mismatched_sizes=True)  # reported below, by name
    except (ValueError, ImportError, NotImplementedError, RuntimeError) as e:
        # transformers' refusals (an attention backend, a config it cannot build, a shape mismatch) are ValueError
        # or RuntimeError; they describe this checkpoint, so they are the user's one-line error, not a traceback.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CrosschipError(
            f"transformers {transformers.__version__} cannot build {cls.__name__} from {ckpt.path}: {first}", fix
        ) from e
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    # A weight the checkpoint lacks would be left randomly initialised: never serve or verify that.
    missing = sorted(set(info.get("missing_keys") or ()) | {str(m[0]) for m in info.get("mismatched_keys") or ()})
    if missing:
        raise CrosschipError(f"checkpoint {ckpt.path} does not fit {cls.__name__}: {len(missing)} weights are "
                             f"missing or of another shape, e.g. {missing[0]}", fix)
    return model.to(device).eval(), ckpt


def load_tokenizer_if_present(path: Path) -> Any | None:
    from transformers import AutoTokenizer

    root = resolve_checkpoint_dir(Path(path))
    if not (root / "tokenizer.json").is_file() and not (root / "tokenizer_config.json").is_file():
        return None
    return AutoTokenizer.from_pretrained(root, local_files_only=True)


def runtime_versions() -> dict[str, str]:
    return {
        "crosschip": crosschip.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def build_manifest(
    root: Path, provenance: dict[str, Any], model: dict[str, Any], known_sha256: dict[str, str] | None = None
) -> dict[str, Any]:
    """The manifest of the files in root; `known_sha256` skips re-reading files hashed while written."""
    known = known_sha256 or {}
    files = {
        p.name: {"sha256": known.get(p.name) or sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(root.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME
    }
    return {
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "provenance": {**provenance, "versions": runtime_versions()},
        "files": files,
        "conversions": [],
        "verifications": [],
    }


def _ensure_index(root: Path) -> None:
    """Always ship an index, also for a single shard, so every reader takes one path."""
    if (root / INDEX_NAME).exists():
        return
    single = root / SINGLE_NAME
    with safetensors.safe_open(single, "pt") as f:
        keys = sorted(f.keys())  # noqa: SIM118
    index = {"metadata": {"total_size": single.stat().st_size}, "weight_map": {k: SINGLE_NAME for k in keys}}
    (root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_checkpoint(
    out_dir: Path,
    model: PreTrainedModel,
    tokenizer: Any | None,
    provenance: dict[str, Any],
    shard_size: str | int = "2GB",
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save an HF checkpoint + manifest atomically; `extra(tmp)` may add sibling files first.

    `state_dict` replaces the model's own tensors (a sharded model's gathered full weights)."""
    with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
        model_dir = tmp if extra is None else tmp / "model"
        model_dir.mkdir(exist_ok=True)
        model.save_pretrained(model_dir, max_shard_size=shard_size, state_dict=state_dict)
        _ensure_index(model_dir)
        if tokenizer is not None:  # tokenizer_config.json then says whether it adds BOS (transformers 5 drops it)
            from crosschip.data.tokenizer import save_tokenizer

            save_tokenizer(tokenizer, model_dir)
        normalize_modes(model_dir)  # transformers writes 0600 shards; a hand-off must be readable by others
        summary = {
            "architecture": type(model).__name__,
            "model_type": model.config.model_type,
            "num_parameters": sum(p.numel() for p in model.parameters()),  # global numel, sharded or not
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        }
        atomic_write_json(model_dir / MANIFEST_NAME, build_manifest(model_dir, provenance, summary))
        if extra is not None:
            extra(tmp)
    return Path(out_dir)


def append_record(path: Path, kind: str, record: dict[str, Any]) -> None:
    """Append to the manifest's `conversions` or `verifications` list (atomic rewrite)."""
    if kind not in ("conversions", "verifications"):
        raise ValueError(kind)
    root = resolve_checkpoint_dir(Path(path))
    manifest = read_manifest(root)
    if manifest is None:
        raise CrosschipError(f"{root} has no {MANIFEST_NAME}", "convert or re-save it with crosschip first")
    manifest.setdefault(kind, []).append(record)
    atomic_write_json(root / MANIFEST_NAME, manifest)
