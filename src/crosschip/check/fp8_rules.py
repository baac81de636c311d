"""vLLM's FP8 block-shape load rule, applied to checkpoint tensors before any engine sees them.

vLLM refuses an FP8 block-quantized Linear whose tensor-parallel partitions do not line up with the
weight blocks (`validate_fp8_block_shape` in vllm/model_executor/layers/quantization/utils/fp8_utils.py,
called from `Fp8LinearMethod.create_weights` in quantization/fp8.py; SGLang carries the same function):

  - row-parallel layers split over tp > 1 ranks: input_size_per_partition % block_k == 0;
  - column-parallel layers split over tp > 1 ranks, and merged layers at any tp: every output
    partition % block_n == 0 -- except, for a merged layer at tp = 1, the last sub-matrix.

Fused MoE experts have their own check (`validate_fp8_block_shape_moe`): the per-rank intermediate
size % block_n == 0 always, and % block_k == 0 when tp > 1.

Newer vLLM (0.32.0; since PR #30836) skips the check for a merged layer whose partitions do not divide
(`ColumnParallelLinear._maybe_allow_fp8_block_shape_mismatch`, layers/linear.py), but such a layer
still does not work: its scale tensor has ceil(sum(partitions) / block_n) rows while the checkpoint's
per-matrix scales have sum(ceil(partition / block_n)) (gate/up 688: 11 rows, and vLLM 0.32.0 fails loading
up_proj's scale with "start (6) + length (6) exceeds dimension size (11)"), and
where the counts happen to agree a block straddling two sub-matrices gets one of their two scales.
So crosschip keeps the rule as written.

Which checkpoint tensors form which vLLM layer, and how it is split, follows vLLM's model files:
  models/llama.py (also Qwen2, Mistral):  q/k/v_proj -> QKVParallelLinear `qkv_proj` (merged; under
      tp the KV heads split, or are replicated one per rank when tp >= num_key_value_heads);
      gate/up_proj -> MergedColumnParallelLinear `gate_up_proj`; o_proj, down_proj -> RowParallelLinear.
  models/deepseek_v2.py (DeepSeek-V2/V3 MLA + MoE): q_a_proj + kv_a_proj_with_mqa ->
      `fused_qkv_a_proj` (merged, disable_tp: never split); kv_a_proj_with_mqa alone -> ReplicatedLinear;
      q_proj, q_b_proj, kv_b_proj -> ColumnParallelLinear; o_proj -> RowParallelLinear; the dense MLP and
      `shared_experts` as Llama's MLP; routed `experts.N.*` -> FusedMoE (validate_fp8_block_shape_moe).
Quantized tensors outside these patterns are reported as unclassified, with no rule applied.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RULE = "vLLM validate_fp8_block_shape, quantization/utils/fp8_utils.py"
MOE_RULE = "vLLM validate_fp8_block_shape_moe, quantization/utils/fp8_utils.py"
_WEIGHT_RE = re.compile(r"^(?P<prefix>.+)\.(?P<proj>[a-z_]+)\.weight$")
_EXPERT_RE = re.compile(r"^(?P<layer>.+\.mlp)\.experts\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_MLA_COLUMN = ("q_b_proj", "kv_b_proj")


@dataclass(frozen=True)
class VllmLayer:
    """A Linear as vLLM builds it from one or more checkpoint weights."""

    name: str  # e.g. model.layers.0.mlp.gate_up_proj
    kind: str  # "merged", "qkv", "column", "row", "replicated", "moe"
    members: tuple[str, ...]  # checkpoint weight names, in vLLM's partition order
    out_sizes: tuple[int, ...]  # logical output size of each member
    in_size: int
    never_split: bool = False  # disable_tp=True in vLLM (DeepSeek's fused_qkv_a_proj)


@dataclass(frozen=True)
class Violation:
    """One partition that breaks the rule: which tensor, which dimension, which rule, under which tp."""

    tensor: str
    layer: str
    dim: str  # "output" or "input"
    size: int  # the per-rank partition size (or the undivisible full size)
    multiple: int  # what it must be a multiple of
    tp: int
    rule: str

    def message(self, rule: bool = True) -> str:
        """One line: tensor, dimension, sizes and (unless rule=False) the rule."""
        why = f" ({self.rule})" if rule else ""
        if self.multiple > 1:
            return (f"{self.tensor}: {self.dim} partition {self.size} of {self.layer} at tp={self.tp} is not a "
                    f"multiple of the FP8 block {self.multiple}{why}")
        return f"{self.tensor}: {self.dim} {self.size} of {self.layer} is not divisible by tp={self.tp}{why}"

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "layer": self.layer, "dim": self.dim, "size": self.size,
                "multiple": self.multiple, "tp": self.tp, "rule": self.rule}


def _heads(config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    return (heads, kv) if isinstance(heads, int) and isinstance(kv, int) else (None, None)


def _group(shapes: Mapping[str, tuple[int, ...]], prefix: str, projs: tuple[str, ...], name: str, kind: str,
           **kw: Any) -> VllmLayer:
    members = tuple(f"{prefix}.{p}.weight" for p in projs)
    return VllmLayer(f"{prefix}.{name}", kind, members, tuple(shapes[m][0] for m in members),
                     shapes[members[0]][1], **kw)


def vllm_layers(shapes: Mapping[str, tuple[int, ...]]) -> tuple[list[VllmLayer], list[str]]:
    """Group quantized 2-D weights (name -> [out, in]) into the Linear layers vLLM builds; and the rest."""
    by_prefix: dict[str, dict[str, str]] = {}
    experts: dict[str, list[str]] = {}
    unclassified = []
    for name, shape in shapes.items():
        expert = _EXPERT_RE.match(name)
        if expert:
            experts.setdefault(expert["layer"], []).append(name)
            continue
        m = _WEIGHT_RE.match(name)
        if m is None or len(shape) != 2:
            unclassified.append(name)
            continue
        by_prefix.setdefault(m["prefix"], {})[m["proj"]] = name
    layers = [_moe_layer(layer, names, shapes) for layer, names in experts.items()]
    for prefix, projs in by_prefix.items():
        found, rest = _prefix_layers(prefix, projs, shapes)
        layers += found
        unclassified += rest
    return layers, sorted(unclassified)


def _moe_layer(layer: str, names: list[str], shapes: Mapping[str, tuple[int, ...]]) -> VllmLayer:
    """All routed experts of one MoE layer as one FusedMoE (intermediate size = gate_proj rows)."""
    gate = sorted(n for n in names if n.endswith(".gate_proj.weight"))
    first = gate[0] if gate else sorted(names)[0]
    inter = shapes[first][0] if gate else shapes[first][1]
    return VllmLayer(f"{layer}.experts", "moe", (first,), (inter,), shapes[first][1])


def _prefix_layers(prefix: str, projs: dict[str, str], shapes: Mapping[str, tuple[int, ...]]
                   ) -> tuple[list[VllmLayer], list[str]]:
    layers: list[VllmLayer] = []
    used: set[str] = set()

    def take(kind: str, group: tuple[str, ...], merged_name: str, **kw: Any) -> None:
        layers.append(_group(shapes, prefix, group, merged_name, kind, **kw))
        used.update(group)

    if {"q_proj", "k_proj", "v_proj"} <= set(projs):
        take("qkv", ("q_proj", "k_proj", "v_proj"), "qkv_proj")
    if {"q_a_proj", "kv_a_proj_with_mqa"} <= set(projs):
        take("merged", ("q_a_proj", "kv_a_proj_with_mqa"), "fused_qkv_a_proj", never_split=True)
    if {"gate_proj", "up_proj"} <= set(projs):
        take("merged", ("gate_proj", "up_proj"), "gate_up_proj")
    for proj, kind in (("o_proj", "row"), ("down_proj", "row"), ("kv_a_proj_with_mqa", "replicated"),
                       ("q_proj", "column"), *((p, "column") for p in _MLA_COLUMN)):
        if proj in projs and proj not in used:
            take(kind, (proj,), proj)
    return layers, [projs[p] for p in projs if p not in used]


def _split(size: int, tp: int) -> int | None:
    return size // tp if size % tp == 0 else None


def _undivided(layer: VllmLayer, index: int, dim: str, size: int, tp: int, cls: str) -> Violation:
    """vLLM's divide() asserts: a size that does not split evenly over the tp ranks."""
    return Violation(layer.members[index], layer.name, dim, size, 1, tp, f"vLLM {cls}, layers/linear.py")


