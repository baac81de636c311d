"""Layer localization on real tiny models: statistics, gates, accumulated vs isolated, emulated overflow."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from crosschip import checkpoint
from crosschip.errors import CrosschipError
from crosschip.verify.emulate import apply_emulation, emulation_for
from crosschip.verify.layers import (
    ASSUMED_NOISE_ULPS,
    DEFAULT_MARGIN,
    StatsAccumulator,
    gate_for,
    layer_points,
    localize,
)

LAYER0 = ("layers.0.self_attn", "layers.0.mlp", "layers.0")


def _ids(batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 400, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _by_name(result: Any) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in result.points}


def _perturb(module: torch.nn.Module, frac: float = 0.05, seed: int = 1) -> None:
    """Add Gaussian noise of `frac` x each weight matrix's std (the 'bad layer' of the acceptance test)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in module.parameters():
            if weight.dim() >= 2:
                weight += frac * weight.std() * torch.randn(weight.shape, generator=gen)


# ---------------------------------------------------------------- statistics and gates


def _stats(t: list[float], r: list[float]) -> dict[str, Any]:
    acc = StatsAccumulator()
    acc.update(torch.tensor(t), torch.tensor(r))
    return acc.stats().to_dict()


def test_stats_match_msprobe_definitions() -> None:
    r = [1.0, 2.0, 0.0, 4.0, 0.0]
    t = [1.0, 2.004, 0.0, 4.1, 0.5]  # rel errors 0, 0.002, 0/0 (exact), 0.025, x/0
    s = _stats(t, r)
    tt, rr = torch.tensor(t, dtype=torch.float64), torch.tensor(r, dtype=torch.float64)
    assert s["within_1e-3"] == pytest.approx(2 / 5)  # the exact element and the r == t == 0 one
    assert s["within_5e-3"] == pytest.approx(3 / 5)
    assert s["max_abs"] == pytest.approx(0.5)
    assert s["max_rel"] == pytest.approx(0.025)  # over |r| > 0 only
    assert s["rel_rmse"] == pytest.approx(((tt - rr).norm() / rr.norm()).item())
    assert s["cosine"] == pytest.approx(torch.dot(tt, rr).item() / (tt.norm() * rr.norm()).item())
    assert s["numel"] == 5 and s["nonfinite"] == 0


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_stats_accumulate_exactly_across_batches(dtype: torch.dtype, tol: float) -> None:
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(2, 7, 16, generator=gen, dtype=dtype)
    t = r + 0.01 * torch.randn(2, 7, 16, generator=gen, dtype=dtype)
    whole, parts = StatsAccumulator(), StatsAccumulator()
    whole.update(t, r)
    parts.update(t[:1], r[:1])
    parts.update(t[1:], r[1:])
    a, b = whole.stats().to_dict(), parts.stats().to_dict()
    for key in ("within_1e-3", "within_5e-3", "max_abs", "max_rel", "numel"):
        assert a[key] == b[key]
    for key in ("cosine", "rel_rmse"):  # sums, not averages of per-batch figures
        assert a[key] == pytest.approx(b[key], rel=tol)
    exact = torch.linalg.vector_norm((t - r).double()) / torch.linalg.vector_norm(r.double())
    assert a["rel_rmse"] == pytest.approx(float(exact), rel=tol)


def test_stats_of_infinities() -> None:
    both = _stats([math.inf, 1.0], [math.inf, 1.0])  # the same special on both sides is zeroed
    assert both["nonfinite"] == 0 and both["rel_rmse"] == 0.0 and both["within_1e-3"] == 1.0
    one = _stats([math.inf, 1.0], [3.0, 1.0])
    assert one["nonfinite"] == 1 and one["rel_rmse"] is None and one["cosine"] is None
    assert one["within_1e-3"] == 0.5


def test_gate_scales_noise_to_the_target_precision() -> None:
    assert gate_for(1e-7, "bf16", 4.0) == pytest.approx(4.0 * 1e-7 * 2.0**16)
    assert gate_for(1e-7, "fp16", 4.0) == pytest.approx(4.0 * 1e-7 * 2.0**13)
    assert gate_for(0.0, "fp32", 4.0) == pytest.approx(4.0 * 2.0**-24)  # floor: the target's unit roundoff
    assert gate_for(None, "fp32", 1.0) == pytest.approx(ASSUMED_NOISE_ULPS * 2.0**-24)
    with pytest.raises(CrosschipError, match="precision"):
        gate_for(1e-7, "fp4", 4.0)


