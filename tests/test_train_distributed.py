"""Distributed training with real torchrun process groups (2 ranks, gloo): DDP, FSDP2, DCP resharding, restarts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from crosschip.checkpoint import open_checkpoint, read_state_dict
from crosschip.data.corpus import stdlib_docstring_corpus
from crosschip.train.config import TrainConfig
from crosschip.train.loop import train
from crosschip.train.report import NullReporter
from crosschip.train.state import complete_steps, step_dir_name

STEPS, SAVE_EVERY = 6, 3
COMMON = ["--device", "cpu", "--precision", "fp32", "--steps", str(STEPS), "--batch-size", "2", "--seq-len", "32",
          "--save-every", str(SAVE_EVERY), "--eval-every", "3", "--log-every", "1", "--vocab-size", "400",
          "--warmup-steps", "2"]
TIMEOUT = 300  # a hang is a failure, not a stuck CI


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stdlib_docstring_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", max_bytes=120_000)


def crosschip(nproc: int, corpus: Path, out: Path, *extra: str, restarts: int = 0) -> list[str]:
    """The command line: torchrun with `nproc` workers, or a plain process for nproc == 0."""
    train_args = ["train", "--data", str(corpus), "--model", "tiny", "--out", str(out), *COMMON, *extra]
    if nproc == 0:
        return [sys.executable, "-m", "crosschip", *train_args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--max-restarts", str(restarts), "-m", "crosschip", *train_args]


def run(cmd: list[str], ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


def weights(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return read_state_dict(open_checkpoint(out / step_dir_name(step) / "model"))


def assert_close(a: Path, b: Path, exact: bool = False) -> None:
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() == set(range(1, STEPS + 1))
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-5), f"step {step}: {la[step]} vs {lb[step]}"
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        if exact:
            assert torch.equal(wa[name], wb[name]), name
        else:  # fp32 reduction tolerance: the sums run in another order
            torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)


def fork(run_dir: Path, dst: Path, at: int = SAVE_EVERY) -> Path:
    """A copy of a finished run as it stood at step `at`: the later saves are gone, so --resume starts there."""
    shutil.copytree(run_dir, dst)
    for step in complete_steps(dst):
        if step > at:
            shutil.rmtree(dst / step_dir_name(step))
    return dst


@pytest.fixture(scope="module")
def runs(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The uninterrupted references: 1 process x 2 micro-batches, 2-rank DDP, 2-rank FSDP2; one global batch."""
    root = tmp_path_factory.mktemp("runs")
    out = {"one": root / "one", "ddp": root / "ddp", "fsdp": root / "fsdp"}
    run(crosschip(0, corpus, out["one"], "--grad-accum", "2"))
    run(crosschip(2, corpus, out["ddp"], "--parallel", "ddp"))
    run(crosschip(2, corpus, out["fsdp"], "--parallel", "fsdp"))
    return out


def test_ddp_equals_one_process_with_accumulation_and_fsdp_equals_ddp(runs: dict[str, Path]) -> None:
    assert_close(runs["one"], runs["ddp"])
    assert_close(runs["ddp"], runs["fsdp"])
    prov = open_checkpoint(runs["fsdp"] / step_dir_name(STEPS) / "model").manifest["provenance"]
    assert prov["world_size"] == 2 and prov["parallel"] == "fsdp" and prov["tokens_seen"] == STEPS * 4 * 32
    assert prov["train_config"]["grad_accum"] == 1


@pytest.mark.parametrize(("source", "nproc", "extra", "exact"), [
    ("ddp", 2, ["--parallel", "ddp"], True),  # 2 -> 2: the same reduction order, bit for bit
    ("ddp", 0, [], False),  # 2 -> 1: the saved global batch of 4 becomes 2 micro-batches
    ("one", 2, ["--parallel", "ddp"], False),  # 1 -> 2
    ("ddp", 2, ["--parallel", "fsdp"], False),  # DDP -> FSDP2
], ids=["ddp2-ddp2", "ddp2-one", "one-ddp2", "ddp2-fsdp2"])
def test_resharded_resume_continues_the_uninterrupted_run(
    runs: dict[str, Path], corpus: Path, tmp_path: Path, source: str, nproc: int, extra: list[str], exact: bool,
) -> None:
    resumed = fork(runs[source], tmp_path / "resumed")
    run(crosschip(nproc, corpus, resumed, "--resume", *extra))
    assert_close(runs[source], resumed, exact=exact)
    segments = open_checkpoint(resumed / step_dir_name(STEPS) / "model").manifest["provenance"]["segments"]
    assert [(s["start_step"], s["end_step"]) for s in segments] == [(0, SAVE_EVERY), (SAVE_EVERY, STEPS)]


