"""Raw text corpora: find data files, stream documents out of them, fingerprint them.

Accepted inputs are a single file or a directory (searched recursively) of:
  * ``.txt``     one document per file (UTF-8) in a directory; a single ``.txt`` file given as the data
                 (``crosschip train --data input.txt``, as nanoGPT users do) is split into documents on blank
                 lines, and one unbroken text is split by position instead (`sources.TxtReader`),
  * ``.jsonl``   one JSON object per line with a string field ``"text"`` (``.jsonl.gz``: the same, gzipped),
  * ``.parquet`` a string column ``"text"``, read one row group at a time.
The text field/column is ``text`` unless a caller names another (``--text-key``).
Empty documents are skipped everywhere: they carry no tokens, only BOS/EOS noise.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import re
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from crosschip.errors import CrosschipError
from crosschip.fsio import atomic_write_bytes, sha256_file

ACCEPTED_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
PARQUET_MAGIC = b"PAR1"
GZIP_MAGIC = b"\x1f\x8b"

# Stdlib directories that hold tests, GUI demos, vendored packages or generated data rather
# than documented library code; parsing them would only add noise (and time).
_STDLIB_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "turtledemo",
        "__pycache__",
        "ensurepip",
        "pydoc_data",
        "lib-dynload",
        "encodings",  # ~100 near-identical generated codec docstrings
    }
)
_MIN_DOCSTRING_CHARS = 40
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")  # a line holding only whitespace separates documents


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else path.suffix.lower()


def _check_readable(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise CrosschipError(
            f"cannot read data file {path}: {e.strerror or e}", "fix the file permissions or remove the file"
        ) from e


def _is_hidden(rel: Path) -> bool:
    # Hidden files/dirs (.git, .cache, editor swap files) are never corpus content.
    return any(part.startswith(".") for part in rel.parts)


def list_data_files(path: Path) -> list[Path]:
    """Return the data files at `path` (a file, or a directory searched recursively, sorted)."""
    path = Path(path)
    accepted = ", ".join(ACCEPTED_SUFFIXES)
    if not path.exists():
        raise CrosschipError(f"data path {path} does not exist", f"pass a file or directory of {accepted} files")
    if path.is_file():
        if _suffix(path) not in ACCEPTED_SUFFIXES:
            raise CrosschipError(
                f"data file {path} has unsupported type {path.suffix or '(none)'!r}",
                f"convert it to one of {accepted}",
            )
        _check_readable(path)
        return [path]
    if not path.is_dir():
        raise CrosschipError(f"data path {path} is not a regular file or directory", "pass a file or directory")
    all_files = sorted(
        (p for p in path.rglob("*") if p.is_file() and not _is_hidden(p.relative_to(path))),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not all_files:
        raise CrosschipError(f"data directory {path} is empty", f"put {accepted} files in it")
    files = [p for p in all_files if _suffix(p) in ACCEPTED_SUFFIXES]
    if not files:
        seen = sorted({p.suffix or "(none)" for p in all_files})[:8]
        raise CrosschipError(
            f"data directory {path} has no {accepted} files (found types: {', '.join(seen)})",
            f"add {accepted} files or point at the right directory",
        )
    for f in files:
        _check_readable(f)
    return files


def _iter_txt(path: Path) -> Iterator[str]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CrosschipError(
            f"{path} is not valid UTF-8 (bad byte at offset {e.start})", "re-encode the file as UTF-8"
        ) from e
    if text.strip():
        yield text


def _jsonl_text(raw: bytes, where: str, text_key: str = "text") -> str:
    """Decode one JSONL line and return its text field."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CrosschipError(f"{where}: not valid UTF-8", "re-encode the file as UTF-8") from e
    except json.JSONDecodeError as e:
        raise CrosschipError(
            f"{where}: invalid JSON ({e.msg})", 'write one JSON object per line: {"text": "..."}'
        ) from e
    if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
        keys = ", ".join(list(obj)[:8]) if isinstance(obj, dict) else type(obj).__name__
        raise CrosschipError(
            f'{where}: expected a JSON object with a string field "{text_key}" (found: {keys})',
            "pass --text-key with the field that holds the documents",
        )
    return obj[text_key]


