"""Layer localization: find the first decoder layer whose own numerical error breaks its gate.

Both sides run in-process. Per decoder layer i there are three comparison points, in this order:
"layers.{i}.self_attn" (the attention output), "layers.{i}.mlp" and "layers.{i}" (the layer's output
hidden states). Each point gets msprobe-style statistics (cosine, MaxAbsErr, MaxRelErr and the
One/Five-Thousandth Err Ratios: msprobe `core/compare/npy_compare.py`) plus the gated quantity,
rel_rmse = ||t - r||_2 / ||r||_2.

Two modes:

- accumulated: the target's own forward pass; each point carries all error inherited from below.
- isolated: each target layer is fed the *reference's* input to that layer (the golden-input idea of
  Polygraphy `debug reduce` and TransformerLens' per-component checks), so its own error is separated
  from what it inherited. Attention needs the whole prefix, so token positions cannot be subsampled;
  instead the first ceil(sample_positions / T) whole sequences (rows) are replayed: a layer's own
  error is a property of its numerics, so a fixed sample measures it at a fixed cost.
  Isolation is per decoder layer: inside layer i the MLP sees the target's own attention result.

Gates come from a noise floor measured on the same inputs (parity-tools.md section 6, item 2): each
reference layer is replayed in fp64 on the same rows, and the fp32-vs-fp64 rel_rmse of a point,
scaled from fp32's unit roundoff to the target precision's, is that point's expected error. Like
torch dynamo's `same()` (RMSE(compiled, fp64) <= m * RMSE(eager, fp64)), a point fails when its
error exceeds `margin` times that expectation (or `margin` times the target's unit roundoff,
whichever is larger). The verdict (first_failing) uses the isolated errors; accumulated errors grow
with depth and are reported as first_failing_accumulated.

MoE layers (a router at mlp.gate returning top-k ids and weights, as DeepseekV3's): replays follow the
reference's routing, because a near-tie expert choice flipped by rounding is a discrete jump, not the
layer's own error; the share of tokens whose expert set differs is reported as `rerouted`.

Cost: one hooked reference forward, one hooked target forward (its logits are returned so callers
need no extra pass), then per layer one target call and one fp64 reference call on the replayed rows.
Statistics are computed on the CPU, in float64 where a side is float64 (the noise floor), else float32.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from crosschip.errors import CrosschipError
from crosschip.verify.emulate import decoder_layers
from crosschip.verify.layer_stats import (  # noqa: F401 - re-exported: the public layer API
    ASSUMED_NOISE_ULPS,
    DEFAULT_MARGIN,
    GOLDEN_MARGIN,
    UNIT_ROUNDOFF,
    PointStats,
    StatsAccumulator,
    gate_for,
    unit_roundoff,
)


@dataclass(frozen=True)
class Point:
    """One comparison point: attr is the submodule of decoder layer `index` ("" = the layer itself)."""

    name: str
    kind: str
    index: int
    attr: str


def layer_points(num_layers: int) -> list[Point]:
    """Points in report order: attn, mlp, layer for each decoder layer."""
    specs = ((".self_attn", "attn", "self_attn"), (".mlp", "mlp", "mlp"), ("", "layer", ""))
    return [Point(f"layers.{i}{suffix}", kind, i, attr) for i in range(num_layers) for suffix, kind, attr in specs]


@dataclass
class LayerResult:
    """Per-point report plus both sides' final logits (float32 CPU [B, T, V] per batch)."""

    points: list[dict[str, Any]]
    first_failing: str | None  # first point whose isolated (else accumulated) rel_rmse breaks its gate
    first_failing_accumulated: str | None
    ref_logits: list[torch.Tensor]
    tgt_logits: list[torch.Tensor]
    isolated_rows: int  # total sequences replayed in isolated mode (0 when disabled)
    noise_floor: bool  # whether gates come from a measured fp64 noise floor
    noise_floor_rows: int = 0  # sequences the noise floor was measured on (first batches, ~sample_positions tokens)
    golden_logits: list[torch.Tensor] | None = None  # the golden reference conversion's logits, when given
    gate_basis: str = "unit roundoff"  # "golden": gates from the reference conversion's own errors
    routing: list[dict[str, Any]] = field(default_factory=list)  # per MoE layer: tokens re-routed (own forwards)

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": self.points,
            "first_failing": self.first_failing,
            "first_failing_accumulated": self.first_failing_accumulated,
            "isolated_rows": self.isolated_rows,
            "noise_floor": self.noise_floor,
            "noise_floor_rows": self.noise_floor_rows,
            "gate_basis": self.gate_basis,
            "routing": self.routing,
        }