def test_chip_move_fsdp_to_one_bf16_process_is_recorded_segment_by_segment(
    runs: dict[str, Path], corpus: Path, tmp_path: Path,
) -> None:
    """A 2-rank FSDP2 fp32 run continues as one process in bf16 autocast: another chip, another precision."""
    moved = fork(runs["fsdp"], tmp_path / "moved")
    cfg = TrainConfig(data=corpus, model="tiny", out=moved, device="cpu", precision="bf16", steps=STEPS,
                      batch_size=2, seq_len=32, save_every=SAVE_EVERY, eval_every=3, log_every=1, vocab_size=400,
                      warmup_steps=2, resume=True, threads=1)
    result = train(cfg, NullReporter())
    ref = losses(runs["fsdp"])
    for step, loss in losses(moved).items():  # bf16 autocast: close to the fp32 run, not equal
        assert loss == pytest.approx(ref[step], abs=0.05 if step > SAVE_EVERY else 1e-6)
    prov = open_checkpoint(result.checkpoint).manifest["provenance"]
    assert [(s["world_size"], s["parallel"], s["precision"], s["end_step"]) for s in prov["segments"]] == [
        (2, "fsdp", "fp32", SAVE_EVERY), (1, "none", "bf16", STEPS)]


def test_deepseek_trains_under_fsdp_and_the_export_equals_the_sharded_state(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    run(crosschip(2, corpus, out, "--parallel", "fsdp", "--model", "deepseek-tiny", "--steps", "3"))
    step_dir = out / step_dir_name(3)
    exported = AutoModelForCausalLM.from_pretrained(step_dir / "model").eval()
    # The trained weights as the ranks hold them: the DCP shards, loaded into the same architecture.
    import torch.distributed.checkpoint as dcp

    trained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(step_dir / "model")).eval()
    state = {"model": trained.state_dict()}
    dcp.load(state, checkpoint_id=step_dir / "train_state" / "dcp", no_dist=True)
    trained.load_state_dict(state["model"])
    x = torch.randint(0, exported.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(exported(x).logits, trained(x).logits)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(out).values())


def test_bad_distributed_input_is_one_line_on_every_rank(corpus: Path, tmp_path: Path) -> None:
    proc = run(crosschip(0, corpus, tmp_path / "a", "--parallel", "fsdp"), ok=False)
    assert proc.returncode == 2 and "needs a process group" in proc.stderr and "torchrun" in proc.stderr
    assert "Traceback" not in proc.stderr
    t0 = time.monotonic()
    proc = run(crosschip(2, corpus, tmp_path / "b", "--global-batch", "3"), ok=False)
    assert proc.returncode != 0 and time.monotonic() - t0 < 120  # no hang
    lines = [ln for ln in proc.stderr.splitlines() if "not a multiple of --batch-size 2 x 2 rank(s)" in ln]
    assert len(lines) == 2 and any("[rank 1]" in ln for ln in lines)  # both ranks say it, once each


def test_resume_with_another_model_is_refused(runs: dict[str, Path], corpus: Path, tmp_path: Path) -> None:
    resumed = fork(runs["one"], tmp_path / "other")
    cmd = crosschip(0, corpus, resumed, "--resume")
    cmd[cmd.index("tiny")] = "deepseek-tiny"
    proc = run(cmd, ok=False)
    assert proc.returncode == 2 and "trained the tiny preset, not deepseek-tiny" in proc.stderr


# ---------------------------------------------------------------- faults: SIGKILL one rank under torchrun


def _worker(launcher: psutil.Process, local_rank: int) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == str(local_rank) and "crosschip" in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def kill_rank_when(cmd: list[str], condition: Callable[[], bool]) -> subprocess.CompletedProcess[str]:
    """Run torchrun; SIGKILL local rank 1 (once) as soon as `condition()` holds; wait for the job to end."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    launcher, killed, deadline = psutil.Process(proc.pid), False, time.monotonic() + TIMEOUT
    while proc.poll() is None and not killed and time.monotonic() < deadline:
        if condition() and (worker := _worker(launcher, 1)) is not None:
            os.kill(worker.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.002)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert killed, "the run ended before the kill"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.mark.parametrize("when", ["mid-run", "during-save"])
def test_sigkill_of_one_rank_restarts_the_group_and_finishes_identically(
    runs: dict[str, Path], corpus: Path, tmp_path: Path, when: str,
) -> None:
    out = tmp_path / when
    # Many small shards make a save slow enough to be killed in the middle of it.
    cmd = crosschip(2, corpus, out, "--parallel", "ddp", "--shard-size", "16KB", restarts=1)

    def saving() -> bool:
        return out.exists() and any(p.name.startswith(".step-") for p in out.iterdir())

    proc = kill_rank_when(cmd, (lambda: _logged(out) >= SAVE_EVERY + 1) if when == "mid-run" else saving)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torchrun restart 1: resuming" in proc.stderr
    assert_close(runs["ddp"], out, exact=True)
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]  # the killed save left nothing behind
