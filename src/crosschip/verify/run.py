"""`crosschip verify`: run both sides over the same tokens, score them, gate them, report and certify.

One teacher-forced pass per side: when both sides run in-process, the layer-localization pass
(`layers.localize`) is that pass, and its logits feed the distribution metrics, so localization
costs only its isolated and noise-floor calls on top of the two forwards a bare comparison needs.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crosschip import checkpoint
from crosschip.devices import precision_name
from crosschip.errors import CrosschipError
from crosschip.fsio import atomic_dir
from crosschip.verify import gates as G
from crosschip.verify.metrics import distribution_metrics, greedy_metrics
from crosschip.verify.prompts import PromptSet, load_prompts, tokenize_prompts
from crosschip.verify.report import build_report, write_report
from crosschip.verify.sides import MetricUnavailable, SideSpec, open_side, parse_side
from crosschip.verify.types import GreedyRun, Side, TokenScores

Log = Callable[[str], None]
_CLASSES = ("fp32", "fp16", "bf16", "int8", "fp8")  # gate classes, finest to coarsest
_FULL_TOP_K = 5  # top-K kept per position when both sides give full distributions (top-5 overlap)


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


def pack_rows(sequences: list[list[int]], seq_len: int) -> list[list[int]]:
    """Concatenate tokenized texts and cut them into rows of seq_len ids (static shapes, no padding)."""
    stream = [t for s in sequences for t in s]
    rows = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if not rows and len(stream) >= 2:
        rows = [stream]  # less text than one row: one shorter row
    if not rows:
        raise CrosschipError("the prompts give fewer than 2 tokens to score", "pass --prompts with more text")
    return rows


def _batches(rows: list[list[int]], batch_size: int) -> list[torch.Tensor]:
    # each: int64 [B, T]
    return [torch.tensor(rows[i : i + batch_size], dtype=torch.long) for i in range(0, len(rows), batch_size)]


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


def _open_sides(opts: VerifyOptions, log: Log) -> tuple[Side, Side, SideSpec, str | None]:
    ref_spec, tgt_spec = parse_side(str(opts.ref)), parse_side(str(opts.target))  # a Path is a checkpoint side
    emulated = None
    apply = None
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

    log(f"loading ref {opts.ref}")
    ref = open_side(ref_spec)
    log(f"loading target {opts.target}" + (f" (emulated {emulated})" if emulated else ""))
    target = open_side(tgt_spec, emulate=apply, emulated=emulated)
    return ref, target, tgt_spec, emulated


def _tokenizer(ref: Side, target: Side) -> Any:
    for side in (ref, target):
        tok = getattr(side, "tokenizer", None)
        if tok is not None:
            return tok
    raise CrosschipError("neither side has a tokenizer to turn the prompts into tokens",
                         "use a checkpoint with tokenizer files on one side (crosschip writes them)")


def score_sides(opts: VerifyOptions, ref: Side, target: Side, rows: list[list[int]], precision: str,
                log: Log) -> tuple[list[TokenScores] | None, list[TokenScores] | None, Any, dict[str, str]]:
    """Teacher-forced scores of both sides (and the layer result when both run in-process)."""
    in_process = all(s.info.kind == "checkpoint" for s in (ref, target))
    if opts.layers and in_process:
        from crosschip.verify.layers import localize

        log(f"teacher-forced pass with layer localization: {len(rows)} rows x {len(rows[0])} tokens")
        result = localize(ref.model, target.model, _batches(rows, opts.batch_size),  # type: ignore[attr-defined]
                          isolated=opts.isolated, tgt_precision=precision)
        # Both sides have full distributions: exact KL needs no top-K beyond the top-5 overlap metric.
        k = min(opts.top_k, _FULL_TOP_K)
        ref_scores = ref.scores_from_logits(rows, result.ref_logits, k)  # type: ignore[attr-defined]
        tgt_scores = target.scores_from_logits(rows, result.tgt_logits, k)  # type: ignore[attr-defined]
        return ref_scores, tgt_scores, result, {}
    log(f"teacher-forced pass: {len(rows)} rows x {len(rows[0])} tokens")
    try:
        return ref.score(rows, opts.top_k), target.score(rows, opts.top_k), None, {}
    except MetricUnavailable as e:
        return None, None, None, {"distribution": str(e)}


def _greedy_both(opts: VerifyOptions, ref: Side, target: Side, prompts: list[list[int]], log: Log,
                 unavailable: dict[str, str]) -> tuple[list[GreedyRun], list[GreedyRun]]:
    if opts.max_new_tokens <= 0 or not prompts:
        return [], []
    log(f"greedy continuations: {len(prompts)} prompts x {opts.max_new_tokens} tokens")
    stops = frozenset().union(*(getattr(s, "stop_ids", frozenset()) for s in (ref, target)))
    for side in (ref, target):
        if side.info.kind == "endpoint":
            side.stop_ids = stops  # an endpoint returns EOS where an in-process side stops before it
    try:
        ref_runs = [ref.greedy(p, opts.max_new_tokens, opts.top_n) for p in prompts]
        tgt_runs = [target.greedy(p, opts.max_new_tokens, opts.top_n) for p in prompts]
    except MetricUnavailable as e:
        unavailable["greedy"] = str(e)
        return [], []
    return ref_runs, tgt_runs


def run_verify(opts: VerifyOptions, log: Log | None = None) -> dict[str, Any]:
    """Verify `opts.target` against `opts.ref`; returns the report (also written / certified as asked)."""
    say: Log = log or (lambda _msg: None)
    if opts.report_dir is not None and Path(opts.report_dir).exists() and not opts.overwrite:
        raise CrosschipError(f"report directory {opts.report_dir} already exists",
                             "pass --overwrite or another --report")
    started = time.perf_counter()
    prompt_set = load_prompts(opts.prompts)
    ref, target, tgt_spec, emulated = _open_sides(opts, say)
    try:
        texts, greedy_prompts = tokenize_prompts(prompt_set, _tokenizer(ref, target))
        rows = pack_rows(texts, opts.seq_len)
        precision = _precision(opts, tgt_spec, target)
        ref_scores, tgt_scores, layer_result, unavailable = score_sides(opts, ref, target, rows, precision, say)
        dist = distribution_metrics(ref_scores, tgt_scores, bootstrap=opts.bootstrap) if ref_scores else None
        ref_runs, tgt_runs = _greedy_both(opts, ref, target, greedy_prompts, say, unavailable)
        greedy = greedy_metrics(ref_runs, tgt_runs, opts.top_n) if ref_runs else None
    finally:
        ref.close()
        target.close()
    gates = G.resolve_gates(precision, opts.gate_overrides)
    results = G.evaluate(dist, greedy, gates)
    layer_fail = layer_result is not None and layer_result.first_failing is not None
    passed = G.verdict(results, layer_fail, checked_layers=layer_result is not None)
    report = build_report(
        ref=ref.info, target=target.info, prompts=prompt_set, distribution=dist, unavailable=unavailable,
        greedy=greedy, layers=layer_result.to_dict() if layer_result is not None else None, gates=results,
        precision=precision, passed=passed, emulated=emulated, thresholds=gates,
    )
    report["seconds"] = round(time.perf_counter() - started, 3)
    if opts.report_dir is not None:
        with atomic_dir(Path(opts.report_dir), overwrite=opts.overwrite) as tmp:
            write_report(report, tmp)
    if opts.certify and tgt_spec.kind == "checkpoint":
        checkpoint.append_record(tgt_spec.path, "verifications", certificate(report, prompt_set))
    return report


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
