"""The real `crosschip` command, run as a subprocess: bad input is one `error: ... (fix: ...)` line.

Every case runs the actual console entry point in a fresh interpreter. The runs are independent,
so they are started together (a thread pool of subprocesses) to keep the file fast; each test then
checks one case's result. Each case lives in its own scratch directory (inputs, --out, shard cache),
and a byte-level snapshot of that directory before and after proves nothing was created or changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from crosschip.devices import train_precisions

CPU_TRAINS_FP16 = "fp16" in train_precisions(torch.device("cpu"))
TARGETS = {"ascend-310p", "ascend-910b", "ascend-910c", "cpu", "nvidia-h100", "nvidia-h20", "nvidia-h200"}
RUN_TIMEOUT_S = 180


@dataclass(frozen=True)
class Case:
    """One bad invocation: its argv (after `crosschip`) and a fragment the error must contain."""

    args: list[str]
    expect: str


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    changed: list[str]  # paths created, removed or modified in the case's scratch directory


def crosschip_argv() -> list[str]:
    """The installed console script when it sits beside this interpreter (a venv), else `-m`."""
    script = Path(sys.executable).parent / "crosschip"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "crosschip.cli"]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path below root, with file contents (None for directories)."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


def run_cli(args: list[str], scratch: Path | None = None) -> Run:
    env = {**os.environ, "COLUMNS": "40"}  # narrow: any console line wrapping would show up
    if scratch is not None:
        env["CROSSCHIP_CACHE"] = str(scratch / "cache")
    before = snapshot(scratch) if scratch is not None else {}
    proc = subprocess.run(
        [*crosschip_argv(), *args], capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL, check=False,
    )
    after = snapshot(scratch) if scratch is not None else {}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, 0) != after.get(k, 0))
    return Run(proc.returncode, proc.stdout, proc.stderr, changed)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--model", "tiny", "--out", str(out), *extra]


def build_cases(root: Path, corpus: Path, make_checkpoint: Any) -> dict[str, Case]:
    """Inputs for every bad-input case, each in root/<case>/ (which must stay unchanged)."""

    def scratch(name: str) -> Path:
        (root / name).mkdir()
        return root / name

    cases: dict[str, Case] = {}
    d = scratch("missing-data")
    cases[d.name] = Case(train_args(d / "no-such-corpus", d / "out"), "does not exist")
    d = scratch("empty-data-dir")
    (d / "data").mkdir()
    cases[d.name] = Case(train_args(d / "data", d / "out"), "is empty")
    d = scratch("bad-jsonl-line")
    (d / "data").mkdir()
    (d / "data" / "a.jsonl").write_text('{"text": "a fine first document"}\n{"text": broken\n')
    cases[d.name] = Case(train_args(d / "data", d / "out"), "a.jsonl:2: invalid JSON")
    d = scratch("not-parquet")
    (d / "data").mkdir()
    (d / "data" / "a.parquet").write_text("this is plain text, not parquet\n")
    cases[d.name] = Case(train_args(d / "data", d / "out"), "not a parquet file")
    d = scratch("unknown-device")
    cases[d.name] = Case(train_args(corpus, d / "out", "--device", "tpu"), "unknown device 'tpu'")
    d = scratch("absent-device")
    cases[d.name] = Case(train_args(corpus, d / "out", "--device", "cuda"), "cuda is not available")
    if not CPU_TRAINS_FP16:
        d = scratch("fp16-on-cpu")
        args = train_args(corpus, d / "out", "--device", "cpu", "--precision", "fp16")
        cases[d.name] = Case(args, "cannot train in fp16")
    d = scratch("unknown-preset")
    args = train_args(corpus, d / "out")
    args[args.index("tiny")] = "gpt-17"
    cases[d.name] = Case(args, "unknown model preset 'gpt-17'")
    d = scratch("existing-out")
    (d / "out").mkdir()
    (d / "out" / "notes.txt").write_text("my results, do not touch\n")
    (d / "out" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    cases[d.name] = Case(train_args(corpus, d / "out"), "already exists")

    d = scratch("generate-incomplete")
    ckpt = make_checkpoint("tiny", d / "ckpt", shard_size="200KB")
    sorted(ckpt.glob("model-*.safetensors"))[-1].unlink()
    cases[d.name] = Case(["generate", str(ckpt), "--prompt", "Hello", "--device", "cpu"], "incomplete")
    d = scratch("generate-sha256")
    ckpt = make_checkpoint("tiny", d / "ckpt")
    shard = ckpt / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    cases[d.name] = Case(["generate", str(ckpt), "--prompt", "Hello", "--device", "cpu"], "sha256")

    # A config.json that does not fit the weights (a hand-edited or mixed-up checkpoint): transformers raises or
    # would leave weights random; every command that loads it says so in one line (issue 14).
    for name, command in (("check-config-mismatch", ["check", "{ckpt}", "--target", "ascend-310p"]),
                          ("serve-config-mismatch", ["serve", "{ckpt}", "--device", "cpu", "--port", "0"])):
        d = scratch(name)
        ckpt = make_checkpoint("tiny", d / "ckpt")
        (ckpt / "crosschip.json").unlink()  # a plain HF checkpoint: no manifest sha256 catches the edit first
        config = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] // 2}))
        cases[d.name] = Case([a.replace("{ckpt}", str(ckpt)) for a in command], "does not fit LlamaForCausalLM")

    # A value that looks like console markup must print verbatim, not crash the error printer.
    cases[scratch("unknown-target").name] = Case(["targets", "nope[/x]:smile:"], "unknown target 'nope[/x]:smile:'")
    return cases


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path, make_checkpoint: Any) -> dict[str, Any]:
    """All CLI runs of this file, executed concurrently; bad cases keyed by name, plus the JSON listings."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    shutil.copytree(tiny_corpus, corpus)  # a valid corpus for the cases whose data is not the problem
    cases = build_cases(root, corpus, make_checkpoint)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(run_cli, c.args, root / name) for name, c in cases.items()}
        futures["devices --json"] = pool.submit(run_cli, ["devices", "--json"])
        futures["targets --json"] = pool.submit(run_cli, ["targets", "--json"])
        futures["targets cpu --json"] = pool.submit(run_cli, ["targets", "cpu", "--json"])
        futures["check piped"] = pool.submit(run_cli, piped_check_args(root, make_checkpoint))
        results = {name: f.result() for name, f in futures.items()}
    return {"cases": cases, "results": results}


