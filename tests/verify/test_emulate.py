"""Chip emulation on real tiny models: profile -> numerics, fp16 cast, saturation hooks, W8A8 activations."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from crosschip.errors import CrosschipError
from crosschip.verify.emulate import (
    Emulation,
    apply_emulation,
    emulation_for,
    fake_quant_int8_per_token,
    saturate_,
)

FP16_MAX = 65504.0


@pytest.mark.parametrize(
    ("profile", "dtype", "saturate"),
    [
        ("ascend-310p", torch.float16, True),  # no bf16 on 310P; saturation mode
        ("ascend-910b", torch.bfloat16, False),
        ("ascend-910c", torch.bfloat16, False),
        ("nvidia-h100", torch.bfloat16, False),
        ("cpu", torch.float32, False),
    ],
)
def test_emulation_follows_the_profile(profile: str, dtype: torch.dtype, saturate: bool) -> None:
    emu = emulation_for(profile, None)
    assert (emu.profile, emu.dtype, emu.saturate, emu.act_quant) == (profile, dtype, saturate, None)
    assert emu.to_dict()["emulated"] is True


def test_w8a8_dynamic_quantizes_activations_and_w8a16_does_not() -> None:
    assert emulation_for("ascend-910b", "int8-w8a8-dynamic").act_quant == "int8-dynamic"
    assert emulation_for("ascend-910b", "int8-w8a16").act_quant is None
    assert emulation_for("ascend-310p", "bf16").dtype == torch.float16  # a float checkpoint is cast


def test_unknown_profile_names_the_available_ones() -> None:
    with pytest.raises(CrosschipError) as err:
        emulation_for("ascend-999", None)
    assert "ascend-310p" in str(err.value) and "nvidia-h100" in str(err.value)


@pytest.mark.parametrize(("profile", "fmt"), [("ascend-310p", "fp8-block"), ("ascend-910b", "int3")])
def test_unservable_or_unknown_weight_format_is_refused(profile: str, fmt: str) -> None:
    with pytest.raises(CrosschipError):
        emulation_for(profile, fmt)


def test_saturate_maps_ieee_specials_to_the_range() -> None:
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.5], dtype=torch.float16)
    assert saturate_(x).tolist() == [0.0, FP16_MAX, -FP16_MAX, 1.5]


def _overflowing_mlp(model: Any) -> nn.Module:
    """Layer 0's MLP set so its down_proj output is 128 * 4096 = 524288 > 65504 from a finite input."""
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight.fill_(0.01)
        mlp.up_proj.weight.fill_(0.01)
        mlp.down_proj.weight.fill_(1.0)
    return mlp


def test_310p_casts_to_fp16_and_saturates_until_removed(make_model: Any) -> None:
    model = make_model("tiny")
    mlp = _overflowing_mlp(model)
    handle = apply_emulation(model, emulation_for("ascend-310p", None))
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    x = torch.full((1, 2, model.config.hidden_size), 100.0, dtype=torch.float16)  # finite in fp16
    with torch.inference_mode():
        out = mlp(x)
    assert torch.isfinite(out).all() and out.max().item() == FP16_MAX
    handle.remove()
    with torch.inference_mode():
        assert not torch.isfinite(mlp(x)).all()  # plain IEEE fp16 overflows once the hooks are gone


def test_310p_forward_stays_finite_where_ieee_fp16_does_not(make_model: Any) -> None:
    model = make_model("tiny")
    mlp = model.model.layers[1].mlp
    with torch.no_grad():  # layer 1's MLP output grows ~3e7x: ~2.5e5 for this input, finite in fp32
        mlp.up_proj.weight *= 1000
        mlp.down_proj.weight *= 30000
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    peak: list[float] = []
    hook = mlp.register_forward_hook(lambda _m, _a, out: peak.append(out.abs().max().item()))
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    hook.remove()
    assert peak[0] > FP16_MAX  # the premise: fp16 cannot hold this activation
    handle = apply_emulation(model, emulation_for("ascend-310p", None))
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=ids).logits).all()  # saturated layer by layer
    handle.remove()
    with torch.inference_mode():
        assert not torch.isfinite(model(input_ids=ids).logits).all()


def test_weights_beyond_fp16_range_are_clamped_not_inf(make_model: Any) -> None:
    model = make_model("tiny")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 1e6
    handle = apply_emulation(model, emulation_for("ascend-310p", None))
    assert handle.clamped_values == 1
    assert model.model.layers[1].mlp.down_proj.weight[0, 0].item() == FP16_MAX
    handle.remove()


def test_fake_quant_puts_each_row_on_its_int8_grid() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=gen)
    x[1, 2] = 0.0  # an all-zero token stays zero
    q = fake_quant_int8_per_token(x)
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    grid = torch.where(scale > 0, q / torch.where(scale > 0, scale, 1), 0)
    assert torch.allclose(grid, grid.round(), atol=1e-4) and grid.abs().max() <= 127 + 1e-4
    assert torch.equal(q[1, 2], torch.zeros(16)) and not torch.equal(q, x)
    assert (q - x).abs().max() <= scale.max() / 2 + 1e-6  # round to nearest: half a step at most


def _inputs_of(linear: nn.Module, model: Any, ids: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = linear.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    with torch.inference_mode():
        model(input_ids=ids)
    handle.remove()
    return seen[0]


def test_act_quant_hook_feeds_linears_int8_activations(make_model: Any) -> None:
    model = make_model("tiny")
    down = model.model.layers[0].mlp.down_proj
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    plain = _inputs_of(down, model, ids)  # [1, T, I]
    handle = apply_emulation(model, Emulation("cpu", torch.float32, saturate=False, act_quant="int8-dynamic"))
    quantized = _inputs_of(down, model, ids)  # registered after the emulation hook: sees its output
    scale = quantized.abs().amax(dim=-1, keepdim=True) / 127
    grid = quantized / scale
    assert torch.allclose(grid, grid.round(), atol=1e-3) and not torch.allclose(quantized, plain)
    handle.remove()
    assert torch.equal(_inputs_of(down, model, ids), plain)


def test_apply_emulation_needs_a_decoder_stack() -> None:
    with pytest.raises(CrosschipError, match="model.layers"):
        apply_emulation(nn.Linear(2, 2), emulation_for("cpu", None))
