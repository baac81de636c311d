"""The demo on a busy machine (issue 14, item 6): a step floor the time budget cannot cut, a plain sentence when
the machine was too slow or the bar was missed, and a served request the model can answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from openai import OpenAI

from crosschip import demo
from crosschip.train.config import TrainConfig
from crosschip.train.loop import train
from crosschip.train.report import NullReporter


def test_plan_never_goes_below_the_quality_floor() -> None:
    busy_steps, busy_fit = demo.plan_steps(per_step_s=8.0, minutes=5.5)  # 38 steps fit: the busy machine
    assert busy_fit < demo.DEMO_MIN_STEPS == busy_steps
    quiet_steps, quiet_fit = demo.plan_steps(per_step_s=0.2, minutes=5.5)
    assert quiet_steps == quiet_fit > demo.DEMO_MIN_STEPS


def test_the_time_budget_stops_a_run_only_after_min_steps(tiny_corpus: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data=tiny_corpus, model="tiny", out=tmp_path / "run", device="cpu", precision="fp32", steps=8,
                      batch_size=2, seq_len=32, warmup_steps=1, eval_every=4, save_every=100, log_every=1,
                      vocab_size=400, threads=1, time_budget_s=0.0, min_steps=3)
    result = train(cfg, NullReporter())
    assert result.steps == 3 and result.interrupted_by == "time budget"


def test_quality_notes_say_plainly_why() -> None:
    plan = {"requested_steps": None, "steps": 300, "calibrated_s_per_step": 0.5, "estimate_s": 300 * 0.5 * 1.08}
    slow = {"steps": 300, "elapsed_s": 600.0, "interrupted_by": None}
    notes = demo.quality_notes(1.9, slow, plan)
    assert len(notes) == 1 and "too slow for the time estimate" in notes[0] and "10.0 min against ~2.7 min" in notes[0]
    assert demo.quality_notes(1.9, {**slow, "elapsed_s": 160.0}, plan) == []  # on time, above the bar
    stopped = demo.quality_notes(0.4, {**slow, "elapsed_s": 160.0, "steps": 120, "interrupted_by": "SIGINT"}, plan)
    assert stopped == ["training was stopped by SIGINT at step 120 of 300"]
    few = demo.quality_notes(0.1, {**slow, "elapsed_s": 10.0, "steps": 38}, {"requested_steps": 38})
    assert few == [f"--steps 38 is below the {demo.DEMO_MIN_STEPS} steps the quality bar needs"]


def test_the_served_request_is_a_docstring_continuation_cut_at_a_blank_line(make_checkpoint: Any,
                                                                            tmp_path: Path) -> None:
    from crosschip.serve.api import _load, build_app

    engine, tokenizer = _load(make_checkpoint("tiny", tmp_path / "ckpt"), "cpu", None,
                              {"max_batch": 2, "max_queue": 4, "max_context": 256}, False)
    with TestClient(build_app(engine, tokenizer)) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        text, finish, generated = demo.ask_served(client, engine.model_name)
    assert finish in ("stop", "length") and "\n\n" not in text and 1 <= generated <= demo.DEMO_SERVE_MAX_TOKENS


def test_the_demo_server_starts_as_a_real_process_and_answers(make_checkpoint: Any, tmp_path: Path) -> None:
    """The server prints `loaded ...` before `serving ... at URL`: the demo waits for the second line."""
    proc, url = demo._start_server(make_checkpoint("tiny", tmp_path / "ckpt"))
    try:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0)
        text, finish, generated = demo.ask_served(client, client.models.list().data[0].id)
        assert finish in ("stop", "length") and 1 <= generated <= demo.DEMO_SERVE_MAX_TOKENS
    finally:
        proc.terminate()
        proc.wait(timeout=60)