LONG_SCRIPT = "a/rather/long/directory/path/that/keeps/going/and/going/train_on_the_gpu_cluster.py"


def piped_check_args(root: Path, make_checkpoint: Any) -> list[str]:
    """`crosschip check` with a code finding whose path is longer than any terminal (output captured: no TTY)."""
    (root / "piped").mkdir()
    script = root / "piped" / "scripts" / LONG_SCRIPT
    script.parent.mkdir(parents=True)
    script.write_text("import torch\nx = torch.zeros(3).cuda()\n")
    ckpt = make_checkpoint("tiny", root / "piped" / "ckpt")
    return ["check", str(ckpt), "--target", "cpu", "--stack", "transformers", "--no-numerics", "--script",
            str(root / "piped" / "scripts")]


def test_piped_output_keeps_each_row_on_one_line(cli_runs: dict[str, Any]) -> None:
    """Not a terminal (and COLUMNS=40): rows are printed at full width, so a path is whole on its line (grep)."""
    run: Run = cli_runs["results"]["check piped"]
    assert run.returncode == 1, run.stderr  # the finding fails the check
    finding = [line for line in run.stdout.splitlines() if LONG_SCRIPT in line]
    assert len(finding) == 1 and ":2: `.cuda()`" in finding[0] and "FAIL" in finding[0], run.stdout
    verdict = [line for line in run.stdout.splitlines() if line.startswith("verdict: FAIL")]
    assert len(verdict) == 1 and verdict[0].rstrip().endswith(" s)"), run.stdout  # the verdict line is unbroken
    assert "\x1b[" not in run.stdout  # no colour codes in a file


BAD_CASES = [
    "missing-data", "empty-data-dir", "bad-jsonl-line", "not-parquet", "unknown-device", "absent-device",
    pytest.param("fp16-on-cpu", marks=pytest.mark.skipif(CPU_TRAINS_FP16, reason="this CPU trains in fp16")),
    "unknown-preset", "existing-out", "generate-incomplete", "generate-sha256", "unknown-target",
    "check-config-mismatch", "serve-config-mismatch",
]


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_input_is_one_line_error_and_changes_nothing(cli_runs: dict[str, Any], name: str) -> None:
    case: Case = cli_runs["cases"][name]
    run: Run = cli_runs["results"][name]
    detail = f"crosschip {' '.join(case.args)}\nstderr:\n{run.stderr}"
    assert run.returncode != 0, detail
    assert "Traceback" not in run.stderr + run.stdout, detail
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, detail
    assert lines[0].startswith("error: "), detail
    assert case.expect in lines[0], detail
    assert "(fix: " in lines[0], detail
    assert not run.changed, f"created or changed: {run.changed}\n{detail}"


def test_devices_json(cli_runs: dict[str, Any]) -> None:
    run: Run = cli_runs["results"]["devices --json"]
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    cpu = next(d for d in found if d["device"] == "cpu")
    assert "fp32" in cpu["train_precisions"]
    assert ("fp16" in cpu["train_precisions"]) == CPU_TRAINS_FP16


def test_targets_json(cli_runs: dict[str, Any]) -> None:
    listing: Run = cli_runs["results"]["targets --json"]
    assert listing.returncode == 0, listing.stderr
    assert {t["name"] for t in json.loads(listing.stdout)} == TARGETS
    one: Run = cli_runs["results"]["targets cpu --json"]
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["name"] == "cpu"


@pytest.mark.parametrize("args", [["convert"], ["probe", "compare"], ["verify", "--ref", "x"], ["train", "--bogus"]])
def test_usage_errors_are_click_messages_not_tracebacks(args: list[str]) -> None:
    run = run_cli(args)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and ("Missing" in run.stderr or "No such option" in run.stderr), run.stderr


def _failing_app(exc: BaseException) -> Any:
    from crosschip.cli_common import make_app

    app = make_app("t", "raises")

    @app.command()
    def boom() -> None:
        raise exc

    @app.command()
    def other() -> None:  # two commands: typer then takes the command name, as crosschip does
        pass

    return app


@pytest.mark.parametrize(("exc", "code", "expect"), [
    (RuntimeError("kernel exploded\nsecond line"), 3, "internal error: RuntimeError: kernel exploded"),
    (OSError(28, "No space left on device", "/data/out"), 2, "No space left on device: /data/out"),
])
def test_unexpected_exception_is_one_line(exc: BaseException, code: int, expect: str, monkeypatch: Any,
                                          capfd: Any) -> None:
    """An exception no stage anticipated still reaches the user as one line (exit 3, or 2 for the OS's errors);
    CROSSCHIP_TRACEBACK=1 shows the traceback instead."""
    from crosschip.cli_common import TRACEBACK_ENV, run_app

    monkeypatch.setattr(sys, "argv", ["t", "boom"])
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    with pytest.raises(SystemExit) as exited:
        run_app(_failing_app(exc))
    lines = capfd.readouterr().err.strip().splitlines()
    assert exited.value.code == code
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0] and "(fix: " in lines[0]
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(type(exc)):
        run_app(_failing_app(exc))
