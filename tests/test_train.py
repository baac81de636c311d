"""Training end to end: real models, real checkpoints, real processes killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crosschip.checkpoint import load_model, open_checkpoint, read_state_dict
from crosschip.data.corpus import stdlib_docstring_corpus
from crosschip.errors import CrosschipError
from crosschip.generate import SamplingParams, generate_text
from crosschip.train.config import TrainConfig
from crosschip.train.loop import _truncate_metrics, train
from crosschip.train.report import NullReporter
from crosschip.train.schedule import lr_at
from crosschip.train.state import complete_steps


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stdlib_docstring_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", max_bytes=120_000)


def small_cfg(corpus: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(
        data=corpus, model="tiny", out=out, device="cpu", precision="fp32", steps=30, batch_size=4, seq_len=32,
        lr=3e-3, warmup_steps=5, eval_every=10, save_every=10, log_every=5, vocab_size=400, threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_schedule_warmup_then_cosine_to_floor() -> None:
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("preset", ["tiny", "deepseek-tiny"])
def test_train_learns_and_checkpoint_loads_in_transformers(corpus: Path, tmp_path: Path, preset: str) -> None:
    result = train(small_cfg(corpus, tmp_path / "run", model=preset, steps=40), NullReporter())
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < first - 0.5, f"loss did not fall: {first} -> {last}"
    assert result.val_loss is not None and result.steps == 40

    ckpt = open_checkpoint(result.checkpoint)
    prov = ckpt.manifest["provenance"]
    assert prov["steps"] == 40 and prov["tokens_seen"] == 40 * 4 * 32
    assert prov["device"]["kind"] == "cpu" and prov["precision"] == "fp32"
    assert prov["data_fingerprint"] and prov["versions"]["torch"] == torch.__version__

    hf = AutoModelForCausalLM.from_pretrained(result.checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(result.checkpoint)
    ours, _ = load_model(result.checkpoint)
    ids = torch.tensor([tok("Return the value of the")["input_ids"]])  # the tokenizer adds BOS, as training did
    assert ids[0, 0] == tok.bos_token_id and int((ids == tok.bos_token_id).sum()) == 1
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ours(ids).logits)

    # `generate` follows the run directory's `latest` pointer to the same checkpoint and streams text.
    pieces: list[str] = []
    text = generate_text(tmp_path / "run", "Return the", SamplingParams(max_new_tokens=12), "cpu", pieces.append)
    assert text and "".join(pieces) == text
    expected = hf.generate(ids[:, :3], max_new_tokens=12, do_sample=False)[0, 3:].tolist()
    assert tok("Return the")["input_ids"] == ids[0, :3].tolist()
    assert tok.decode(expected, skip_special_tokens=True) == text


def test_trains_on_one_unbroken_txt_file(corpus: Path, tmp_path: Path) -> None:
    """The nanoGPT habit, `--data input.txt` with one text and no blank lines: split by position, and it trains."""
    text = "\n".join(json.loads(line)["text"].replace("\n\n", "\n") for line in corpus.read_text().splitlines())
    single = tmp_path / "input.txt"
    single.write_text(text[:60_000], encoding="utf-8")
    result = train(small_cfg(single, tmp_path / "run", steps=4, warmup_steps=1, eval_every=4), NullReporter())
    assert result.steps == 4 and result.val_loss is not None


def test_resume_in_process_is_bit_identical(corpus: Path, tmp_path: Path) -> None:
    full = train(small_cfg(corpus, tmp_path / "full", steps=20), NullReporter())
    train(small_cfg(corpus, tmp_path / "part", steps=20, time_budget_s=0.0), NullReporter())  # stops after 1 step
    assert complete_steps(tmp_path / "part") == [1]
    resumed = train(small_cfg(corpus, tmp_path / "part", steps=20, resume=True), NullReporter())
    assert_same_weights(full.checkpoint, resumed.checkpoint)
    rows = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows}), "metrics rows duplicated on resume"


def test_a_run_saved_before_sharded_checkpoints_still_resumes(corpus: Path, tmp_path: Path) -> None:
    """state.pt (one file, plain optimizer state dict) from earlier crosschip: resumes bit-identically."""
    import random

    from crosschip.train.loop import Trainer

    full = train(small_cfg(corpus, tmp_path / "full", steps=20), NullReporter())
    train(small_cfg(corpus, tmp_path / "old", steps=20, time_budget_s=0.0), NullReporter())  # stops after 1 step
    state_dir = tmp_path / "old" / "step-00000001" / "train_state"
    meta = torch.load(state_dir / "meta.pt", weights_only=True)
    trainer = Trainer(small_cfg(corpus, tmp_path / "old", steps=20, resume=True), NullReporter())
    legacy = {k: meta[k] for k in ("step", "tokens_seen", "elapsed", "last_loss", "last_val", "scaler", "loader")}
    rng = torch.load(state_dir / "rng-00000.pt", weights_only=True)
    legacy.update(optimizer=trainer.optimizer.state_dict(), rng={"cpu": rng["cpu"]}, python_rng=random.getstate())
    # The sharded files go; the old single file, with the optimizer state a resumed trainer restored, comes back.
    for path in state_dir.rglob("*"):
        if path.is_file():
            path.unlink()
    torch.save(legacy, state_dir / "state.pt")
    resumed = train(small_cfg(corpus, tmp_path / "old", steps=20, resume=True), NullReporter())
    assert_same_weights(full.checkpoint, resumed.checkpoint)


def test_existing_out_needs_overwrite_and_is_untouched(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CrosschipError, match="--overwrite"):
        train(small_cfg(corpus, out, steps=2, warmup_steps=1), NullReporter())
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(CrosschipError, match="no complete checkpoint"):
        train(small_cfg(corpus, out, steps=2, warmup_steps=1, resume=True), NullReporter())


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = read_state_dict(open_checkpoint(a)), read_state_dict(open_checkpoint(b))
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


# ---------------------------------------------------------------- real processes, SIGKILL


def cli_args(corpus: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "crosschip.cli", "train", "--data", str(corpus), "--model", "tiny", "--out", str(out),
        "--device", "cpu", "--precision", "fp32", "--steps", "150", "--batch-size", "4", "--seq-len", "32",
        "--save-every", "15", "--eval-every", "50", "--log-every", "1", "--vocab-size", "400", "--threads", "1",
        # many small shards make each save slow enough to be killed in the middle of it
        "--shard-size", "16KB",
    ]


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    # only newline-terminated lines: the trainer may be mid-write (or killed mid-write) when we read
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def save_in_progress(out: Path) -> bool:
    return out.exists() and any(p.name.startswith(".step-") for p in out.iterdir())


def run_until(args: list[str], condition, timeout: float = 60.0) -> bool:
    """Start a training process; SIGKILL it as soon as `condition()` holds. False if it finished first."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if condition():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.001)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    return False