def _qkv_partitions(layer: VllmLayer, tp: int, config: Mapping[str, Any]) -> list[int] | Violation:
    """Per-rank [q, k, v] sizes of QKVParallelLinear (KV heads replicated when tp >= their number)."""
    heads, kv_heads = _heads(config)
    q, k, v = layer.out_sizes
    if heads is None or kv_heads is None or q % heads or k % kv_heads or v % kv_heads:
        return [s // tp for s in layer.out_sizes]  # unusual config: an even split, vLLM's own fallback
    if heads % tp:
        return _undivided(layer, 0, "attention heads", heads, tp, "QKVParallelLinear")
    if (tp >= kv_heads and tp % kv_heads) or (tp < kv_heads and kv_heads % tp):
        return _undivided(layer, 1, "KV heads", kv_heads, tp, "QKVParallelLinear")
    per_rank = 1 if tp >= kv_heads else kv_heads // tp
    return [q // tp, per_rank * (k // kv_heads), per_rank * (v // kv_heads)]


def _moe_violations(layer: VllmLayer, tp: int, block_n: int, block_k: int) -> list[Violation]:
    inter = _split(layer.out_sizes[0], tp)
    if inter is None:
        return [Violation(layer.members[0], layer.name, "intermediate", layer.out_sizes[0], 1, tp, MOE_RULE)]
    out = [Violation(layer.members[0], layer.name, "output", inter, block_n, tp, MOE_RULE)] if inter % block_n else []
    if tp > 1 and inter % block_k:
        out.append(Violation(layer.members[0], layer.name, "input", inter, block_k, tp, MOE_RULE))
    return out


def _row_violations(layer: VllmLayer, tp: int, block_k: int) -> list[Violation]:
    part = _split(layer.in_size, tp)
    if part is None:
        return [_undivided(layer, 0, "input", layer.in_size, tp, "RowParallelLinear")]
    if tp > 1 and part % block_k:
        return [Violation(layer.members[0], layer.name, "input", part, block_k, tp, RULE)]
    return []


def _column_violations(layer: VllmLayer, tp: int, block_n: int, config: Mapping[str, Any]) -> list[Violation]:
    """Column-parallel, merged and QKV layers: every output partition under tp > 1; at tp = 1 (or never
    split) every sub-matrix of a merged layer but the last; a single unsplit matrix is never checked."""
    if layer.kind == "qkv":
        parts = _qkv_partitions(layer, tp, config)
        if isinstance(parts, Violation):
            return [parts]
    else:
        split = [_split(s, tp) for s in layer.out_sizes]
        if None in split:
            i = split.index(None)
            return [_undivided(layer, i, "output", layer.out_sizes[i], tp, "ColumnParallelLinear")]
        parts = [s for s in split if s is not None]
    checked = list(range(len(parts))) if tp > 1 else list(range(len(parts)))[:-1]
    return [Violation(layer.members[i], layer.name, "output", parts[i], block_n, tp, RULE)
            for i in checked if parts[i] % block_n]


def layer_violations(layer: VllmLayer, tp: int, block: tuple[int, int], config: Mapping[str, Any]
                     ) -> list[Violation]:
    """What vLLM's FP8 checks say about one layer at tensor parallelism `tp` (empty: it loads)."""
    block_n, block_k = block
    if layer.kind == "moe":
        return _moe_violations(layer, tp, block_n, block_k)
    if layer.kind == "row":
        return _row_violations(layer, tp, block_k)
    if layer.kind == "replicated":
        return []  # one whole matrix on every rank: nothing to line up
    return _column_violations(layer, 1 if layer.never_split else tp, block_n, config)


def fp8_violations(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any], tp: int,
                   block: tuple[int, int]) -> tuple[list[Violation], list[str]]:
    """Every violation of vLLM's FP8 block rules for these quantized weights at tp; and the unclassified."""
    layers, unclassified = vllm_layers(shapes)
    violations = [v for layer in layers for v in layer_violations(layer, tp, block, config)]
    return sorted(violations, key=lambda v: _natural(v.layer)), unclassified  # stable: partition order kept


def _natural(name: str) -> list[Any]:
    """Sort key that puts model.layers.2 before model.layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
