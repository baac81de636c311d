"""`data curate` stays offline and refuses bad input with one line, changing nothing.

The offline test runs the whole pipeline, language ID included (a fastText model trained here), in a fresh
interpreter whose sockets refuse every non-loopback connection and name lookup and log each attempt
(a guard installed through sitecustomize, not a mock of the pipeline); the log must stay empty.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from crosschip.data.noise import NoiseSpec
from datakit import read_texts, write_planted
from test_cli import Case, run_cli

GUARD = '''
import os, socket

_LOG = os.environ["CROSSCHIP_NET_LOG"]
_LOCAL = {"localhost", "127.0.0.1", "::1", "0.0.0.0", ""}

def _refuse(what):
    with open(_LOG, "a") as f:
        f.write(what + "\\\\n")
    raise OSError("network disabled by the offline test: " + what)

def _is_local(host):
    return str(host) in _LOCAL or str(host).startswith("127.")

_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
        _refuse(f"connect {address!r}")
    return _connect(self, address)

def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
        _refuse(f"connect_ex {address!r}")
    return _connect_ex(self, address)

def getaddrinfo(host, *args, **kwargs):
    if host is not None and not _is_local(host if isinstance(host, str) else host.decode()):
        _refuse(f"getaddrinfo {host!r}")
    return _getaddrinfo(host, *args, **kwargs)

socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''


def guarded_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    site = tmp_path / "guard"
    site.mkdir()
    (site / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "net.log"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), env.get("PYTHONPATH", "")]), CROSSCHIP_NET_LOG=str(log))
    return env, log


def train_lid_model(path: Path, english: list[str], other: list[str]) -> Path:
    """A tiny supervised fastText language-ID model (labels __label__en / __label__xx), trained offline here."""
    pytest.importorskip("fasttext")
    data = path.with_suffix(".txt")
    rows = [f"__label__en {t}" for t in english] + [f"__label__xx {t}" for t in other]
    random.Random(0).shuffle(rows)
    data.write_text("\n".join(r.replace("\n", " ") for r in rows) + "\n")
    # In a fresh interpreter: inside pytest's process fastText reported NaN on the same data. One thread:
    # deterministic; a small bucket table: a ~2 MB model.
    code = ("import fasttext, sys; fasttext.train_supervised(sys.argv[1], dim=64, epoch=10, bucket=1000, minn=0, "
            "maxn=0, thread=1, verbose=0).save_model(sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(data), str(path)], check=True, timeout=120)
    return path


def not_english(rng: random.Random, n: int) -> list[str]:
    syllables = ("ka", "lu", "mi", "zo", "te", "ra", "po", "shi", "vek", "dun", "oja", "ite")
    return [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(60)) + "."
            for _ in range(n)]


def test_guard_refuses_and_records_outbound(tmp_path: Path) -> None:
    env, log = guarded_env(tmp_path)
    code = ("import socket\ntry:\n    socket.create_connection(('93.184.216.34', 80), timeout=2)\n"
            "except OSError:\n    pass")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "93.184.216.34" in log.read_text()  # the guard is live: the real run below must log nothing


def test_whole_pipeline_with_language_id_makes_no_network_attempt(tmp_path: Path) -> None:
    docs = write_planted(tmp_path / "in", clean=300, seed=2,
                         spec=NoiseSpec(exact=10, near=10, boilerplate=5, repeated=5, soup=5, pii=5))
    foreign = not_english(random.Random(3), 20)
    (tmp_path / "in" / "foreign.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in foreign))
    english = [d.text for d in docs if d.kind == "clean"][:200]
    model = train_lid_model(tmp_path / "lid.bin", english, not_english(random.Random(4), 200))
    env, log = guarded_env(tmp_path)
    argv = [sys.executable, "-m", "crosschip", "data", "curate", str(tmp_path / "in"), str(tmp_path / "out"),
            "--preset", "docs", "--lid-model", str(model), "--language", "en", "--json"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not log.exists() or log.read_text() == "", f"network attempts: {log.read_text()}"
    summary = json.loads(proc.stdout)
    assert summary["summary"]["documents_in"] == len(docs) + len(foreign)
    removed = set(read_texts(tmp_path / "out" / "removed" / "language"))
    assert set(foreign) <= removed  # (symbol soup is not English either: language ID runs first)
    assert not removed & {d.text for d in docs if d.kind == "clean"}


# ------------------------------------------------------------------ bad input


def _curate(inp: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "curate", str(inp), str(out), *extra]


def build_cases(root: Path) -> dict[str, Case]:
    def scratch(name: str) -> Path:
        (root / name).mkdir()
        (root / name / "in").mkdir()
        return root / name

    good = '{"text": "A fine document about the parser and the tokenizer of the module."}\n'
    cases: dict[str, Case] = {}
    d = scratch("empty-dir")
    cases[d.name] = Case(_curate(d / "in", d / "out"), "is empty")
    d = scratch("missing-text-key")
    (d / "in" / "a.jsonl").write_text('{"content": "a document under another key"}\n')
    cases[d.name] = Case(_curate(d / "in", d / "out"), "--text-key")
    d = scratch("not-utf8")
    (d / "in" / "a.txt").write_bytes(b"caf\xe9 au lait, latin-1 bytes\n")
    cases[d.name] = Case(_curate(d / "in", d / "out"), "not valid UTF-8")
    d = scratch("not-gzip")
    (d / "in" / "a.jsonl.gz").write_text(good)
    cases[d.name] = Case(_curate(d / "in", d / "out"), "not gzip-compressed")
    d = scratch("in-equals-out")
    (d / "in" / "a.jsonl").write_text(good)
    cases[d.name] = Case(_curate(d / "in", d / "in"), "lies inside it")
    d = scratch("out-inside-in")
    (d / "in" / "a.jsonl").write_text(good)
    cases[d.name] = Case(_curate(d / "in", d / "in" / "curated"), "lies inside it")
    d = scratch("existing-out")
    (d / "in" / "a.jsonl").write_text(good)
    (d / "out").mkdir()
    (d / "out" / "notes.txt").write_text("mine\n")
    cases[d.name] = Case(_curate(d / "in", d / "out"), "already exists")
    d = scratch("language-without-model")
    (d / "in" / "a.jsonl").write_text(good)
    cases[d.name] = Case(_curate(d / "in", d / "out", "--language", "de"), "--lid-model PATH")
    d = scratch("missing-lid-model")
    (d / "in" / "a.jsonl").write_text(good)
    cases[d.name] = Case(_curate(d / "in", d / "out", "--lid-model", str(d / "lid.bin")), "is not a file")
    d = scratch("unknown-preset")
    (d / "in" / "a.jsonl").write_text(good)
    cases[d.name] = Case(_curate(d / "in", d / "out", "--preset", "arxiv"), "unknown curation preset")
    d = scratch("unknown-executor")
    (d / "in" / "a.jsonl").write_text(good)
    cases[d.name] = Case(_curate(d / "in", d / "out", "--executor", "spark"), "unknown executor")
    if os.geteuid() != 0:  # root reads any file
        d = scratch("unreadable")
        (d / "in" / "a.jsonl").write_text(good)
        (d / "in" / "a.jsonl").chmod(0)
        cases[d.name] = Case(_curate(d / "in", d / "out"), "cannot read")
    return cases


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Case, object]]:
    root = tmp_path_factory.mktemp("bad-curate")
    cases = build_cases(root)
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = dict(zip(cases, pool.map(lambda n: run_cli(cases[n].args, root / n), cases), strict=True))
    return {n: (cases[n], runs[n]) for n in cases}


@pytest.mark.parametrize("name", ["empty-dir", "missing-text-key", "not-utf8", "not-gzip", "in-equals-out",
                                  "out-inside-in", "existing-out", "language-without-model", "missing-lid-model",
                                  "unknown-preset", "unknown-executor", "unreadable"])
def test_bad_input_is_one_line_and_changes_nothing(bad_runs: dict, name: str) -> None:
    if name not in bad_runs:
        pytest.skip("running as root: every file is readable")
    case, run = bad_runs[name]
    lines = run.stderr.strip().splitlines()
    detail = f"stderr: {run.stderr!r}"
    assert run.returncode == 2, detail
    assert len(lines) == 1 and lines[0].startswith("error: ") and "(fix: " in lines[0], detail
    assert case.expect in lines[0], detail
    assert run.changed == [], f"changed: {run.changed}"
