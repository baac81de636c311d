"""What `data curate` runs: which datatrove steps, with which thresholds (named presets, never guessed from data)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crosschip.errors import CrosschipError
from crosschip.fsio import sha256_file

FILTERS = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")
OUTPUT_FORMATS = ("jsonl.gz", "parquet")


@dataclass(frozen=True)
class FilterPreset:
    """Keyword arguments for each datatrove filter; an empty dict keeps datatrove's defaults."""

    name: str
    about: str
    gopher_repetition: dict[str, Any] = field(default_factory=dict)
    gopher_quality: dict[str, Any] = field(default_factory=dict)
    c4_quality: dict[str, Any] = field(default_factory=dict)
    fineweb_quality: dict[str, Any] = field(default_factory=dict)
    c4_edits_lines: bool = True  # False: C4 only keeps or drops (steps.DecisionOnlyC4), the text stays as it was


PRESETS: dict[str, FilterPreset] = {
    # FineWeb's recipe (datatrove's examples/fineweb.py): the published defaults, C4 without its line edits.
    "web": FilterPreset(
        "web", "web pages (FineWeb's thresholds)", c4_quality={"filter_no_terminal_punct": False},
    ),
    # Short technical documents (docstrings, READMEs, API docs): the web thresholds assume pages of 50+ words and
    # no code, so they would drop most short but good documents (measured on the demo's stdlib docstrings: the web
    # preset keeps 501 of 6,139 after dedup, this one 5,657). Repetition, symbol soup, boilerplate and dedup apply.
    "docs": FilterPreset(
        "docs", "short technical documents (docstrings, READMEs)",
        # top n-gram share is meaningless under ~50 words (any 2-gram of a 6-word doc is a third of it)
        gopher_repetition={"top_n_grams": ()},
        gopher_quality={"min_doc_words": 5, "max_non_alpha_words_ratio": 0.5, "min_stop_words": 0},
        # C4 only keeps or drops here and never edits (code lines are short, mention javascript or policy and are
        # indented; code has braces; one-line docs have one sentence): it drops lorem ipsum and huge words
        c4_quality={"filter_no_terminal_punct": False, "min_num_sentences": -1, "min_words_per_line": -1,
                    "filter_curly_bracket": False, "filter_javascript": False, "filter_policy": False},
        c4_edits_lines=False,
        fineweb_quality={"line_punct_thr": 0.0, "short_line_thr": 0.9, "char_duplicates_ratio": 0.1,
                         "new_line_ratio": 1.0},
    ),
}


def get_preset(name: str) -> FilterPreset:
    if name not in PRESETS:
        raise CrosschipError(f"unknown curation preset {name!r}", f"pass --preset one of {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class CurateConfig:
    """The curation a run applies. Two runs with equal `fingerprint()` write identical output."""

    preset: str = "web"
    filters: tuple[str, ...] = FILTERS
    pii: bool = True  # redact emails and public IPs (datatrove's PIIFormatter)
    exact_dedup: bool = True
    minhash: bool = True  # near-duplicates: datatrove's 4 MinHash stages
    lid_model: str | None = None  # a local fastText language-ID model (.bin): none is downloaded
    languages: tuple[str, ...] = ("en",)
    lid_threshold: float = 0.65
    text_key: str = "text"
    output_format: str = "jsonl.gz"
    examples_per_reason: int = 3

    def __post_init__(self) -> None:
        get_preset(self.preset)
        unknown = sorted(set(self.filters) - set(FILTERS))
        if unknown:
            raise CrosschipError(f"unknown filter(s) {', '.join(unknown)}", f"choose from {', '.join(FILTERS)}")
        if self.output_format not in OUTPUT_FORMATS:
            raise CrosschipError(f"unknown output format {self.output_format!r}",
                                 f"pass --format one of {', '.join(OUTPUT_FORMATS)}")
        if self.lid_model is not None and not Path(self.lid_model).is_file():
            raise CrosschipError(f"--lid-model {self.lid_model} is not a file",
                                 "pass the path of a local fastText language-ID model (e.g. lid.176.bin)")
        if not 0.0 <= self.lid_threshold <= 1.0:
            raise CrosschipError(f"--lid-threshold must be in [0, 1], got {self.lid_threshold}", "pass e.g. 0.65")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["filters"], d["languages"] = list(self.filters), list(self.languages)
        return d

    def fingerprint(self, tasks: int) -> str:
        """Hash of everything that shapes the output: settings, the preset's thresholds, the LID model's bytes."""
        payload = {"config": self.as_dict(), "thresholds": asdict(get_preset(self.preset)), "tasks": tasks}
        if self.lid_model is not None:
            payload["lid_model"] = sha256_file(Path(self.lid_model))
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()
