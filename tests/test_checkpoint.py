"""The hand-off checkpoint: layout, manifest, loading with stock transformers, validation, atomicity.

Everything here uses real files and real transformers models (the `tiny` Llama and the
`deepseek-tiny` MLA+MoE presets); nothing under test is mocked.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from crosschip import checkpoint
from crosschip.checkpoint import INDEX_NAME, LATEST_POINTER, MANIFEST_NAME, SINGLE_NAME
from crosschip.errors import CrosschipError

PRESETS = ("tiny", "deepseek-tiny")
SMALL_SHARDS = "200KB"  # the tiny presets are ~0.5 MB in fp32: several shards
TEXT = "Return the number of items in the sequence."


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file below root (relative posix name -> content): compare before/after an operation."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def shards(root: Path) -> list[Path]:
    return sorted(root.glob("*.safetensors"))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2))


def ids_for(tok: Any) -> torch.Tensor:
    """A batch of two: real text after BOS, and a fixed pseudo-random sequence over the whole vocab."""
    text = [tok.bos_token_id, *tok(TEXT, add_special_tokens=False)["input_ids"]]
    rand = torch.randint(0, len(tok), (len(text),), generator=torch.Generator().manual_seed(1)).tolist()
    return torch.tensor([text, rand])


@torch.no_grad()
def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, make_model: Any, tiny_tokenizer: Any) -> dict[str, Any]:
    """Per (preset, shard size): the in-memory model and the checkpoint directory it was written to."""
    root = tmp_path_factory.mktemp("written")
    out: dict[str, Any] = {}
    for preset in PRESETS:
        model = make_model(preset)
        for shard_size in ("2GB", SMALL_SHARDS):
            path = root / f"{preset}-{shard_size}"
            provenance = {"preset": preset, "note": "test"}
            checkpoint.write_checkpoint(path, model, tiny_tokenizer, provenance, shard_size=shard_size)
            out[f"{preset}/{shard_size}"] = (model, path)
    return out


@pytest.fixture()
def ckpt(written: dict[str, Any], tmp_path: Path) -> Path:
    """A private copy of the sharded tiny checkpoint, free to corrupt."""
    dst = tmp_path / "ckpt"
    shutil.copytree(written[f"tiny/{SMALL_SHARDS}"][1], dst)
    return dst


# ------------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("shard_size", ["2GB", SMALL_SHARDS])
def test_layout_and_manifest(written: dict[str, Any], preset: str, shard_size: str) -> None:
    model, path = written[f"{preset}/{shard_size}"]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", INDEX_NAME, "tokenizer.json", MANIFEST_NAME} <= names
    assert not [n for n in names if n.startswith(".")], "temp files left in the checkpoint"
    files = shards(path)
    if shard_size == SMALL_SHARDS:
        assert len(files) >= 3 and all(f.name.startswith("model-0000") for f in files)
    else:
        assert [f.name for f in files] == [SINGLE_NAME]
    # The index (written also for one shard) maps every stored tensor to the shard that holds it.
    # (Stored names are the HF checkpoint's: transformers 5 saves its fused MoE experts per expert.)
    weight_map = read_json(path / INDEX_NAME)["weight_map"]
    stored = {name: f.name for f in files for name in load_file(f)}
    assert weight_map == stored
    numel = sum(t.numel() for f in files for t in load_file(f).values())
    assert numel == sum(t.numel() for t in model.state_dict().values())  # parameters + persistent buffers

    manifest = read_json(path / MANIFEST_NAME)
    assert manifest["format_version"] == checkpoint.FORMAT_VERSION
    assert manifest["conversions"] == [] and manifest["verifications"] == []
    assert manifest["provenance"]["preset"] == preset
    assert set(manifest["provenance"]["versions"]) >= {"crosschip", "torch", "transformers", "safetensors", "python"}
    assert manifest["model"]["architecture"] == type(model).__name__
    assert manifest["model"]["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert manifest["model"]["dtype"] == "float32"
    recorded = manifest["files"]
    assert set(recorded) == names - {MANIFEST_NAME}
    for name, meta in recorded.items():
        data = (path / name).read_bytes()
        assert meta == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name


def test_checkpoint_files_are_world_readable(written: dict[str, Any]) -> None:
    """Checkpoints get copied and served by other users: no 0600/0700 leftovers of temp files."""
    path = written[f"tiny/{SMALL_SHARDS}"][1]
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o777 & ~umask
    for f in path.iterdir():
        assert (f.stat().st_mode & 0o777) == 0o666 & ~umask, f.name


@pytest.mark.parametrize("preset", PRESETS)
def test_transformers_and_crosschip_loaders_agree_exactly(
    written: dict[str, Any], tiny_tokenizer: Any, make_model: Any, preset: str
) -> None:
    model, path = written[f"{preset}/{SMALL_SHARDS}"]
    hf_model = AutoModelForCausalLM.from_pretrained(path)
    hf_tok = AutoTokenizer.from_pretrained(path)
    assert type(hf_model) is type(model)
    assert hf_tok(TEXT)["input_ids"] == tiny_tokenizer(TEXT)["input_ids"]
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id)
    ours, ckpt = checkpoint.load_model(path)
    assert ckpt.manifest is not None and ckpt.files == [f.name for f in shards(path)]
    assert all(p.dtype == torch.float32 for p in [*hf_model.parameters(), *ours.parameters()])
    ids = ids_for(hf_tok)
    expected = logits(model, ids)
    assert torch.equal(logits(hf_model, ids), expected)
    assert torch.equal(logits(ours, ids), expected)
    assert not torch.equal(logits(make_model(preset, seed=1), ids), expected)  # the comparison can fail


def test_read_state_dict_equals_saved_weights(written: dict[str, Any]) -> None:
    model, path = written[f"tiny/{SMALL_SHARDS}"]  # Llama: stored names are the state_dict's
    state = checkpoint.read_state_dict(checkpoint.open_checkpoint(path))
    expected = model.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    half = checkpoint.read_state_dict(checkpoint.open_checkpoint(path), dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in half.values() if t.is_floating_point())


# ------------------------------------------------------------------------------------------------ validation


def test_flipped_byte_is_a_sha256_mismatch(ckpt: Path) -> None:
    shard = max(shards(ckpt), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # inside the tensor data: the header stays valid, so only the hash can notice
    shard.write_bytes(bytes(data))
    for load in (checkpoint.open_checkpoint, checkpoint.load_model):
        with pytest.raises(CrosschipError, match="sha256") as e:
            load(ckpt)
        assert shard.name in str(e.value) and e.value.fix
    checkpoint.open_checkpoint(ckpt, verify=False)  # the check is the manifest's, not a parse failure


def test_deleted_shard_is_incomplete(ckpt: Path) -> None:
    shards(ckpt)[1].unlink()
    with pytest.raises(CrosschipError, match="incomplete"):
        checkpoint.open_checkpoint(ckpt)
    with pytest.raises(CrosschipError, match="incomplete"):
        checkpoint.open_checkpoint(ckpt, verify=False)  # the index alone already tells


def test_deleted_tokenizer_file_is_incomplete(ckpt: Path) -> None:
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CrosschipError, match="incomplete.*tokenizer.json"):
        checkpoint.open_checkpoint(ckpt)


class OpenWatch:
    """Names of files opened inside one directory, seen by Linux inotify (IN_OPEN).

    inotify sees opens from any code (Python, the Rust safetensors reader, C libraries), which is
    what proving "this file was never opened" needs.
    """

    IN_OPEN = 0x20
    _EVENT = struct.Struct("iIII")

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if not hasattr(libc, "inotify_init1"):
            pytest.skip("inotify is Linux-only")
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, os.fsencode(directory), self.IN_OPEN) < 0:
            pytest.skip(f"inotify unavailable: {os.strerror(ctypes.get_errno())}")

    def opened(self) -> set[str]:
        names: set[str] = set()
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return names
            pos = 0
            while pos < len(buf):
                _wd, _mask, _cookie, length = self._EVENT.unpack_from(buf, pos)
                start = pos + self._EVENT.size
                names.add(buf[start : start + length].rstrip(b"\0").decode())
                pos = start + length

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def watch_opens(directory: Path) -> Iterator[OpenWatch]:
    watch = OpenWatch(directory)
    try:
        yield watch
    finally:
        watch.close()


def plant_outside_shard(ckpt: Path, outside: Path) -> Path:
    """A valid shard outside the checkpoint holding the real tensors of shard 1 (so a loader that
    followed the index there would succeed silently)."""
    outside.mkdir()
    evil = outside / "evil.safetensors"
    save_file(load_file(shards(ckpt)[0]), evil)
    return evil


@pytest.mark.parametrize("style", ["relative", "absolute"])
def test_index_naming_a_path_outside_is_refused_unopened(ckpt: Path, tmp_path: Path, style: str) -> None:
    evil = plant_outside_shard(ckpt, tmp_path / "outside")
    name = "../outside/evil.safetensors" if style == "relative" else str(evil)
    index = read_json(ckpt / INDEX_NAME)
    first = shards(ckpt)[0].name
    index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    write_json(ckpt / INDEX_NAME, index)
    (ckpt / MANIFEST_NAME).unlink()  # a plain HF checkpoint: no sha256 table to catch the edit instead
    with watch_opens(evil.parent) as watch:
        for load in (checkpoint.open_checkpoint, checkpoint.load_model):
            with pytest.raises(CrosschipError, match="unsafe path") as e:
                load(ckpt)
            assert name in str(e.value)
        assert evil.name not in watch.opened()
        evil.read_bytes()
        assert evil.name in watch.opened()  # the watch itself works


def test_shard_symlink_to_outside_is_refused(ckpt: Path, tmp_path: Path) -> None:
    evil = plant_outside_shard(ckpt, tmp_path / "outside")
    first = shards(ckpt)[0]
    first.unlink()
    first.symlink_to(evil)
    (ckpt / MANIFEST_NAME).unlink()
    with watch_opens(evil.parent) as watch:
        with pytest.raises(CrosschipError, match="resolves outside"):
            checkpoint.load_model(ckpt)
        assert evil.name not in watch.opened()


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "sub/../../x", "a\\..\\x"])
def test_manifest_naming_a_path_outside_is_refused(ckpt: Path, tmp_path: Path, name: str) -> None:
    (tmp_path / "x").write_bytes(b"outside")
    manifest = read_json(ckpt / MANIFEST_NAME)
    manifest["files"][name] = {"sha256": "0" * 64, "bytes": 7}
    write_json(ckpt / MANIFEST_NAME, manifest)
    with pytest.raises(CrosschipError, match="unsafe path"):
        checkpoint.open_checkpoint(ckpt)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(format_version=99), "format_version 99"),
        (lambda m: m.update(files=["config.json"]), "malformed"),
        (lambda m: m["files"]["config.json"].pop("sha256"), "malformed"),
    ],
    ids=["version", "files-list", "entry-without-sha"],
)
def test_malformed_manifest_is_a_crosschip_error(ckpt: Path, edit: Any, match: str) -> None:
    manifest = read_json(ckpt / MANIFEST_NAME)
    edit(manifest)
    write_json(ckpt / MANIFEST_NAME, manifest)
    with pytest.raises(CrosschipError, match=match):
        checkpoint.open_checkpoint(ckpt)


def test_manifest_that_is_not_json(ckpt: Path) -> None:
    (ckpt / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CrosschipError, match="not valid JSON"):
        checkpoint.open_checkpoint(ckpt)


@pytest.mark.parametrize("weight_map", ["shards", {"lm_head.weight": 3}, None])
def test_malformed_index_is_a_crosschip_error(ckpt: Path, weight_map: Any) -> None:
    write_json(ckpt / INDEX_NAME, {"weight_map": weight_map})
    with pytest.raises(CrosschipError, match="index|weight_map"):
        checkpoint.open_checkpoint(ckpt, verify=False)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CrosschipError, match="not a checkpoint"):
        checkpoint.open_checkpoint(tmp_path)
    with pytest.raises(CrosschipError, match="does not exist"):
        checkpoint.open_checkpoint(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")  # a config but no weights
    with pytest.raises(CrosschipError):
        checkpoint.open_checkpoint(tmp_path)


def test_config_without_weights(ckpt: Path) -> None:
    for f in [*shards(ckpt), ckpt / INDEX_NAME]:
        f.unlink()
    with pytest.raises(CrosschipError, match="no weights"):
        checkpoint.open_checkpoint(ckpt, verify=False)


def test_resolve_checkpoint_dir_follows_latest_pointer(tmp_path: Path, make_checkpoint: Any) -> None:
    run = tmp_path / "run"
    make_checkpoint("tiny", run / "step-00000002", extra=lambda tmp: (tmp / "train_state").mkdir())
    (run / LATEST_POINTER).write_text("step-00000002\n")
    model_dir = run / "step-00000002" / "model"
    assert checkpoint.resolve_checkpoint_dir(run) == model_dir.resolve()
    assert checkpoint.resolve_checkpoint_dir(model_dir) == model_dir
    assert checkpoint.open_checkpoint(run).manifest["provenance"]["preset"] == "tiny"

    (run / LATEST_POINTER).write_text("step-00000009\n")  # a pointer to a pruned/missing step
    with pytest.raises(CrosschipError, match="step-00000009.*holds no checkpoint"):
        checkpoint.resolve_checkpoint_dir(run)
    for bad in ("../step-00000002", "/etc", ""):
        (run / LATEST_POINTER).write_text(bad)
        with pytest.raises(CrosschipError, match="unsafe path"):
            checkpoint.resolve_checkpoint_dir(run)


@pytest.mark.parametrize("keep", [0, 5, 1000])
def test_truncated_single_file_without_manifest(written: dict[str, Any], tmp_path: Path, keep: int) -> None:
    path = tmp_path / "ckpt"
    shutil.copytree(written["tiny/2GB"][1], path)
    for name in (MANIFEST_NAME, INDEX_NAME):  # a bare HF checkpoint: only the file itself can tell
        (path / name).unlink()
    single = path / SINGLE_NAME
    single.write_bytes(single.read_bytes()[:keep])
    with pytest.raises(CrosschipError, match="not a readable safetensors file") as e:
        checkpoint.load_model(path)
    assert e.value.fix


def test_truncated_shard_without_manifest(ckpt: Path) -> None:
    shard = shards(ckpt)[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (ckpt / MANIFEST_NAME).unlink()
    with pytest.raises(CrosschipError, match=f"{shard.name} is not a readable safetensors file"):
        checkpoint.load_model(ckpt)


def test_index_listing_a_tensor_no_shard_has(ckpt: Path) -> None:
    index = read_json(ckpt / INDEX_NAME)
    index["weight_map"]["model.extra.weight"] = shards(ckpt)[0].name
    write_json(ckpt / INDEX_NAME, index)
    with pytest.raises(CrosschipError, match="absent.*model.extra.weight"):
        checkpoint.load_model(ckpt, verify=False)


# ------------------------------------------------------------------------------------------------ atomicity


def test_existing_dir_is_not_overwritten(ckpt: Path, make_model: Any, tiny_tokenizer: Any) -> None:
    before = tree_bytes(ckpt)
    other = make_model("tiny", seed=1)
    with pytest.raises(CrosschipError, match="already exists") as e:
        checkpoint.write_checkpoint(ckpt, other, tiny_tokenizer, {})
    assert "--overwrite" in (e.value.fix or "")
    assert tree_bytes(ckpt) == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]


def test_overwrite_replaces_whole_and_leaves_nothing_behind(
    ckpt: Path, make_model: Any, tiny_tokenizer: Any
) -> None:
    (ckpt / "stale.txt").write_text("from the old checkpoint")
    model = make_model("tiny", seed=1)
    checkpoint.write_checkpoint(ckpt, model, tiny_tokenizer, {"run": 2}, overwrite=True)
    assert not (ckpt / "stale.txt").exists()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]
    loaded, opened = checkpoint.load_model(ckpt)
    assert opened.manifest["provenance"]["run"] == 2
    ids = torch.tensor([[0, 5, 9, 42]])
    assert torch.equal(logits(loaded, ids), logits(model, ids))


class SaveCrash(RuntimeError):
    pass


def crash(_tmp: Path) -> None:
    raise SaveCrash("simulated crash while saving")


def test_crash_during_save_leaves_no_directory(tmp_path: Path, make_checkpoint: Any) -> None:
    final = tmp_path / "runs" / "step-00000001"
    with pytest.raises(SaveCrash):
        make_checkpoint("tiny", final, extra=crash)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []  # no temp directory left either


def test_crash_during_overwrite_keeps_the_old_checkpoint(ckpt: Path, make_checkpoint: Any) -> None:
    before = tree_bytes(ckpt)
    with pytest.raises(SaveCrash):
        make_checkpoint("deepseek-tiny", ckpt, overwrite=True, extra=crash)
    assert tree_bytes(ckpt) == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]
    checkpoint.open_checkpoint(ckpt)


def test_extra_files_sit_beside_the_model(tmp_path: Path, make_checkpoint: Any) -> None:
    def add_state(tmp: Path) -> None:
        (tmp / "train_state").mkdir()
        (tmp / "train_state" / "state.txt").write_text("step 3")

    out = make_checkpoint("tiny", tmp_path / "step", extra=add_state)
    assert sorted(p.name for p in out.iterdir()) == ["model", "train_state"]
    assert (out / "train_state" / "state.txt").read_text() == "step 3"
    assert "train_state" not in read_json(out / "model" / MANIFEST_NAME)["files"]
    checkpoint.open_checkpoint(out / "model")


def test_append_record_keeps_the_manifest_valid(ckpt: Path) -> None:
    files_before = read_json(ckpt / MANIFEST_NAME)["files"]
    checkpoint.append_record(ckpt, "conversions", {"to": "bf16", "n": 1})
    checkpoint.append_record(ckpt, "verifications", {"target": "cpu", "ok": True})
    checkpoint.append_record(ckpt, "conversions", {"to": "fp16", "n": 2})
    manifest = read_json(ckpt / MANIFEST_NAME)  # valid JSON after every rewrite
    assert manifest["conversions"] == [{"to": "bf16", "n": 1}, {"to": "fp16", "n": 2}]
    assert manifest["verifications"] == [{"target": "cpu", "ok": True}]
    assert manifest["files"] == files_before
    assert checkpoint.open_checkpoint(ckpt).manifest == manifest  # still verifies: its own hash is not listed
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError):
        checkpoint.append_record(ckpt, "notes", {})


def test_append_record_needs_a_manifest(ckpt: Path) -> None:
    (ckpt / MANIFEST_NAME).unlink()
    with pytest.raises(CrosschipError, match=MANIFEST_NAME):
        checkpoint.append_record(ckpt, "conversions", {})
    assert not (ckpt / MANIFEST_NAME).exists()
