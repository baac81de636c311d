"""Corpora for the data tests: clean synthetic prose plus planted noise (crosschip.data.noise), written as jsonl."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

from crosschip.data.noise import NoiseSpec, Planted, plant_noise, write_parts

_STOP = ("the", "of", "to", "and", "a", "in", "is", "that", "with", "for", "as", "on", "by", "from")
# Words that C4's line rules act on (they would edit a clean document, not just keep or drop it).
_AVOID = {"javascript", "cookie", "cookies", "lorem", "ipsum", "policy", "terms"}


def vocabulary(size: int = 1500) -> list[str]:
    """Frequent plain words of this interpreter's stdlib docstrings (deterministic for an installation)."""
    import tempfile

    from crosschip.data.corpus import stdlib_docstring_corpus

    with tempfile.TemporaryDirectory() as d:
        path = stdlib_docstring_corpus(Path(d) / "docs.jsonl", max_bytes=2_000_000)
        text = path.read_text(encoding="utf-8").lower()
    counts = Counter(w for w in re.findall(r"\b[a-z]{3,9}\b", text) if w not in _AVOID and w not in _STOP)
    return [w for w, _ in counts.most_common(size)]


def prose(rng: random.Random, vocab: list[str], words: int) -> str:
    """English-shaped text: sentences of 8-16 words, a stop word every few words, wrapped at ~70 columns."""
    sentences, n = [], 0
    while n < words:
        k = rng.randint(8, 16)
        ws = [rng.choice(_STOP) if i % 3 == 1 else rng.choice(vocab) for i in range(k)]
        sentences.append(" ".join(ws).capitalize() + ".")
        n += k
    lines, line = [], ""
    for word in " ".join(sentences).split(" "):
        if line and len(line) + 1 + len(word) > 70:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


def clean_documents(n: int, seed: int = 0, long_every: int = 3) -> list[str]:
    """n distinct clean documents; every `long_every`-th is long enough (150+ words) to near-duplicate."""
    rng, vocab = random.Random(seed), vocabulary()
    return [prose(rng, vocab, rng.randint(160, 220) if i % long_every == 0 else rng.randint(40, 120))
            for i in range(n)]


def write_planted(root: Path, clean: int = 2000, seed: int = 0, files: int = 2,
                  spec: NoiseSpec | None = None) -> list[Planted]:
    """A planted corpus under root as `files` jsonl files (documents in order, split in contiguous runs)."""
    docs = plant_noise(clean_documents(clean, seed), seed=seed, spec=spec)
    write_parts(docs, root, files)
    return docs


def read_texts(folder: Path) -> list[str]:
    """Every document text in a folder of jsonl.gz shards (sorted by name)."""
    from crosschip.data.curate.run import read_shards

    return read_shards(folder)
