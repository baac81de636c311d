"""`crosschip verify`: run both sides over the same tokens, score them, gate them, report and certify.

One teacher-forced pass per side: when both sides run in-process, the layer-localization pass
(`layers.localize`) is that pass, and its logits feed the distribution metrics, so localization
costs only its isolated and noise-floor calls on top of the two forwards a bare comparison needs.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from crosschip import checkpoint
from crosschip.data.tokenizer import packed_with_bos
from crosschip.devices import precision_name
from crosschip.errors import CrosschipError
from crosschip.fsio import atomic_dir
from crosschip.htmlreport import jsonable
from crosschip.verify import gates as G
from crosschip.verify.compare import (
    Pair,
    checkpoint_dtype,
    compare_conversion,
    compare_fidelity,
    compare_served,
    require_checkpoint_ref,
    served_checkpoint,
)
from crosschip.verify.prompts import PromptSet, load_prompts, tokenize_prompts
from crosschip.verify.report import build_report, write_report
from crosschip.verify.sides import CheckpointSide, SideSpec, open_side, parse_side
from crosschip.verify.tokenization import (
    MAX_TEXTS,
    TokenizationResult,
    check_endpoint,
    check_tokenizer,
)
from crosschip.verify.types import Side

Log = Callable[[str], None]
Apply = Callable[[torch.nn.Module], object]
_CLASSES = ("fp32", "fp16", "bf16", "int8", "fp8")  # gate classes, finest to coarsest


@dataclass
class VerifyOptions:
    ref: str | Path  # a side: CKPT[@DEVICE][:DTYPE] or http(s)://HOST:PORT/v1[#MODEL]
    target: str | Path
    prompts: Path | None = None
    max_new_tokens: int = 32
    report_dir: Path | None = None
    overwrite: bool = False
    emulate: str | None = None
    precision: str | None = None  # gate class; inferred from the target when None
    layers: bool = True  # layer localization when both sides run in-process
    isolated: bool = True
    seq_len: int = 128  # teacher-forced rows: the prompt text packed into rows of this many tokens
    batch_size: int = 4
    top_k: int = 20
    top_n: int = 5  # vLLM-style greedy check: each side's token in the other's top-N
    bootstrap: int = 1000
    certify: bool = True
    gate_overrides: dict[str, float | None] = field(default_factory=dict)
    golden: bool = True  # measure the gates against the reference converted into the target's format
    served: Path | None = None  # the checkpoint an endpoint target serves (default: its model card's root)
    served_dtype: str | None = None  # what that endpoint computes in (default: the checkpoint's dtype; fp32 -> bf16)


def pack_rows(sequences: list[list[int]], seq_len: int) -> list[list[int]]:
    """Concatenate tokenized texts and cut them into rows of seq_len ids (static shapes, no padding)."""
    stream = [t for s in sequences for t in s]
    rows = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if not rows and len(stream) >= 2:
        rows = [stream]  # less text than one row: one shorter row
    if not rows:
        raise CrosschipError("the prompts give fewer than 2 tokens to score", "pass --prompts with more text")
    return rows


def _precision(opts: VerifyOptions, spec: SideSpec, target: Side) -> str:
    """The gate class: --precision, else the coarser of the target's stored format and compute dtype
    (fp16 weights computed in fp32 are still fp16-rounded)."""
    if opts.precision is not None:
        if opts.precision not in _CLASSES:
            raise CrosschipError(f"unknown --precision {opts.precision!r}", f"use one of {', '.join(_CLASSES)}")
        return opts.precision
    if spec.kind == "endpoint":
        return "bf16"  # what an endpoint computes in is not observable; bf16 is the common serving dtype
    ident = target.info.identity
    return G.precision_class(ident.get("dtype"), ident.get("format"))


def _open_sides(opts: VerifyOptions, log: Log) -> tuple[Side, Side, SideSpec, str | None, Apply | None]:
    ref_spec, tgt_spec = parse_side(str(opts.ref)), parse_side(str(opts.target))  # a Path is a checkpoint side
    emulated = None
    apply = golden_apply = None
    if opts.emulate is not None:
        if tgt_spec.kind != "checkpoint":
            raise CrosschipError("--emulate needs an in-process target", "pass --target CKPT, not an endpoint URL")
        from crosschip.verify.emulate import apply_emulation, emulation_for

        fmt = checkpoint.storage_format(checkpoint.open_checkpoint(tgt_spec.path, verify=False))[0]
        emu = emulation_for(opts.emulate, fmt)
        emulated = emu.profile
        tgt_spec = SideSpec(tgt_spec.kind, tgt_spec.path, tgt_spec.device, precision_name(emu.dtype), None, None)

        def apply(model: torch.nn.Module) -> object:
            return apply_emulation(model, emu)

        def golden_apply(model: torch.nn.Module) -> object:
            # The golden keeps the emulated dtype and activation format but computes IEEE, without the chip's
            # saturation: overflow is the target's own error to judge, not a floor to absorb.
            return apply_emulation(model, replace(emu, saturate=False))

    if opts.served_dtype is not None and opts.served_dtype not in ("fp32", "bf16", "fp16"):
        raise CrosschipError(f"unknown --served-dtype {opts.served_dtype!r}", "use fp32, bf16 or fp16")
    if opts.served is not None and tgt_spec.kind != "endpoint":
        raise CrosschipError("--served names the checkpoint an endpoint serves", "use it with --target URL")
    log(f"loading ref {opts.ref}")
    ref = open_side(ref_spec)
    try:
        log(f"loading target {opts.target}" + (f" (emulated {emulated})" if emulated else ""))
        target = open_side(tgt_spec, emulate=apply, emulated=emulated)
    except BaseException:
        ref.close()
        raise
    return ref, target, tgt_spec, emulated, golden_apply


def _tokenizer(ref: Side, target: Side) -> Any:
    for side in (ref, target):
        tok = getattr(side, "tokenizer", None)
        if tok is not None:
            return tok
    raise CrosschipError("neither side has a tokenizer to turn the prompts into tokens",
                         "use a checkpoint with tokenizer files on one side (crosschip writes them)")


def _check_tokenization(prompts: PromptSet, ref: Side, target: Side, tokenizer: Any, log: Log) -> TokenizationResult:
    manifest = getattr(getattr(ref, "checkpoint", None), "manifest", None) or {}
    trained = packed_with_bos(manifest.get("provenance") or {})
    if target.info.kind == "endpoint":
        log(f"tokenization: sending {min(len(prompts.texts), MAX_TEXTS)} prompt texts as text")
        return check_endpoint(prompts.texts, tokenizer, target, trained)
    return check_tokenizer(prompts.texts, tokenizer, getattr(target, "tokenizer", None), trained)


@dataclass
class _Outcome:
    """Everything the comparisons measured, before the verdict."""

    main: Pair  # ref vs target (in-process), or ref vs endpoint
    conversion: Pair | None = None  # endpoints: ref vs the served checkpoint in-process
    fidelity: Pair | None = None  # endpoints: the endpoint vs the served checkpoint in-process
    golden: dict[str, Any] | None = None
    served: dict[str, Any] | None = None
    tokenization: TokenizationResult | None = None

    def gates(self) -> list[G.GateResult]:
        pairs = [p for p in (self.conversion, self.main, self.fidelity) if p is not None]
        out = [g for p in pairs for g in p.gates]
        t = self.tokenization
        if t is not None:
            value = None if t.passed is None else float(t.mismatched)
            out.append(G.GateResult("tokenization", value, None if t.passed is None else 0.0, t.passed,
                                    f"{t.method}: {t.mismatched}/{t.checked} texts differ; {t.reason}",
                                    group="tokenization"))
        return out

    def layers(self) -> Any:
        return (self.conversion or self.main).layers


def _verify_endpoint(opts: VerifyOptions, ref: Side, endpoint: Side, rows: list[list[int]],
                     greedy_prompts: list[list[int]], precision: str, log: Log) -> _Outcome:
    """Two-sided when the served checkpoint is known (conversion + fidelity), else one-sided (class gates)."""
    served_path, why = served_checkpoint(opts, endpoint, log)
    outcome = _Outcome(Pair(), served={"path": str(served_path) if served_path else None, "source": why})
    ref_scores = end_scores = None
    if served_path is not None:
        ref_ckpt = require_checkpoint_ref(ref, "two-sided verification")
        log(f"loading the served checkpoint {served_path} in-process (crosschip's own load)")
        served = CheckpointSide(served_path)
        try:
            outcome.served["identity"] = served.info.identity
            served_class = G.precision_class(served.dtype, served.info.identity.get("format"))
            outcome.conversion, outcome.golden = compare_conversion(
                opts, ref_ckpt, served, None, rows, greedy_prompts, served_class, log)
            ref_scores, own = outcome.conversion.scores or (None, None)
            dtype = opts.served_dtype or checkpoint_dtype(served_path)
            outcome.fidelity, end_scores = compare_fidelity(opts, served, own or [], endpoint, rows, greedy_prompts,
                                                            dtype, log)
        finally:
            served.close()
    outcome.main = compare_served(opts, ref_scores, ref, endpoint, end_scores, rows, greedy_prompts, precision,
                                  gated=served_path is None, log=log)
    return outcome


def run_verify(opts: VerifyOptions, log: Log | None = None) -> dict[str, Any]:
    """Verify `opts.target` against `opts.ref`; returns the report (also written / certified as asked)."""
    say: Log = log or (lambda _msg: None)
    if opts.report_dir is not None and Path(opts.report_dir).exists() and not opts.overwrite:
        raise CrosschipError(f"report directory {opts.report_dir} already exists",
                             "pass --overwrite or another --report")
    started = time.perf_counter()
    prompt_set = load_prompts(opts.prompts)
    ref, target, tgt_spec, emulated, golden_apply = _open_sides(opts, say)
    try:
        tokenizer = _tokenizer(ref, target)
        texts, greedy_prompts = tokenize_prompts(prompt_set, tokenizer)
        rows = pack_rows(texts, opts.seq_len)
        precision = _precision(opts, tgt_spec, target)
        token_check = _check_tokenization(prompt_set, ref, target, tokenizer, say)
        if tgt_spec.kind == "endpoint":
            outcome = _verify_endpoint(opts, ref, target, rows, greedy_prompts, precision, say)
        else:
            pair, golden = compare_conversion(opts, require_checkpoint_ref(ref, "an in-process target"),
                                              target, golden_apply, rows, greedy_prompts, precision, say)  # type: ignore[arg-type]
            outcome = _Outcome(pair, golden=golden)
        outcome.tokenization = token_check
    finally:
        ref.close()
        target.close()
    report = _report(opts, outcome, ref, target, prompt_set, precision, emulated)
    report["seconds"] = round(time.perf_counter() - started, 3)
    if opts.report_dir is not None:
        with atomic_dir(Path(opts.report_dir), overwrite=opts.overwrite) as tmp:
            write_report(report, tmp)
    _certify(opts, tgt_spec, report, prompt_set, say)
    return report


def _report(opts: VerifyOptions, outcome: _Outcome, ref: Side, target: Side, prompts: PromptSet, precision: str,
            emulated: str | None) -> dict[str, Any]:
    gates = outcome.gates()
    layers = outcome.layers()
    layer_fail = layers is not None and layers.first_failing is not None
    passed = G.verdict(gates, layer_fail, checked_layers=layers is not None)
    main = outcome.main
    unavailable = {**main.unavailable, **(outcome.fidelity.unavailable if outcome.fidelity else {})}
    report = build_report(
        ref=ref.info, target=target.info, prompts=prompts, distribution=main.distribution, unavailable=unavailable,
        greedy=main.greedy, layers=layers.to_dict() if layers is not None else None, gates=gates,
        precision=precision, passed=passed, emulated=emulated, thresholds=main.thresholds,
    )
    report["two_sided"] = outcome.conversion is not None or target.info.kind == "checkpoint"
    report["noise_floor"] = {"golden": outcome.golden, **(outcome.conversion or main).section()}
    report["served"] = outcome.served
    report["conversion"] = outcome.conversion.section() if outcome.conversion is not None else None
    report["fidelity"] = outcome.fidelity.section() if outcome.fidelity is not None else None
    report["tokenization"] = outcome.tokenization.to_dict() if outcome.tokenization is not None else None
    report["routing"] = layers.routing if layers is not None else []
    return jsonable(report)


def _certify(opts: VerifyOptions, spec: SideSpec, report: dict[str, Any], prompts: PromptSet, log: Log) -> None:
    """Append the certificate to the target's crosschip.json; a checkpoint from another tool has none to append to."""
    if not opts.certify or spec.kind != "checkpoint":
        return
    root = checkpoint.resolve_checkpoint_dir(Path(spec.path))  # type: ignore[arg-type]
    if checkpoint.read_manifest(root) is None:
        report["certified"] = False
        log(f"not certified: {root} has no crosschip.json (a checkpoint from another tool); the report holds the "
            "verdict")
        return
    checkpoint.append_record(root, "verifications", certificate(report, prompts))
    report["certified"] = True


