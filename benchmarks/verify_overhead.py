"""Verify overhead: `crosschip verify` with layer localization against the two bare forward passes.

Both sides in-process on the same checkpoint: ref = CKPT (fp32), target = CKPT:bf16 (the usual
"did the bf16 deployment keep the fp32 model?" question). Over the same packed token rows, it times
  bare      ref_model(rows) + target_model(rows), batch by batch, under inference_mode: what any
            comparison must at least compute (the peer a user would script by hand)
  verify    crosschip's teacher-forced scoring: `score_in_process` (one hooked pass per side and one of
            the golden, accumulated per-layer errors, isolated re-runs of each target and golden layer on
            the ref's inputs, fp64 noise floor) plus the distribution metrics of the target and of the
            golden (KL with bootstrap CI, top-1/top-5, ppl)
and prints both, and their ratio (the target was <= 1.5x before the golden; with it a third model runs, so
the honest bound is ~2x). Model loading and greedy generation are outside
both timings (they are the same work either way); the full `run_verify` wall time is printed too.

Both the demo's `small` preset (5M parameters, where per-call Python overhead is largest) and `base`
(32M, where the forwards dominate as they do in real models) are measured in one run.

    python benchmarks/verify_overhead.py [--presets small,base] [--seq-len 128] [--repeat 3] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import build_checkpoint, log, machine, prepare_data, print_json
from crosschip.verify.compare import score_in_process
from crosschip.verify.metrics import distribution_metrics
from crosschip.verify.prompts import load_prompts, tokenize_prompts
from crosschip.verify.run import VerifyOptions, pack_rows, run_verify
from crosschip.verify.sides import open_side, parse_side

TARGET_RATIO = 2.0  # three models (ref, target, golden) where a bare comparison runs two


@torch.inference_mode()
def bare_forwards(ref: torch.nn.Module, tgt: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for ids in batches:  # ids: [B, T]
        ref(input_ids=ids, use_cache=False)
        tgt(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def timed_verify(opts: VerifyOptions, ref: Any, tgt: Any, golden: Any, rows: list[list[int]]) -> float:
    start = time.perf_counter()
    pair, gold = score_in_process(opts, ref, tgt, golden, rows, "bf16", lambda _m: None)
    assert pair.scores is not None and gold is not None
    distribution_metrics(pair.scores[0], gold, bootstrap=opts.bootstrap)
    assert pair.layers is not None and pair.layers.first_failing is None, "bf16 copy of the model failed its gates"
    return time.perf_counter() - start


def run(args: argparse.Namespace, workdir: Path, preset: str) -> dict[str, Any]:
    torch.manual_seed(0)
    _, tok_dir = prepare_data(workdir, max_bytes=2_000_000, vocab_size=args.vocab)
    ckpt = build_checkpoint(workdir, preset, tok_dir, seed=0)
    opts = VerifyOptions(ref=str(ckpt), target=f"{ckpt}:bf16", max_new_tokens=0, seq_len=args.seq_len,
                         batch_size=args.batch_size, certify=False)
    ref, tgt = open_side(parse_side(opts.ref)), open_side(parse_side(opts.target))
    golden = open_side(parse_side(opts.target))  # the target is stored like the ref: the golden is the ref in bf16
    texts, _ = tokenize_prompts(load_prompts(None), ref.tokenizer)
    rows = pack_rows(texts, args.seq_len)
    batches = [torch.tensor(rows[i : i + args.batch_size]) for i in range(0, len(rows), args.batch_size)]
    log(f"{preset}: {len(rows)} rows x {args.seq_len} tokens, batch {args.batch_size}")
    bare_forwards(ref.model, tgt.model, batches[:1])  # warm-up
    bare, verify = [], []
    for i in range(args.repeat):  # interleaved: machine noise hits both alike
        bare.append(bare_forwards(ref.model, tgt.model, batches))
        verify.append(timed_verify(opts, ref, tgt, golden, rows))
        log(f"round {i + 1}/{args.repeat}: bare {bare[-1]:.3f} s, verify {verify[-1]:.3f} s")
    ref.close()
    tgt.close()
    golden.close()
    start = time.perf_counter()
    run_verify(opts)
    full = time.perf_counter() - start
    return {"preset": preset, "rows": len(rows),
            "seq_len": args.seq_len, "tokens": len(rows) * args.seq_len, "bare_s": min(bare),
            "verify_s": min(verify), "ratio": min(verify) / min(bare), "run_verify_total_s": full,
            "bare_all": bare, "verify_all": verify}


def print_report(r: dict[str, Any]) -> None:
    print(f"preset {r['preset']}: ref = fp32 checkpoint, target = the same checkpoint in bf16, "
          f"{r['rows']} rows x {r['seq_len']} tokens = {r['tokens']} tokens (fastest of {len(r['bare_all'])})")
    print(f"bare forwards (ref + target):            {r['bare_s']:8.3f} s")
    print(f"verify scoring with layer localization:  {r['verify_s']:8.3f} s")
    verdict = "met" if r["ratio"] <= TARGET_RATIO else "MISSED"
    print(f"ratio verify / bare: {r['ratio']:.2f}x (target <= {TARGET_RATIO}x: {verdict})")
    print(f"whole `run_verify` (loading both sides, hashing, report): {r['run_verify_total_s']:.2f} s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="small,base", help="comma-separated model presets")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and checkpoint here (reused)")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crosschip-verify-bench-") as tmp:
        results = [run(args, Path(args.workdir or tmp), p) for p in args.presets.split(",") if p]
    if args.json:
        print_json({"machine": machine(torch.device("cpu")), "results": results})
        return 0
    m = machine(torch.device("cpu"))
    print(f"{m['device_name']}, {m['cpu_threads']} threads, torch {m['torch']}, {m['date_utc']}")
    for result in results:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