def test_points_come_in_report_order() -> None:
    names = [p.name for p in layer_points(2)]
    assert names == [*LAYER0, "layers.1.self_attn", "layers.1.mlp", "layers.1"]
    assert [p.kind for p in layer_points(1)] == ["attn", "mlp", "layer"]


# ---------------------------------------------------------------- localize on tiny models


def test_identical_fp32_models_pass_with_zero_error(make_model: Any) -> None:
    ref = make_model("tiny")
    ref.train()  # localize runs in eval mode and restores the caller's mode
    result = localize(ref, copy.deepcopy(ref), [_ids()], tgt_precision="fp32")
    assert ref.training
    assert result.first_failing is None and result.first_failing_accumulated is None
    assert [p["name"] for p in result.points] == [p.name for p in layer_points(2)]
    for point in result.points:
        assert point["passed"] and point["noise_floor"] > 0 and point["gate"] > 0
        for mode in ("accumulated", "isolated"):
            assert point[mode]["rel_rmse"] == 0.0 and point[mode]["cosine"] == pytest.approx(1.0)
            assert point[mode]["within_1e-3"] == 1.0 and point[mode]["numel"] == 2 * 32 * 64
    report = result.to_dict()
    assert report["isolated_rows"] == 2 and report["noise_floor"] is True
    assert set(report) >= {"points", "first_failing", "first_failing_accumulated", "isolated_rows", "noise_floor"}