# ---------------------------------------------------------------- tensor plumbing


def _first_tensor(output: Any) -> torch.Tensor:
    """A point's output: HF attention returns (output, weights); layers and MLPs return a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise CrosschipError(
        f"a decoder submodule returned {type(output).__name__}, not a tensor",
        "use a Hugging Face decoder whose layers, attention and MLP return tensors",
    )


def _map_tensors(obj: Any, fn: Any) -> Any:
    """Apply fn to every tensor inside nested tuples / lists / dicts; other values pass through."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _rows(obj: Any, batch: int, n: int) -> Any:
    """The first n rows of every batch-major tensor (ndim >= 2, dim 0 == batch) in obj."""
    if n >= batch:
        return obj
    return _map_tensors(obj, lambda x: x[:n] if x.dim() >= 2 and x.shape[0] == batch else x)


def _cast_floats(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Floating tensors to (device, dtype); masks and ids only move device."""
    return _map_tensors(obj, lambda x: x.to(device, dtype) if x.is_floating_point() else x.to(device))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _submodule(layer: nn.Module, point: Point) -> nn.Module:
    return layer if not point.attr else getattr(layer, point.attr)


@dataclass
class _LayerCall:
    """What one decoder layer received in a forward: hidden states (or its dtype) and keyword args."""

    hidden: torch.Tensor | None  # reference only: [n, T, D] on the reference device
    positional: bool  # hidden states came as args[0] (else kwargs["hidden_states"])
    kwargs: dict[str, Any]
    dtype: torch.dtype


@dataclass
class _Batch:
    """What isolated mode needs from one batch, kept after every forward has run."""

    calls: dict[str, list[Any]] = field(default_factory=dict)  # "ref" / candidate name -> per-layer _LayerCall
    ref_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # point -> float64 CPU [n, T, D]
    ref_route: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # MoE top-k [n*T, k]
    noise: bool = False  # part of the noise-floor sample
    iso: bool = False  # part of the isolated-mode sample


@dataclass
class _Candidate:
    """A model compared with the reference (the target, or the golden reference conversion) and its sums."""

    name: str
    model: nn.Module
    layers: nn.ModuleList
    points: list[Point]
    acc: dict[str, StatsAccumulator] = field(default_factory=dict)
    iso: dict[str, StatsAccumulator] = field(default_factory=dict)
    route_acc: dict[int, list[int]] = field(default_factory=dict)  # layer -> [tokens, tokens re-routed]
    route_iso: dict[int, list[int]] = field(default_factory=dict)
    logits: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.acc = {p.name: StatsAccumulator() for p in self.points}
        self.iso = {p.name: StatsAccumulator() for p in self.points}

    def stats(self, point: Point, isolated: bool) -> PointStats:
        stats = (self.iso if isolated else self.acc)[point.name].stats()
        counts = (self.route_iso if isolated else self.route_acc).get(point.index)
        if point.kind == "mlp" and counts and counts[0]:
            stats.rerouted = counts[1] / counts[0]
        return stats


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


def _router_of(layer: nn.Module) -> nn.Module | None:
    """The MoE router of a decoder layer (mlp.gate, as in DeepseekV3), if it is a module of its own."""
    gate = getattr(getattr(layer, "mlp", None), "gate", None)
    return gate if isinstance(gate, nn.Module) and not isinstance(gate, nn.Linear) else None


def _routing(output: Any) -> tuple[int, int] | None:
    """Positions of (top-k expert ids, their weights) in a router's output tuple; None if it is not one.

    DeepseekV3TopkRouter returns (router_logits [N, E], topk_weights [N, k], topk_indices [N, k]).
    """
    if not isinstance(output, tuple):
        return None
    tensors = [(k, x) for k, x in enumerate(output) if isinstance(x, torch.Tensor) and x.dim() == 2]
    ids = [(k, x) for k, x in tensors if not x.is_floating_point()]
    if len(ids) != 1:
        return None
    weights = [k for k, x in tensors if x.is_floating_point() and x.shape == ids[0][1].shape]
    return (ids[0][0], weights[0]) if len(weights) == 1 else None


def _count_reroutes(counts: dict[int, list[int]], i: int, tgt_ids: torch.Tensor, ref_ids: torch.Tensor) -> None:
    """Add the tokens of layer i whose set of chosen experts differs between the sides."""
    if tgt_ids.shape != ref_ids.shape:
        return
    t = tgt_ids.detach().cpu().sort(dim=-1).values  # [N, k]
    r = ref_ids.detach().cpu().sort(dim=-1).values
    total = counts.setdefault(i, [0, 0])
    total[0] += t.shape[0]
    total[1] += int((t != r).any(dim=-1).sum())


def _force_routing(
    output: tuple[Any, ...], pos: tuple[int, int], ids: torch.Tensor, weights: torch.Tensor
) -> tuple[Any, ...]:
    """The router output with the reference's expert ids and weights (in the router's device / dtype)."""
    out = list(output)
    out[pos[0]] = ids.to(output[pos[0]].device)
    out[pos[1]] = weights.to(output[pos[1]].device, output[pos[1]].dtype)
    return tuple(out)


def _call_layer(layer: nn.Module, call: _LayerCall, hidden: torch.Tensor) -> None:
    kwargs = dict(call.kwargs)
    if call.positional:
        layer(hidden, **kwargs)
    else:
        kwargs["hidden_states"] = hidden
        layer(**kwargs)


def _fp64_twin(layer: nn.Module, device: torch.device) -> nn.Module:
    """An fp64 copy of a decoder layer for the noise floor (the reference model is left untouched).

    It stays on the reference's device where fp64 is dependable (CPU, CUDA), else goes to the CPU.
    """
    device = device if device.type in ("cpu", "cuda") else torch.device("cpu")
    with torch.inference_mode(False), torch.no_grad():  # parameters cannot be copied as inference tensors
        twin = copy.deepcopy(layer).to(device, torch.float64)
    for module in twin.modules():
        config = getattr(module, "config", None)
        # Fused MoE kernels (grouped_mm) take no fp64; the copy's own config gets the eager expert loop.
        if getattr(config, "_experts_implementation", None) not in (None, "eager"):
            config._experts_implementation = "eager"  # noqa: SLF001 - transformers' documented switch
    return twin


_DTYPE_UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _check_stack(ref_layers: nn.ModuleList, other: nn.ModuleList, name: str) -> None:
    if len(ref_layers) != len(other):
        raise CrosschipError(
            f"reference has {len(ref_layers)} decoder layers, {name} {len(other)}",
            "compare two checkpoints of the same architecture",
        )
    for layer in (*ref_layers[:1], *other[:1]):
        if not all(isinstance(getattr(layer, a, None), nn.Module) for a in ("self_attn", "mlp")):
            raise CrosschipError(
                f"{type(layer).__name__} has no self_attn and mlp submodules to compare",
                "use a Hugging Face decoder with Llama-style layers (Llama, DeepseekV3, Qwen, Mistral)",
            )


class _Localizer:
    """Runs the hooked forwards and isolated replays of one localize() call and holds their sums."""

    def __init__(self, ref: nn.Module, candidates: dict[str, nn.Module], sample_positions: int, isolated: bool,
                 noise_floor: bool) -> None:
        self.ref = ref
        self.ref_layers = decoder_layers(ref)
        self.points = layer_points(len(self.ref_layers))
        self.cands = []
        for name, model in candidates.items():
            layers = decoder_layers(model)
            _check_stack(self.ref_layers, layers, name)
            self.cands.append(_Candidate(name, model, layers, self.points))
        self.sample_positions, self.isolated, self.noise_floor = sample_positions, isolated, noise_floor
        self.noise = {p.name: StatsAccumulator() for p in self.points}
        self.batches: list[_Batch] = []
        self.ref_logits: list[torch.Tensor] = []
        self.rows = 0  # rows replayed in isolated mode
        self.noise_rows = 0
        self.noise_tokens = 0

    # ---- hooks

    def _capture_calls(self, layers: nn.ModuleList, calls: list[Any], batch: int, n: int, keep_hidden: bool) -> list:
        calls.extend([None] * len(layers))

        def make(i: int) -> Any:
            def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, D]
                kept = None
                if keep_hidden:
                    kept = _rows(hidden, batch, n)
                    kept = kept.detach().clone() if n < batch else kept.detach()  # free the full batch later
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                calls[i] = _LayerCall(kept, bool(args), _rows(rest, batch, n), hidden.dtype)

            return pre

        return [layer.register_forward_pre_hook(make(i), with_kwargs=True) for i, layer in enumerate(layers)]

    def _hook_points(self, layers: nn.ModuleList, points: list[Point], fn: Any) -> list[RemovableHandle]:
        def make(point: Point) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                fn(point, _first_tensor(output))

            return hook

        return [_submodule(layers[p.index], p).register_forward_hook(make(p)) for p in points]

    @staticmethod
    def _hook_routers(layers: nn.ModuleList, indices: list[int], fn: Any) -> list[RemovableHandle]:
        """fn(i, output, positions) on each MoE router of the given layers; it may return a new output."""

        def make(i: int) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
                positions = _routing(output)
                return None if positions is None else fn(i, output, positions)

            return hook

        routers = [(i, _router_of(layers[i])) for i in indices]
        return [router.register_forward_hook(make(i)) for i, router in routers if router is not None]

    # ---- phase 1: one reference forward and one forward per candidate, per batch

    def run_batch(self, ids: torch.Tensor) -> None:
        batch_size, seq_len = ids.shape
        n = min(batch_size, max(1, math.ceil(self.sample_positions / seq_len)))
        # A layer's own error and the noise floor are properties of its numerics, not of the text:
        # both stop once sample_positions tokens are measured, so replays cost a fixed ~sample_positions
        # tokens per layer however many batches the comparison has.
        batch = _Batch(noise=self.noise_floor and self.noise_tokens < self.sample_positions,
                       iso=self.isolated and self.rows * seq_len < self.sample_positions)
        keep = batch.iso or batch.noise  # replays need the reference's per-layer inputs
        ref_full: dict[Any, torch.Tensor] = {}  # point name or layer index (routing) -> reference output

        def store_ref(point: Point, out: torch.Tensor) -> None:
            r = out.detach().to("cpu", copy=True)  # [B, T, D] in its own dtype; safe from later in-place ops
            ref_full[point.name] = r
            if keep:  # the replays compare in float64 (the noise floor is ~1e-7 relative)
                batch.ref_rows[point.name] = r[:n].to(torch.float64)

        def store_route(i: int, output: tuple[Any, ...], pos: tuple[int, int]) -> None:
            idx, weights = output[pos[0]], output[pos[1]]  # [B * T, k]: tokens flattened row-major
            ref_full[i] = idx.detach().cpu()
            if keep and idx.shape[0] == batch_size * seq_len:
                batch.ref_route[i] = (idx[: n * seq_len].clone(), weights[: n * seq_len].clone())

        every = list(range(len(self.ref_layers)))
        batch.calls["ref"] = []
        handles = self._capture_calls(self.ref_layers, batch.calls["ref"], batch_size, n, keep)
        handles += self._hook_points(self.ref_layers, self.points, store_ref)
        handles += self._hook_routers(self.ref_layers, every, store_route)
        self.ref_logits.append(self._forward(self.ref, ids, handles))
        for cand in self.cands:
            batch.calls[cand.name] = []
            handles = self._capture_calls(cand.layers, batch.calls[cand.name], batch_size, n, False)
            handles += self._hook_points(cand.layers, self.points, self._comparer(cand, ref_full))
            handles += self._hook_routers(cand.layers, every, self._route_comparer(cand, ref_full))
            cand.logits.append(self._forward(cand.model, ids, handles))
        if keep:
            self.batches.append(batch)
        self.rows += n if batch.iso else 0
        if batch.noise:
            self.noise_rows += n
            self.noise_tokens += n * seq_len

    @staticmethod
    def _comparer(cand: _Candidate, ref_full: dict[Any, torch.Tensor]) -> Any:
        def compare(point: Point, out: torch.Tensor) -> None:
            if point.name not in ref_full:
                raise CrosschipError(f"{point.name} did not run on the reference", "compare one architecture")
            cand.acc[point.name].update(out, ref_full[point.name])

        return compare

    @staticmethod
    def _route_comparer(cand: _Candidate, ref_full: dict[Any, torch.Tensor]) -> Any:
        def compare(i: int, output: tuple[Any, ...], pos: tuple[int, int]) -> None:
            if i in ref_full:
                _count_reroutes(cand.route_acc, i, output[pos[0]], ref_full[i])

        return compare

    @staticmethod
    def _forward(model: nn.Module, ids: torch.Tensor, handles: list[RemovableHandle]) -> torch.Tensor:
        try:
            logits = model(input_ids=ids.to(_device_of(model)), use_cache=False).logits  # [B, T, V]
        finally:
            _remove(handles)
        return logits.detach().to("cpu", torch.float32)

    # ---- phase 2: per layer, isolated replays of every candidate and the fp64 noise floor

    def run_replays(self) -> None:
        for i in range(len(self.ref_layers)):
            points = [p for p in self.points if p.index == i]
            if self.isolated:
                for cand in self.cands:
                    self._replay_candidate(i, points, cand, [b for b in self.batches if b.iso])
            if self.noise_floor:
                twin = nn.ModuleList([_fp64_twin(self.ref_layers[i], _device_of(self.ref))])
                self._replay_noise(i, points, twin, [b for b in self.batches if b.noise])
                del twin
            for batch in self.batches:  # layer i is done: free its stored inputs and outputs
                for calls in batch.calls.values():
                    calls[i] = None
                batch.ref_route.pop(i, None)
                for p in points:
                    batch.ref_rows.pop(p.name, None)

    def _replay_candidate(self, i: int, points: list[Point], cand: _Candidate, batches: list[_Batch]) -> None:
        """Candidate layer i on the reference's input (with its own kwargs: rotary tables, mask in its dtype)."""

        def call_of(batch: _Batch) -> tuple[_LayerCall, torch.dtype]:
            call = batch.calls[cand.name][i]
            return call, call.dtype

        def update(point: Point, out: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
            cand.iso[point.name].update(out, rows[point.name])

        self._replay(i, points, cand.layers, i, batches, call_of, update, cand.route_iso)

    def _replay_noise(self, i: int, points: list[Point], twin: nn.ModuleList, batches: list[_Batch]) -> None:
        """The fp64 twin of reference layer i on the same input: t = fp32 reference, r = fp64 golden."""
        device = _device_of(twin)

        def call_of(batch: _Batch) -> tuple[_LayerCall, torch.dtype]:
            ref_call = batch.calls["ref"][i]
            kwargs = _cast_floats(ref_call.kwargs, device, torch.float64)
            return _LayerCall(None, ref_call.positional, kwargs, torch.float64), torch.float64

        def update(point: Point, out: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
            self.noise[point.name].update(rows[point.name], out)

        local = [Point(p.name, p.kind, 0, p.attr) for p in points]
        self._replay(i, local, twin, 0, batches, call_of, update, None)

    def _replay(self, i: int, points: list[Point], layers: nn.ModuleList, k: int, batches: list[_Batch],
                call_of: Any, update: Any, reroutes: dict[int, list[int]] | None) -> None:
        """Call layers[k] on the reference's input to decoder layer i, batch by batch, and compare its points.

        Every replay follows the reference's MoE routing, so a near-tie expert choice flipped by rounding
        (counted in `reroutes`) does not masquerade as the layer's own error.
        """
        layer, device = layers[k], _device_of(layers[k])
        for batch in batches:
            ref_call = batch.calls["ref"][i]
            call, dtype = call_of(batch)

            def compare(point: Point, out: torch.Tensor, rows: dict[str, torch.Tensor] = batch.ref_rows) -> None:
                update(point, out, rows)

            def force(_k: int, output: tuple[Any, ...], pos: tuple[int, int], route: Any = batch.ref_route) -> Any:
                if i not in route or route[i][0].shape != output[pos[0]].shape:
                    return None
                if reroutes is not None:
                    _count_reroutes(reroutes, i, output[pos[0]], route[i][0])
                return _force_routing(output, pos, *route[i])

            handles = self._hook_points(layers, points, compare) + self._hook_routers(layers, [k], force)
            try:
                _call_layer(layer, call, ref_call.hidden.to(device, dtype))
            finally:
                _remove(handles)

    # ---- verdicts

    def result(self, margin: float, tgt_precision: str, compute_precision: str | None,
               golden_margin: float) -> LayerResult:
        u_ref = _DTYPE_UNIT.get(next(self.ref.parameters()).dtype, UNIT_ROUNDOFF["fp32"])
        target = self.cands[0]
        golden = self.cands[1] if len(self.cands) > 1 else None
        rows, first, first_acc = [], None, None
        for p in self.points:
            acc = target.stats(p, isolated=False)
            iso = target.stats(p, isolated=True) if self.isolated else None
            noise = self.noise[p.name].stats().rel_rmse if self.noise_floor else None
            if noise is not None and not math.isfinite(noise):
                noise = None  # a broken fp64 replay must not open the gate
            row: dict[str, Any] = {"name": p.name, "kind": p.kind, "index": p.index, "accumulated": acc.to_dict(),
                                   "isolated": None if iso is None else iso.to_dict(), "noise_floor": noise}
            if golden is None:
                gate = gate_acc = gate_for(noise, tgt_precision, margin, ref_unit=u_ref)
            else:
                g_acc = golden.stats(p, isolated=False)
                g_iso = golden.stats(p, isolated=True) if self.isolated else None
                fp_gate = gate_for(noise, compute_precision or tgt_precision, margin, ref_unit=u_ref)
                gate = golden_gate(g_iso if g_iso is not None else g_acc, fp_gate, golden_margin)
                gate_acc = golden_gate(g_acc, fp_gate, golden_margin)
                row["golden"] = {"accumulated": g_acc.to_dict(), "isolated": None if g_iso is None else g_iso.to_dict()}
            own = iso if iso is not None else acc
            passed = not own.rel_rmse > gate
            if not passed and first is None:
                first = p.name
            if acc.rel_rmse > gate_acc and first_acc is None:
                first_acc = p.name
            rows.append({**row, "gate": gate, "gate_accumulated": gate_acc, "passed": passed})
        return LayerResult(
            rows, first, first_acc, self.ref_logits, target.logits, self.rows, self.noise_floor, self.noise_rows,
            golden_logits=golden.logits if golden is not None else None,
            gate_basis="golden" if golden is not None else "unit roundoff",
            routing=self._routing_summary(),
        )

    def _routing_summary(self) -> list[dict[str, Any]]:
        """Per MoE layer, the share of tokens whose expert set differs from the reference's (own forwards)."""
        out = []
        target = self.cands[0]
        for i, (tokens, flipped) in sorted(target.route_acc.items()):
            row: dict[str, Any] = {"layer": i, "tokens": tokens, "flipped": flipped / tokens if tokens else 0.0}
            for cand in self.cands[1:]:
                g = cand.route_acc.get(i)
                row[f"{cand.name}_flipped"] = g[1] / g[0] if g and g[0] else None
            out.append(row)
        return out


def golden_gate(golden: PointStats, fp_gate: float, golden_margin: float) -> float:
    """A point's gate with a golden conversion: golden_margin x the golden's own error at that point, never
    below the floating-point gate of the target's compute dtype. A non-finite golden error (the reference
    conversion itself overflowed) falls back to the floating-point gate."""
    err = golden.rel_rmse
    return max(golden_margin * err, fp_gate) if math.isfinite(err) else fp_gate


def localize(
    ref_model: nn.Module,
    tgt_model: nn.Module,
    batches: list[torch.Tensor],
    *,
    golden: nn.Module | None = None,
    isolated: bool = True,
    noise_floor: bool = True,
    sample_positions: int = 128,
    margin: float = DEFAULT_MARGIN,
    golden_margin: float = GOLDEN_MARGIN,
    tgt_precision: str = "bf16",
    compute_precision: str | None = None,
) -> LayerResult:
    """Compare every decoder layer's attention, MLP and output between two in-process models.

    batches: int64 input_ids [B, T], fed to every model (moved to each model's device). Each model
    runs one hooked forward per batch (their logits are returned, float32 CPU [B, T, V]); isolated
    mode and the noise floor replay each layer on the first ceil(sample_positions / T) rows (at
    least 1): whole sequences, because attention needs the full prefix. tgt_precision names the
    target's numerics class ("fp32", "bf16", "fp16", "int8", "fp8") and sets its gates when there is no
    golden. golden: the reference converted into the target's format and run with the target's numerics;
    then each point's gate is golden_margin x the golden's own error there, and never below the
    floating-point gate of compute_precision (the target's compute dtype class).
    """
    unit_roundoff(tgt_precision)  # validate before any forward pass
    if compute_precision is not None:
        unit_roundoff(compute_precision)
    if not batches:
        raise CrosschipError("no input batches to localize on", "pass at least one [B, T] batch of token ids")
    for ids in batches:
        if ids.dim() != 2 or ids.dtype != torch.int64 or ids.numel() == 0:
            raise CrosschipError(
                f"input batch has shape {tuple(ids.shape)} and dtype {ids.dtype}", "pass int64 input_ids [B, T]"
            )
    if sample_positions < 1 or margin <= 0 or golden_margin <= 0:
        raise CrosschipError(
            f"sample_positions={sample_positions}, margin={margin}, golden_margin={golden_margin}",
            "use sample_positions >= 1 and margins > 0",
        )
    candidates = {"target": tgt_model} | ({"golden": golden} if golden is not None else {})
    run = _Localizer(ref_model, candidates, sample_positions, isolated, noise_floor)
    models = [ref_model, *candidates.values()]
    modes = [m.training for m in models]
    try:
        with torch.inference_mode():
            for m in models:
                m.eval()
            for ids in batches:
                run.run_batch(ids)
            run.run_replays()
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    return run.result(margin, tgt_precision, compute_precision, golden_margin)