def _open_jsonl(path: Path) -> BinaryIO:
    if _suffix(path) != ".jsonl.gz":
        return open(path, "rb")  # noqa: SIM115 - the caller's with-block closes it
    with open(path, "rb") as f:
        if f.read(2) != GZIP_MAGIC:
            raise CrosschipError(f"{path} is not gzip-compressed", "gzip it or rename it to .jsonl")
    return gzip.open(path, "rb")  # type: ignore[return-value]


def _iter_jsonl(path: Path, text_key: str = "text") -> Iterator[str]:
    with _open_jsonl(path) as f:
        try:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                text = _jsonl_text(raw, f"{path}:{lineno}", text_key)
                if text:
                    yield text
        except (OSError, EOFError) as e:  # a truncated or corrupt gzip stream
            raise CrosschipError(f"{path}: cannot decompress ({e})", "re-compress the file") from e


def _check_parquet_magic(path: Path) -> None:
    # A parquet file starts and ends with b"PAR1"; checking both catches mislabeled and truncated files
    # with a clear message instead of a pyarrow stack trace.
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if size < 12 or head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        raise CrosschipError(
            f"{path} is not a parquet file (missing PAR1 magic bytes; truncated or mislabeled)",
            "rename it to its real type or re-export it as parquet",
        )


