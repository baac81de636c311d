"""Two-sided verification of a live endpoint (a real `crosschip serve` process): the conversion's loss
(reference vs the served checkpoint in-process, against the golden) and serving fidelity (the endpoint vs
crosschip's own load of that checkpoint, against the two numerics' measured floor).

An endpoint that serves another model than the checkpoint it claims fails fidelity; a broken served
checkpoint fails the conversion and is named at its layer; one-sided verification (served checkpoint
unknown: tests/verify/test_sides.py) falls back to the class constants.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from crosschip.convert.pipeline import convert, resolve_options
from crosschip.verify.faults import Fault, plant
from crosschip.verify.run import VerifyOptions, run_verify
from serverkit import ServerProcess, start_server


@pytest.fixture(scope="module")
def ckpts(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("two-sided")
    ref = make_checkpoint("tiny", root / "ref")
    w8a8 = root / "w8a8"
    convert(ref, w8a8, resolve_options("int8-w8a8-dynamic", None, None, None))
    bad = plant(w8a8, root / "w8a8-bad", Fault("x1.3", "scale", "model.layers.1.mlp.down_proj", 1.3))
    return {"ref": ref, "w8a8": w8a8, "bad": bad}


@pytest.fixture(scope="module")
def bad_server(ckpts: dict[str, Path]) -> Iterator[ServerProcess]:
    server = start_server(ckpts["bad"])
    yield server
    server.stop()


def _verify(ref: Path, url: str, served: Path | None, **kw: Any) -> dict[str, Any]:
    return run_verify(VerifyOptions(ref=ref, target=url, served=served, max_new_tokens=4, seq_len=64,
                                    bootstrap=200, **kw))


def _failed_groups(report: dict[str, Any]) -> set[str]:
    return {g["group"] for g in report["gates"] if g["passed"] is False}


def test_broken_served_checkpoint_fails_the_conversion(ckpts: dict[str, Path], bad_server: ServerProcess) -> None:
    report = _verify(ckpts["ref"], bad_server.url, ckpts["bad"])
    assert report["two_sided"] and report["served"]["path"] == str(ckpts["bad"])
    assert report["verdict"] == "fail" and "conversion" in _failed_groups(report)
    assert report["layers"]["first_failing"] == "layers.1.mlp"
    # The endpoint does serve that checkpoint faithfully: fidelity passes, at its measured floor.
    assert "fidelity" not in _failed_groups(report)
    assert report["fidelity"]["gate_basis"] == "measured"


def test_endpoint_serving_another_model_than_claimed_fails_fidelity(ckpts: dict[str, Path],
                                                                    bad_server: ServerProcess) -> None:
    report = _verify(ckpts["ref"], bad_server.url, ckpts["w8a8"])
    assert report["verdict"] == "fail" and "fidelity" in _failed_groups(report)
    assert "conversion" not in _failed_groups(report)  # the claimed checkpoint itself is a correct conversion


def test_served_checkpoint_comes_from_the_model_card(ckpts: dict[str, Path], bad_server: ServerProcess) -> None:
    # crosschip serve, like vLLM, names the served directory as the model card's `root`.
    report = _verify(ckpts["ref"], bad_server.url, None, layers=False)
    assert report["two_sided"] and report["served"] == {**report["served"], "path": str(ckpts["bad"].resolve()),
                                                       "source": "the model card's root"}
    assert report["verdict"] == "fail" and "conversion" in _failed_groups(report)
    served_gates = [g for g in report["gates"] if g["group"] == "served"]
    assert served_gates and all(g["passed"] is None for g in served_gates)  # reported, gated two-sided instead
