"""Planted noise: the junk a web-scale corpus carries, added on purpose to a clean one (demo, tests, benchmark).

Each planted document records its kind and which curation step is meant to remove it, so a run can be scored:
  exact        a verbatim copy of a clean document                      -> exact dedup
  near         a long clean document with a few words changed           -> MinHash
  boilerplate  a page of navigation links and cookie/legal lines        -> FineWeb quality (short lines)
  repeated     one line over and over                                   -> Gopher repetition
  soup         symbols and digits, no words                             -> Gopher quality
  pii          a clean document with a made-up email and public IP      -> kept, redacted by PII
Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

EXPECTED_STEP = {"exact": "exact", "near": "minhash", "boilerplate": "fineweb_quality",
                 "repeated": "gopher_repetition", "soup": "gopher_quality"}
NEAR_MIN_WORDS = 150  # MinHash (5-grams, 14x8) catches 2-3 changed words reliably only in long documents
_NAV = ("Home", "About us", "Products", "Pricing", "Contact", "Log in", "Sign up", "Careers", "Blog", "Support",
        "Cookie settings", "Terms of use", "Privacy", "Newsletter", "Follow us", "Site map", "Press", "Partners",
        "Downloads", "Community", "Events", "Status")
_SOUP = "#$%&*+=<>^~|@!?/\\{}[]0123456789"
_REPLACEMENTS = ("widget", "gadget", "lantern", "harbor", "meadow", "copper", "violet", "summit", "orbit", "pepper")
_PUBLIC_IPS = ("81.2.69.142", "94.140.14.14", "151.101.1.69", "185.199.108.153", "104.16.132.229")


@dataclass(frozen=True)
class NoiseSpec:
    """How many documents of each kind to plant (near-duplicates need clean documents of 150+ words)."""

    exact: int = 100
    near: int = 100
    boilerplate: int = 40
    repeated: int = 40
    soup: int = 40
    pii: int = 60


@dataclass(frozen=True)
class Planted:
    text: str
    kind: str  # "clean" or one of the noise kinds
    source: int | None = None  # index of the clean document it was made from


def _near(text: str, rng: random.Random, changes: int) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), min(changes, len(words))):
        words[i] = rng.choice(_REPLACEMENTS)
    return " ".join(words)


def _boilerplate(rng: random.Random) -> str:
    return "\n".join(rng.sample(_NAV, 14)) + "\n© 2026 Example Corp. All rights reserved."


def _repeated(rng: random.Random) -> str:
    line = f"Click here to win a free {rng.choice(_REPLACEMENTS)} today"
    return "\n".join([line] * rng.randint(8, 16))


def _soup(rng: random.Random) -> str:
    return " ".join("".join(rng.choice(_SOUP) for _ in range(rng.randint(2, 8))) for _ in range(rng.randint(40, 90)))


def _pii(text: str, rng: random.Random, i: int) -> str:
    user = f"{rng.choice(('jane', 'ravi', 'li', 'omar', 'ana'))}.{rng.choice(('doe', 'kim', 'silva'))}{i}"
    return f"{text}\nQuestions go to {user}@mail-example.net, server {rng.choice(_PUBLIC_IPS)}."


def _order(docs: list[Planted], n_clean: int, rng: random.Random) -> list[Planted]:
    """Clean documents keep their order; junk lands anywhere, a copy always after its original.

    Dedup keeps the first of a cluster, so the originals are what survives (as in a crawl, where the copy
    is the later page)."""
    def key(d: Planted) -> float:
        if d.kind in ("clean", "pii"):
            return float(d.source or 0)
        if d.source is not None:
            return rng.uniform(d.source + 0.5, n_clean)
        return rng.uniform(-0.5, n_clean)

    return [d for _, d in sorted(((key(d), j), d) for j, d in enumerate(docs))]


def plant_noise(clean: list[str], seed: int = 0, spec: NoiseSpec | None = None) -> list[Planted]:
    """The clean documents (PII added to some) plus the planted junk, mixed in with `seed`."""
    spec = spec or NoiseSpec()
    rng = random.Random(seed)
    docs = [Planted(t, "clean", i) for i, t in enumerate(clean)]
    for n, i in enumerate(rng.sample(range(len(clean)), min(spec.pii, len(clean)))):
        docs[i] = Planted(_pii(clean[i], rng, n), "pii", i)
    plain = [i for i in range(len(clean)) if docs[i].kind == "clean"]
    docs += [Planted(clean[i], "exact", i) for i in rng.sample(plain, min(spec.exact, len(plain)))]
    long_docs = [i for i in plain if len(clean[i].split()) >= NEAR_MIN_WORDS]
    docs += [Planted(_near(clean[i], rng, rng.randint(2, 3)), "near", i)
             for i in rng.sample(long_docs, min(spec.near, len(long_docs)))]
    docs += [Planted(_boilerplate(rng), "boilerplate") for _ in range(spec.boilerplate)]
    docs += [Planted(_repeated(rng), "repeated") for _ in range(spec.repeated)]
    docs += [Planted(_soup(rng), "soup") for _ in range(spec.soup)]
    return _order(docs, len(clean), rng)


def write_parts(docs: list[Planted], folder: Path, files: int) -> None:
    """folder/part-N.jsonl (field "text"): the documents in order, cut into `files` contiguous runs."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // files)
    for i in range(files):
        rows = docs[i * per:(i + 1) * per]
        (folder / f"part-{i}.jsonl").write_text("".join(json.dumps({"text": d.text}) + "\n" for d in rows),
                                                encoding="utf-8")
