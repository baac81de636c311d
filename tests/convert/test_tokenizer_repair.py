"""`convert` repairs the tokenizer of crosschip-trained checkpoints saved before it added BOS; serve warns on them.

Training packs every document as BOS + ids + EOS (data/tokenize.py). Tokenizers saved before the fix did not
add that BOS: transformers 5 wrote a token-free template (`$A`), transformers 4 kept the ByteLevel offsets
step. Both are rebuilt here as they were saved, inside real checkpoints whose provenance says crosschip trained
them (a `train_config`), and converted with the real CLI or pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from crosschip import checkpoint
from crosschip.convert.pipeline import ConvertOptions, convert
from crosschip.data.tokenizer import add_bos_to_saved, adds_bos, load_tokenizer
from crosschip.serve.api import _load, bos_warning

TEXT = "Return the value of the"
_A = {"Sequence": {"id": "A", "type_id": 0}}
_B = {"Sequence": {"id": "B", "type_id": 1}}
OLD_POST_PROCESSORS = {
    "transformers-5": {"type": "TemplateProcessing", "single": [_A], "pair": [_A, _B], "special_tokens": {}},
    "transformers-4": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
}
TRAINED = {"train_config": {"model": "tiny", "steps": 3}, "steps": 3, "source": "crosschip train (as saved)"}
THIRD_PARTY = {"source": "external checkpoint"}


def _old_tokenizer(tokenizer: Any, out: Path, post_processor: dict[str, Any]) -> Any:
    """`tokenizer` as crosschip saved it before the fix: no BOS from the post-processor or the config."""
    tokenizer.save_pretrained(out)
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    data["post_processor"] = post_processor
    (out / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("add_bos_token", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    old = load_tokenizer(out)
    assert not adds_bos(old) and old(TEXT)["input_ids"] == tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    return old


def _checkpoint(root: Path, model: Any, tokenizer: Any, provenance: dict[str, Any]) -> Path:
    return checkpoint.write_checkpoint(root, model, tokenizer, provenance=provenance)


def _old_trained(tiny_tokenizer: Any, model: Any, root: Path, saved_by: str) -> Path:
    """A crosschip-trained checkpoint whose tokenizer does not add BOS (saved before the fix)."""
    old = _old_tokenizer(tiny_tokenizer, root / "old-tok", OLD_POST_PROCESSORS[saved_by])
    return _checkpoint(root / "old", model, old, TRAINED)


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.mark.parametrize("saved_by", sorted(OLD_POST_PROCESSORS))
def test_convert_repairs_an_old_crosschip_tokenizer(
    saved_by: str, tiny_tokenizer: Any, make_model: Any, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from crosschip.cli import app

    old_trained = _old_trained(tiny_tokenizer, make_model("tiny"), tmp_path, saved_by)
    before = _files(old_trained)
    out = tmp_path / "fixed"
    result = CliRunner().invoke(app, ["convert", str(old_trained), str(out), "--to", "fp32"])
    assert result.exit_code == 0, result.output
    assert "tokenizer repaired" in result.stderr and "BOS" in result.stderr
    assert _files(old_trained) == before, "SRC must never be written"

    from transformers import AutoTokenizer

    fixed = AutoTokenizer.from_pretrained(out)
    ids = fixed(TEXT).input_ids
    assert ids == tiny_tokenizer(TEXT)["input_ids"] and ids[0] == fixed.bos_token_id and ids.count(ids[0]) == 1
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
    record = checkpoint.read_manifest(out)["conversions"][-1]
    assert record["tokenizer_repaired"] is True
    checkpoint.open_checkpoint(out)  # the manifest hashes the repaired files: the copy validates
    assert bos_warning(old_trained, load_tokenizer(old_trained)) is not None
    assert bos_warning(out, fixed) is None


def test_convert_leaves_third_party_and_current_tokenizers_untouched(
    tiny_tokenizer: Any, make_model: Any, llama_src: Path, tmp_path: Path
) -> None:
    old = _old_tokenizer(tiny_tokenizer, tmp_path / "old-tok", OLD_POST_PROCESSORS["transformers-5"])
    # Not crosschip-trained: nothing says which BOS its training used, so its tokenizer is copied as is.
    third_party = _checkpoint(tmp_path / "third-party", make_model("tiny"), old, THIRD_PARTY)
    for src in (third_party, llama_src):  # llama_src: crosschip's current tokenizer (adds BOS already)
        out = tmp_path / f"{src.name}-bf16"
        record = convert(src, out, ConvertOptions("bf16"))
        assert record["tokenizer_repaired"] is False
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert bos_warning(third_party, old) is None


def test_serve_warns_at_start_on_an_old_crosschip_checkpoint(
    tiny_tokenizer: Any, make_model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old_trained = _old_trained(tiny_tokenizer, make_model("tiny"), tmp_path, "transformers-5")
    capsys.readouterr()
    limits = {"max_batch": 1, "max_queue": 1, "max_context": 64, "decode_kernel": "torch"}
    _, tokenizer = _load(old_trained, "cpu", None, limits, False)  # a small KV cache, no kernel: loads in a moment
    assert not adds_bos(tokenizer)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ")
    assert "does not add BOS" in lines[0] and f"crosschip convert {old_trained} " in lines[0]
    assert "--to fp32" in lines[0]


def test_a_post_processor_that_adds_other_tokens_is_left_alone(tiny_tokenizer: Any, tmp_path: Path) -> None:
    """Two token-adding templates cannot be chained (`tokenizers` panics on pairs): no repair, nothing written."""
    eos = {"SpecialToken": {"id": tiny_tokenizer.eos_token, "type_id": 0}}
    adds_eos = {"type": "TemplateProcessing", "single": [_A, eos], "pair": [_A, _B, eos],
                "special_tokens": {tiny_tokenizer.eos_token: {"id": tiny_tokenizer.eos_token,
                                                              "ids": [tiny_tokenizer.eos_token_id],
                                                              "tokens": [tiny_tokenizer.eos_token]}}}
    directory = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(directory)
    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    data["post_processor"] = adds_eos
    (directory / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    before = _files(directory)
    assert load_tokenizer(directory)(TEXT)["input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert add_bos_to_saved(directory) is False and _files(directory) == before