def test_sigkill_at_several_points_then_resume_is_bit_identical(corpus: Path, tmp_path: Path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(cli_args(corpus, ref), check=True, capture_output=True)

    args = cli_args(corpus, out)
    assert run_until(args, lambda: (out / "latest").exists() and logged_steps(out) >= 20)  # between saves
    resume = [*args, "--resume"]
    killed_in_save = False
    for _ in range(5):  # kill inside a save; retried because a save can finish between two polls
        if not run_until(resume, lambda: save_in_progress(out)):
            break
        killed_in_save = killed_in_save or save_in_progress(out)
        if killed_in_save:
            break
    assert killed_in_save, "never caught a save in progress"
    assert all((out / f"step-{s:08d}" / "model" / "crosschip.json").exists() for s in complete_steps(out))
    assert run_until(resume, lambda: logged_steps(out) >= 100)  # late in the run
    assert not run_until(resume, lambda: False)  # runs to the end

    assert_same_weights(ref / "step-00000150" / "model", out / "step-00000150" / "model")
    open_checkpoint(out / "step-00000150" / "model")  # sha256s verify
    assert not save_in_progress(out), "temp dirs of killed saves were not cleaned up"


def test_resume_drops_metrics_after_the_step_and_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    path.write_text("\n".join(rows) + "\n" + '{"step": 4, "lo')  # killed in the middle of a write
    _truncate_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_sigterm_saves_then_exits(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [a if a != "150" else "100000" for a in cli_args(corpus, out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while logged_steps(out) < 5:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    step = complete_steps(out)[-1]
    assert step >= 5 and step == logged_steps(out)
    open_checkpoint(out / f"step-{step:08d}" / "model")
