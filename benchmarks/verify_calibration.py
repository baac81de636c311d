"""Calibrate `crosschip verify`: plant faults in real conversions of trained models and check that every fault
fails (and is named at its layer), and that every correct conversion passes.

For each trained model (the `small` Llama and the `deepseek-small` MLA + MoE preset, trained here on the
stdlib docstring corpus unless given) and each format (INT8 W8A8 dynamic, FP8 128x128 blocks, fp16), it
converts the model with `crosschip convert`, then verifies against the trained checkpoint:
  correct    the conversion itself, a correct conversion by another method (INT8 MSE-clipped scales, FP8
             power-of-two scales), and fp16 under `--emulate ascend-310p` (fp16 compute, saturation);
  faults     scale x1.1 / x1.5 / x3 in one layer's down_proj (a MoE layer's experts for DeepSeek), x1.1 and x3
             in every layer's, one zeroed 128x128 block in one o_proj, two swapped rows in one layer's up_proj
             (every routed expert's for DeepSeek: a gate/up interleave bug), and a tokenizer that dropped BOS.
It prints one row per case: the verdict with the measured gates (golden noise floor), what caught it, the
first failing layer against the expected one, and what the old precision-class constants would have said
(recomputed from the same figures). The figures go in the README's calibration table.

    python benchmarks/verify_calibration.py --workdir DIR [--llama CKPT] [--deepseek CKPT] [--steps 300]
        [--formats int8-w8a8-dynamic,fp8-block,fp16] [--models llama,deepseek] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import log, machine, prepare_corpus, run_and_print
from crosschip import checkpoint
from crosschip.convert.pipeline import convert, resolve_options
from crosschip.errors import CrosschipError
from crosschip.verify import gates as G
from crosschip.verify.faults import Fault, alternative, plant
from crosschip.verify.layer_stats import DEFAULT_MARGIN, GOLDEN_MARGIN, gate_for
from crosschip.verify.run import VerifyOptions, run_verify

FORMATS = ("int8-w8a8-dynamic", "fp8-block", "fp16")
PRESETS = {"llama": "small", "deepseek": "deepseek-small"}
ALTERNATIVE = {"int8-w8a8-dynamic": "int8-mse-clip", "fp8-block": "fp8-pow2-scale"}


@dataclass(frozen=True)
class Case:
    name: str
    expect_pass: bool
    fault: Fault | None = None
    alternative: str | None = None
    emulate: str | None = None
    expect: str | None = None  # first failing layer point, or "tokenization"


def cases(model: str, fmt: str, layers: int) -> list[Case]:
    """The correct conversions and the planted faults for one model and format."""
    mid = layers // 2
    down = f"model.layers.{mid}.mlp.experts.*.down_proj" if model == "deepseek" else f"model.layers.{mid}.mlp.down_proj"
    # A gate/up interleave bug hits every expert of a layer, not one: the routed experts' up_proj for DeepSeek.
    up = f"model.layers.{mid}.mlp." + ("experts.*.up_proj" if model == "deepseek" else "up_proj")
    out = [Case("correct", True)]
    if fmt in ALTERNATIVE:
        out.append(Case(f"correct, {ALTERNATIVE[fmt]}", True, alternative=ALTERNATIVE[fmt]))
    if fmt == "fp16":
        out.append(Case("correct, emulated ascend-310p", True, emulate="ascend-310p"))
    mlp, attn = f"layers.{mid}.mlp", f"layers.{mid}.self_attn"
    for factor in (1.1, 1.5, 3.0):
        out.append(Case(f"scale x{factor:g}, one layer", False, Fault("scale", "scale", down, factor), expect=mlp))
    for factor in (1.1, 3.0):
        out.append(Case(f"scale x{factor:g}, every layer", False,
                        Fault("scale", "scale", "model.layers.*.down_proj", factor), expect="layers.0.mlp"))
    out.append(Case("zeroed block, one o_proj", False,
                    Fault("zero", "zero-block", f"model.layers.{mid}.self_attn.o_proj"), expect=attn))
    out.append(Case("swapped rows, one up_proj", False, Fault("swap", "swap-rows", up), expect=mlp))
    out.append(Case("tokenizer without BOS", False, Fault("no-bos", "no-bos"), expect="tokenization"))
    return out


def train(workdir: Path, preset: str, steps: int) -> Path:
    out = workdir / f"train-{preset}"
    if not (out / "latest").exists():
        corpus = prepare_corpus(workdir, max_bytes=2_000_000)
        log(f"training {preset} for {steps} steps into {out}")
        cmd = [sys.executable, "-m", "crosschip.cli", "train", "--data", str(corpus), "--model", preset, "--out",
               str(out), "--steps", str(steps), "--seq-len", "128", "--batch-size", "16", "--eval-every",
               str(steps), "--save-every", str(steps), "--overwrite"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def _old_verdict(report: dict[str, Any], cls: str) -> bool:
    """What the precision-class constants (before the golden) say about the same figures."""
    dist = report.get("distribution") or {}
    gates = G.DEFAULT_GATES[cls]
    ok = (dist.get("kl_mean_ci", [1.0, 1.0])[1] <= gates.kl_mean_max and dist.get("kl_p99", 1.0) <= gates.kl_p99_max
          and dist.get("top1_agreement", 0.0) >= gates.top1_min)
    for p in (report.get("layers") or {}).get("points") or []:
        own = (p.get("isolated") or p.get("accumulated") or {}).get("rel_rmse")
        if own is None or own > gate_for(p.get("noise_floor"), cls, DEFAULT_MARGIN):
            ok = False
    return ok


def _margin_used(report: dict[str, Any]) -> float | None:
    """The largest isolated error over its golden error at any point (how close a pass came to the layer gate)."""
    ratios = []
    for p in (report.get("layers") or {}).get("points") or []:
        own = (p.get("isolated") or {}).get("rel_rmse")
        gold = ((p.get("golden") or {}).get("isolated") or {}).get("rel_rmse")
        if own is not None and gold:
            ratios.append(own / gold)
    return max(ratios) if ratios else None


def run_case(ref: Path, converted: Path, case: Case, fmt: str, workdir: Path) -> dict[str, Any]:
    target = converted
    if case.fault is not None:
        target = workdir / f"{converted.name}-{case.name.replace(' ', '_').replace(',', '').replace('.', '')}"
        if not target.exists():
            plant(converted, target, case.fault)
    elif case.alternative is not None:
        target = workdir / f"{converted.name}-{case.alternative}"
        if not target.exists():
            alternative(converted, ref, target, case.alternative)
    started = time.perf_counter()
    report = run_verify(VerifyOptions(ref=ref, target=target, emulate=case.emulate, certify=False,
                                      max_new_tokens=16))
    failed = [f"{g['group']}:{g['name']}" for g in report["gates"] if g.get("passed") is False]
    first = (report.get("layers") or {}).get("first_failing")
    if first is not None:
        failed.append("layers")
    passed = report["verdict"] == "pass"
    named = first if case.expect != "tokenization" else ("tokenization" if any("tokenization" in f for f in failed)
                                                         else first)
    dist, floor = report.get("distribution") or {}, (report.get("noise_floor") or {}).get("floor") or {}
    cls = report["precision"]
    return {
        "case": case.name, "verdict": report["verdict"], "expected": "pass" if case.expect_pass else "fail",
        "ok": passed == case.expect_pass and (case.expect_pass or named == case.expect),
        "caught_by": failed, "first_failing": first, "expected_layer": case.expect, "named": named,
        "kl_mean": dist.get("kl_mean"), "golden_kl_mean": floor.get("kl_mean"),
        "top1": dist.get("top1_agreement"), "golden_top1": floor.get("top1_agreement"),
        "max_layer_ratio": _margin_used(report), "class": cls, "class_gates_verdict":
        "pass" if _old_verdict(report, cls) else "fail", "seconds": round(time.perf_counter() - started, 1),
    }


def calibrate(args: argparse.Namespace) -> dict[str, Any]:
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    given = {"llama": args.llama, "deepseek": args.deepseek}
    rows = []
    for model in args.models:
        ref = checkpoint.resolve_checkpoint_dir(given[model] or train(workdir, PRESETS[model], args.steps))
        layers = int(checkpoint.open_checkpoint(ref, verify=False).config.num_hidden_layers)
        for fmt in args.formats:
            converted = workdir / f"{model}-{fmt}"
            if not converted.exists():
                convert(ref, converted, resolve_options(fmt, None, None, None))
            for case in cases(model, fmt, layers):
                log(f"{model} {fmt}: {case.name}")
                rows.append({"model": model, "format": fmt, **run_case(ref, converted, case, fmt, workdir)})
                log(f"  -> {rows[-1]['verdict']} ({'ok' if rows[-1]['ok'] else 'WRONG'}), "
                    f"caught by {rows[-1]['caught_by']}, first failing {rows[-1]['first_failing']}")
    return {"machine": machine(__import__("torch").device("cpu")), "rows": rows,
            "all_ok": all(r["ok"] for r in rows)}


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return "-" if x is None else str(x)


def print_table(summary: dict[str, Any]) -> None:
    head = ("model", "format", "case", "verdict", "named", "expected", "old gates", "KL", "KL golden", "top-1",
            "top-1 golden", "s")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in summary["rows"]:
        verdict = r["verdict"].upper() + ("" if r["ok"] else " (WRONG)")
        print(" | ".join(_fmt(v) for v in (r["model"], r["format"], r["case"], verdict, r["named"],
                                            r["expected_layer"], r["class_gates_verdict"].upper(), r["kl_mean"],
                                            r["golden_kl_mean"], r["top1"], r["golden_top1"], r["seconds"])))
    print(f"\nall cases as expected: {summary['all_ok']}\n")
    print_matrix(summary)


def print_matrix(summary: dict[str, Any]) -> None:
    """The README's table: one row per case, one column per model and format; old = class-constant verdict."""
    columns = list(dict.fromkeys((r["model"], r["format"]) for r in summary["rows"]))
    short = {"int8-w8a8-dynamic": "W8A8", "fp8-block": "FP8", "fp16": "fp16"}
    print("| case | " + " | ".join(f"{m} {short.get(f, f)}" for m, f in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for case in dict.fromkeys(r["case"] for r in summary["rows"]):
        cells = []
        for m, f in columns:
            row = next((r for r in summary["rows"] if (r["model"], r["format"], r["case"]) == (m, f, case)), None)
            if row is None:
                cells.append("")
                continue
            cell = row["verdict"].upper() + (f" `{row['named']}`" if row["verdict"] == "fail" else "")
            cell += "" if row["ok"] else " (WRONG)"
            if row["class_gates_verdict"] != row["verdict"]:
                cell += f" (old: {row['class_gates_verdict'].upper()})"
            cells.append(cell)
        print(f"| {case} | " + " | ".join(cells) + " |")
    ratios = [r["max_layer_ratio"] for r in summary["rows"] if r["expected"] == "pass" and r["max_layer_ratio"]]
    faults = [r["max_layer_ratio"] for r in summary["rows"]
              if r["expected"] == "fail" and r["expected_layer"] != "tokenization" and r["max_layer_ratio"]]
    if ratios and faults:
        print(f"\nlargest layer error / golden's over the correct conversions: {max(ratios):.2f}; smallest over the "
              f"weight faults: {min(faults):.2f} (gate: {GOLDEN_MARGIN:g})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--llama", type=Path, help="a trained Llama checkpoint (default: train `small` here)")
    parser.add_argument("--deepseek", type=Path, help="a trained DeepSeek-V3 checkpoint (default: train here)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(PRESETS))
    parser.add_argument("--formats", type=lambda s: s.split(","), default=list(FORMATS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    summary = run_and_print(args, lambda: calibrate(args), print_table)
    if summary is None:
        return CrosschipError.exit_code
    (args.workdir / "calibration.json").write_text(json.dumps(summary, indent=1))
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