def _iter_parquet(path: Path, text_key: str = "text") -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_parquet_magic(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CrosschipError(f"{path}: cannot open parquet file ({e})", "re-export the file as parquet") from e
    schema = pf.schema_arrow
    if text_key not in schema.names:
        raise CrosschipError(
            f'{path} has no "{text_key}" column (columns: {", ".join(schema.names[:10])})',
            "pass --text-key with the column that holds the documents",
        )
    field_type = schema.field(text_key).type
    if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
        raise CrosschipError(f'{path}: column "{text_key}" has type {field_type}, not string', "store text as strings")
    for i in range(pf.num_row_groups):
        try:
            column = pf.read_row_group(i, columns=[text_key]).column(text_key)
        except (pa.ArrowException, OSError) as e:
            raise CrosschipError(f"{path}: cannot read row group {i} ({e})", "re-export the file") from e
        for text in column.to_pylist():
            if text:
                yield text


def is_single_text(path: Path) -> bool:
    """True when the data is one .txt file: its blank lines separate documents (see `split_paragraphs`)."""
    return Path(path).is_file() and _suffix(Path(path)) == ".txt"


def split_paragraphs(text: str) -> list[str]:
    """The documents of a single text file: blocks separated by one or more blank lines, each non-empty."""
    return [block.strip("\n") for block in _BLANK_LINES.split(text) if block.strip()]


def split_by_position(text: str, val_fraction: float) -> tuple[str, str]:
    """nanoGPT's split of one unbroken text: the first (1 - val_fraction) for training, the rest for validation.

    The cut moves back to the last line break before it when there is one (a line is not torn in two), and
    to a space otherwise; both parts are non-empty for any text of two or more characters.
    """
    cut = min(max(int(len(text) * (1.0 - val_fraction)), 1), len(text) - 1)
    for sep in ("\n", " "):
        at = text.rfind(sep, 1, cut)
        if at > 0 and text[:at].strip() and text[at + 1:].strip():
            return text[:at + 1], text[at + 1:]
    return text[:cut], text[cut:]


def iter_file_documents(files: list[Path], paragraphs: bool = False, text_key: str = "text") -> Iterator[str]:
    """Yield every non-empty document of the given data files, in order.

    `paragraphs`: the files are .txt files whose blank-line separated blocks are the documents."""
    for f in files:
        kind = _suffix(f)
        if kind == ".txt":
            docs = _iter_txt(f)
        elif kind == ".parquet":
            docs = _iter_parquet(f, text_key)
        else:
            docs = _iter_jsonl(f, text_key)
        for doc in docs:
            yield from split_paragraphs(doc) if paragraphs else (doc,)


def iter_documents(path: Path, text_key: str = "text") -> Iterator[str]:
    """Yield every non-empty document under `path`, in a deterministic order."""
    yield from iter_file_documents(list_data_files(path), paragraphs=is_single_text(path), text_key=text_key)


def data_fingerprint(files: list[Path]) -> str:
    """sha256 over (name relative to the files' common directory, size, content sha256) of each file.

    Relative names keep the fingerprint stable when a corpus directory is moved or copied.
    """
    files = [Path(f) for f in files]
    if not files:
        raise CrosschipError("no data files to fingerprint", "pass at least one data file")
    root = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    h = hashlib.sha256()
    for f in files:
        rel = f.resolve().relative_to(root).as_posix()
        h.update(f"{rel}\0{f.stat().st_size}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _stdlib_py_files(root: Path) -> Iterator[Path]:
    """Library .py files under the stdlib root, in sorted (deterministic) order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                yield Path(dirpath) / name


def _module_docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one file in source order, parsed (never imported)."""
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid-escape SyntaxWarnings in old modules are irrelevant
            tree = ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return []  # unparsable or unreadable files are simply not part of the demo corpus
    docs: list[tuple[int, int, str]] = []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc.strip()) >= _MIN_DOCSTRING_CHARS:
                docs.append((getattr(node, "lineno", 0), getattr(node, "col_offset", 0), doc.strip()))
    return [d for _, _, d in sorted(docs, key=lambda t: (t[0], t[1]))]


def stdlib_docstring_corpus(out_path: Path, max_bytes: int = 8_000_000) -> Path:
    """Write a JSONL demo corpus of the running interpreter's stdlib docstrings to `out_path`.

    Deterministic for a given Python installation; duplicate docstrings are kept once; stops before
    the file would exceed `max_bytes`.
    """
    if max_bytes <= 0:
        raise CrosschipError(f"max_bytes must be positive, got {max_bytes}", "pass a positive size")
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise CrosschipError(f"standard library not found at {root}", "pass --data with your own corpus")
    seen: set[str] = set()
    lines: list[bytes] = []
    total = 0
    for path in _stdlib_py_files(root):
        for doc in _module_docstrings(path):
            if doc in seen:
                continue
            line = (json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode("utf-8")
            if total + len(line) > max_bytes:
                return _write_corpus(out_path, lines, root)
            seen.add(doc)
            lines.append(line)
            total += len(line)
    return _write_corpus(out_path, lines, root)


def _write_corpus(out_path: Path, lines: list[bytes], root: Path) -> Path:
    if not lines:
        raise CrosschipError(f"no docstrings found under {root}", "pass --data with your own corpus")
    out_path = Path(out_path)
    atomic_write_bytes(out_path, b"".join(lines))
    return out_path


def unigram_entropy(token_ids: Any, vocab_size: int) -> float:
    """Entropy (nats/token) of the empirical unigram distribution: the loss of a context-free model.

    `token_ids`: any array, or a 1-D stream (a memmap, a `dataset.TokenStream`), read a chunk at a time."""
    ids = token_ids if getattr(token_ids, "ndim", None) == 1 else np.asarray(token_ids).reshape(-1)
    if len(ids) == 0:
        raise CrosschipError("cannot compute unigram entropy of an empty token stream", "use more data")
    counts = np.zeros(vocab_size, dtype=np.int64)
    chunk = 1 << 24  # bincount casts to intp: chunking bounds the temporary copy of large memmaps
    for start in range(0, len(ids), chunk):
        part = np.asarray(ids[start : start + chunk])
        if part.min() < 0 or part.max() >= vocab_size:
            raise CrosschipError(
                f"token id out of range [0, {vocab_size}) in stream", "pass the tokenizer's full vocab size"
            )
        counts += np.bincount(part, minlength=vocab_size)
    p = counts[counts > 0] / len(ids)
    return float(-(p * np.log(p)).sum())