def certificate(report: dict[str, Any], prompts: PromptSet) -> dict[str, Any]:
    """The parity certificate appended to the target checkpoint's crosschip.json."""
    layers = report.get("layers") or {}
    return {
        "tool": "crosschip verify",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "verdict": report["verdict"],
        "emulated": report.get("emulated"),
        "precision": report.get("precision"),
        "ref": report["ref"],
        "target": report["target"],
        "prompts": {"sha256": prompts.sha256, "source": prompts.source,
                    "texts": len(prompts.texts), "chats": len(prompts.chats)},
        "metrics": _headline(report),
        "gates": report["gates"],
        "first_failing_layer": layers.get("first_failing"),
        "gate_basis": (report.get("noise_floor") or {}).get("gate_basis"),
        "tokenization": _pick(report.get("tokenization"), ("method", "checked", "mismatched", "passed")),
        "fidelity": _pick(((report.get("fidelity") or {}).get("distribution")), ("kl_method", "kl_mean", "tokens")),
        "served": (report.get("served") or {}).get("path"),
        "report_schema_version": report.get("schema_version"),
    }


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    dist = report.get("distribution") or {}
    keep = ("kl_method", "kl_mean", "kl_mean_ci", "kl_p99", "kl_max", "top1_agreement", "top5_overlap",
            "ppl_ratio", "tokens")
    out = {k: dist[k] for k in keep if k in dist}
    greedy = report.get("greedy") or {}
    out.update({f"greedy_{k}": greedy[k] for k in ("prompts", "identical", "mean_matched", "all_vllm_close")
                if k in greedy})
    return out


def _pick(section: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any] | None:
    return None if not section else {k: section.get(k) for k in keys}