@pytest.mark.parametrize(("dtype", "precision"), [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_half_precision_copy_passes_every_point(make_model: Any, dtype: torch.dtype, precision: str) -> None:
    ref = make_model("tiny")
    result = localize(ref, copy.deepcopy(ref).to(dtype), [_ids()], tgt_precision=precision)
    assert result.first_failing is None and result.first_failing_accumulated is None
    for point in result.points:
        assert point["passed"]
        assert 0 < point["isolated"]["rel_rmse"] < point["gate"] / 2  # rounding is seen, well inside the gate


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_perturbed_layer_of_a_checkpoint_is_named(make_checkpoint: Any, tmp_path: Path, precision: str) -> None:
    path = make_checkpoint("tiny", tmp_path / "ckpt")
    ref, _ = checkpoint.load_model(path)
    dtype = torch.float32 if precision == "fp32" else torch.float16
    tgt, _ = checkpoint.load_model(path, dtype=dtype)
    _perturb(tgt.model.layers[1].mlp)
    result = localize(ref, tgt, [_ids()], tgt_precision=precision)
    assert result.first_failing == "layers.1.mlp"
    assert result.first_failing_accumulated == "layers.1.mlp"
    points = _by_name(result)
    assert all(points[name]["passed"] for name in (*LAYER0, "layers.1.self_attn"))


def test_isolated_mode_separates_a_layers_own_error_from_inherited_error(make_model: Any) -> None:
    ref = make_model("tiny")
    tgt = copy.deepcopy(ref)
    _perturb(tgt.model.layers[0].self_attn)
    result = localize(ref, tgt, [_ids()], tgt_precision="fp32")
    assert result.first_failing == result.first_failing_accumulated == "layers.0.self_attn"
    for name in ("layers.1.self_attn", "layers.1.mlp", "layers.1"):
        point = _by_name(result)[name]
        assert point["passed"]  # its own computation is exact ...
        assert point["accumulated"]["rel_rmse"] > point["gate"]  # ... the error it carries is inherited


def test_fp16_overflow_is_named_under_310p_emulation(make_model: Any) -> None:
    ref = make_model("tiny")
    mlp = ref.model.layers[1].mlp
    with torch.no_grad():  # layer 1's MLP output reaches ~1e5 on these ids: finite in fp32, not in fp16
        mlp.up_proj.weight *= 1000
        mlp.down_proj.weight *= 30000
    ids = _ids()
    emulated = copy.deepcopy(ref)
    apply_emulation(emulated, emulation_for("ascend-310p", None))
    result = localize(ref, emulated, [ids], tgt_precision="fp16")
    assert torch.isfinite(result.ref_logits[0]).all() and torch.isfinite(result.tgt_logits[0]).all()
    assert result.first_failing == result.first_failing_accumulated == "layers.1.mlp"
    points = _by_name(result)
    assert all(points[name]["passed"] for name in (*LAYER0, "layers.1.self_attn"))
    saturated = points["layers.1.mlp"]["isolated"]
    assert saturated["nonfinite"] == 0 and saturated["max_abs"] > 0
    # The same model in plain IEEE fp16 overflows to inf: reported as non-finite, and failing.
    ieee = localize(ref, copy.deepcopy(ref).half(), [ids], tgt_precision="fp16")
    overflowed = _by_name(ieee)["layers.1.mlp"]
    assert ieee.first_failing == "layers.1.mlp" and overflowed["isolated"]["nonfinite"] > 0
    assert overflowed["isolated"]["rel_rmse"] is None and not overflowed["passed"]


def test_returned_logits_equal_plain_forwards(make_model: Any) -> None:
    ref = make_model("tiny")
    tgt = copy.deepcopy(ref).to(torch.bfloat16)
    batches = [_ids(2, 16, seed=1), _ids(1, 24, seed=2)]
    result = localize(ref, tgt, batches)
    with torch.inference_mode():
        for k, ids in enumerate(batches):
            assert torch.equal(result.ref_logits[k], ref(input_ids=ids, use_cache=False).logits.float())
            assert torch.equal(result.tgt_logits[k], tgt(input_ids=ids, use_cache=False).logits.float())
            assert result.tgt_logits[k].dtype == torch.float32 and result.tgt_logits[k].shape == (*ids.shape, 400)


def test_isolated_mode_and_noise_floor_replay_a_fixed_sample_of_whole_rows(make_model: Any) -> None:
    ref = make_model("tiny")
    batches = [_ids(2, 16, seed=1), _ids(2, 16, seed=2), _ids(2, 16, seed=3)]
    result = localize(ref, copy.deepcopy(ref), batches, sample_positions=24, tgt_precision="fp32")
    # ceil(24 / 16) = 2 rows: the first batch's 2 rows cover 32 >= 24 tokens, so later batches are not replayed
    assert result.isolated_rows == 2 and result.noise_floor_rows == 2
    point = result.points[0]
    assert point["isolated"]["numel"] == 2 * 16 * 64 and point["accumulated"]["numel"] == 6 * 16 * 64


def test_without_isolation_or_noise_floor_the_accumulated_errors_decide(make_model: Any) -> None:
    ref = make_model("tiny")
    tgt = copy.deepcopy(ref)
    _perturb(tgt.model.layers[1].mlp)
    result = localize(ref, tgt, [_ids()], isolated=False, noise_floor=False, tgt_precision="fp32")
    assert result.first_failing == result.first_failing_accumulated == "layers.1.mlp"
    assert result.isolated_rows == 0 and result.noise_floor_rows == 0
    point = result.points[0]
    assert point["isolated"] is None and point["noise_floor"] is None
    assert point["gate"] == pytest.approx(gate_for(None, "fp32", DEFAULT_MARGIN))


def test_deepseek_moe_runs_and_reports_routing(make_model: Any) -> None:
    ref = make_model("deepseek-tiny")
    result = localize(ref, copy.deepcopy(ref).to(torch.bfloat16), [_ids(2, 16)], tgt_precision="bf16")
    points = _by_name(result)
    assert len(points) == 3 * ref.config.num_hidden_layers
    assert result.first_failing is None  # isolated layers follow the reference's expert routing
    assert points["layers.0.mlp"]["isolated"]["rerouted"] is None  # first_k_dense_replace = 1: dense MLP
    rerouted = points["layers.1.mlp"]["accumulated"]["rerouted"]
    assert rerouted is not None and 0.0 <= rerouted <= 1.0


@pytest.mark.parametrize(
    ("batches", "kwargs", "match"),
    [
        ([], {}, "no input batches"),
        ([torch.zeros(2, 4)], {}, "int64"),
        ([torch.zeros(4, dtype=torch.int64)], {}, "int64"),
        ([torch.zeros(1, 4, dtype=torch.int64)], {"tgt_precision": "fp4"}, "precision"),
        ([torch.zeros(1, 4, dtype=torch.int64)], {"sample_positions": 0}, "sample_positions"),
    ],
)
def test_bad_arguments_are_user_errors(make_model: Any, batches: list[Any], kwargs: dict[str, Any], match: str) -> None:
    ref = make_model("tiny")
    with pytest.raises(CrosschipError, match=match):
        localize(ref, ref, batches, **kwargs)


def test_models_of_different_depth_are_refused(make_model: Any) -> None:
    ref = make_model("tiny")
    shallow = copy.deepcopy(ref)
    shallow.model.layers = shallow.model.layers[:1]
    with pytest.raises(CrosschipError, match="decoder layers"):
        localize(ref, shallow, [_ids()])


def test_float32_squares_beyond_range_are_not_taken_for_infinities() -> None:
    r = torch.tensor([1e20, 2.0])  # 1e40 overflows a float32 sum of squares, not float64
    acc = StatsAccumulator()
    acc.update(r * (1 + 1e-3), r)
    stats = acc.stats().to_dict()
    assert stats["nonfinite"] == 0 and stats["rel_rmse"] == pytest.approx(1e-3, rel=1e-4)
