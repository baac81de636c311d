"""Accelerator checks, written to run unchanged on a CUDA (or Ascend) machine.

Each check is a function in the CHECKS registry (name -> function taking a Context); later issues
append checks there (fp8 on Hopper, `crosschip verify` on cuda, ...). One line per check:
PASS / FAIL / SKIP with its figures; `--json` prints one JSON object instead. Exit status: 1 if any
check FAILs, else 0. A missing device is a SKIP (exit 0) unless `--require` makes it a failure.

    python benchmarks/gpu_check.py --device cuda --require    # on the GPU machine
    python benchmarks/gpu_check.py --device cpu               # dry run here: bf16 autocast on the CPU
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import first_divergence, first_documents, log, machine, prepare_corpus, prepare_data, print_json
from crosschip import devices
from crosschip.checkpoint import load_model, load_tokenizer_if_present, resolve_checkpoint_dir
from crosschip.errors import CrosschipError
from crosschip.generate import SamplingParams, generate
from crosschip.train.config import TrainConfig
from crosschip.train.loop import train
from crosschip.train.report import NullReporter

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

# bf16 keeps 8 significant bits: each autocast matmul input and output is rounded by up to 2^-9
# relative, so the logits (themselves a bf16 matmul output) carry ~0.2-0.5% of their scale in error
# (the CPU dry run: max |delta| 0.019 at max |logit| 4.9, 0.4%). A wrong tensor, layout, rope or
# dtype bug moves them by tens of percent; even one MLP scaled by 1.1 moves them 4.4% here. So
# "within bf16 tolerance" is |delta logit| <= ATOL + RTOL * max|logit| with 2%: ~5x the expected
# error (headroom for GPU kernels that round differently), below the smallest bug we tried.
LOGIT_RTOL = 0.02
LOGIT_ATOL = 0.02
# Where the fp32 model's top two logits are closer than that tolerance, bf16 may legitimately pick
# the other token, so a top-1 or greedy disagreement only FAILs when the fp32 margin between the two
# picks exceeds the tolerance. The plain agreement rate must still be high: a model whose every
# position is a near-tie would otherwise pass vacuously.
MIN_TOP1_AGREEMENT = 0.9

FOUNDATION_PROMPTS = ("Return the", "This module provides", "Create a new", "If the value is")
FOUNDATION_NEW_TOKENS = 24
FOUNDATION_STEPS = 50


@dataclass
class Context:
    device: torch.device
    workdir: Path
    seed: int = 0


@dataclass
class CheckResult:
    name: str
    status: str  # PASS | FAIL | SKIP
    summary: str
    figures: dict[str, Any] = field(default_factory=dict)


CheckFn = Callable[[Context], CheckResult]
CHECKS: dict[str, CheckFn] = {}


def register(name: str) -> Callable[[CheckFn], CheckFn]:
    def add(fn: CheckFn) -> CheckFn:
        CHECKS[name] = fn
        return fn

    return add


# ---------------------------------------------------------------- foundation: bf16 on device vs fp32 on CPU


def _train_tiny(ctx: Context) -> Path:
    """50 bf16 steps of the tiny preset through `crosschip train`'s own code path (TrainConfig + train())."""
    corpus = prepare_corpus(ctx.workdir, max_bytes=400_000)
    cfg = TrainConfig(
        data=corpus, model="tiny", out=ctx.workdir / "run", device=str(ctx.device), precision="bf16",
        steps=FOUNDATION_STEPS, batch_size=8, seq_len=128, warmup_steps=5, vocab_size=2048,
        eval_every=FOUNDATION_STEPS, eval_batches=2, save_every=FOUNDATION_STEPS, seed=ctx.seed,
        overwrite=True, cache_dir=ctx.workdir / "cache",
    )
    log(f"foundation: training tiny for {FOUNDATION_STEPS} steps in bf16 on {ctx.device} ...")
    result = train(cfg, NullReporter())
    log(f"foundation: train loss {result.train_loss:.3f}, val loss {result.val_loss:.3f}")
    log(f"foundation: checkpoint {result.checkpoint}")
    return result.checkpoint


def _teacher_forced_batch(corpus: Path, tokenizer: Any, rows: int = 4, seq_len: int = 96) -> torch.Tensor:
    """A fixed [rows, seq_len] batch cut from BOS-prefixed corpus documents, as training packs them."""
    stream: list[int] = []
    for doc in first_documents(corpus, count=64):
        stream += [tokenizer.bos_token_id, *tokenizer(doc, add_special_tokens=False)["input_ids"]]
        if len(stream) >= rows * seq_len:
            break
    if len(stream) < rows * seq_len:
        raise CrosschipError(f"corpus {corpus} holds under {rows * seq_len} tokens", "use a larger corpus")
    return torch.tensor(stream[: rows * seq_len]).view(rows, seq_len)


@torch.inference_mode()
def _logits(model: torch.nn.Module, ids: torch.Tensor, precision: str) -> torch.Tensor:
    device = next(model.parameters()).device
    with devices.autocast(device, precision):
        return model(input_ids=ids.to(device)).logits.float().cpu()


def _compare_logits(ref: torch.Tensor, test: torch.Tensor) -> dict[str, Any]:
    """Reference (fp32) vs test (bf16) logits [B, S, V]: error, top-1 agreement, unexplained flips."""
    tol = LOGIT_ATOL + LOGIT_RTOL * float(ref.abs().max())
    top_ref, top_test = ref.argmax(-1), test.argmax(-1)
    flips = top_ref != top_test
    # fp32 margin between the two picks: how close to a tie the flipped positions were.
    margin = ref.gather(-1, top_ref[..., None]) - ref.gather(-1, top_test[..., None])
    unexplained = int((flips & (margin[..., 0] > tol)).sum())
    return {
        "positions": int(flips.numel()),
        "max_abs_logit_diff": float((ref - test).abs().max()),
        "logit_scale": float(ref.abs().max()),
        "tolerance": tol,
        "top1_agreement": 1.0 - float(flips.float().mean()),
        "top1_unexplained_flips": unexplained,
    }


def _compare_greedy(
    ref_model: torch.nn.Module, test_model: torch.nn.Module, prompts: list[list[int]], tol: float
) -> list[dict[str, Any]]:
    """Greedy continuations (no EOS stop, so both always run the full length), fp32 vs bf16.

    This drives the device's prefill + KV-cache decode path; the numerical weight of the check is
    on the teacher-forced comparison, which sees real text at every position.
    """
    params = SamplingParams(max_new_tokens=FOUNDATION_NEW_TOKENS, temperature=0.0)
    test_device = next(test_model.parameters()).device
    out = []
    for ids in prompts:
        ref = generate(ref_model, ids, params)
        with devices.autocast(test_device, "bf16"):
            test = generate(test_model, ids, params)
        k = first_divergence(ref, test)
        row: dict[str, Any] = {
            "identical": k is None, "first_divergence": k, "explained_by_tie": None,
            # a 50-step tiny model often repeats one token: say so rather than let "identical" oversell it
            "distinct_tokens": len(set(ref)),
        }
        if k is not None:  # does the fp32 model see a near-tie where the two continuations part?
            last = _logits(ref_model, torch.tensor([ids + ref[:k]]), "fp32")[0, -1]
            row["fp32_margin"] = float(last[ref[k]] - last[test[k]])
            row["explained_by_tie"] = row["fp32_margin"] <= tol
        out.append(row)
    return out


@register("foundation")
def check_foundation(ctx: Context) -> CheckResult:
    """Train tiny in bf16 on the device, save, reload on CPU in fp32 and on the device in bf16; compare."""
    name = "foundation"
    if "bf16" not in devices.train_precisions(ctx.device):
        return CheckResult(name, SKIP, f"{ctx.device} has no native bf16")
    ckpt = _train_tiny(ctx)
    cpu_model, _ = load_model(ckpt, "cpu")  # fp32: the reference
    dev_model, _ = load_model(ckpt, ctx.device)  # fp32 weights, bf16 autocast as in training
    tokenizer = load_tokenizer_if_present(ckpt)
    batch = _teacher_forced_batch(ctx.workdir / "corpus.jsonl", tokenizer)
    figures = _compare_logits(_logits(cpu_model, batch, "fp32"), _logits(dev_model, batch, "bf16"))
    prompts = [[tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]]
               for p in FOUNDATION_PROMPTS]
    greedy = _compare_greedy(cpu_model, dev_model, prompts, figures["tolerance"])
    figures["greedy"] = greedy
    figures["greedy_identical"] = sum(g["identical"] for g in greedy)
    problems = []
    if figures["max_abs_logit_diff"] > figures["tolerance"]:
        problems.append("logit difference beyond bf16 tolerance")
    if figures["top1_agreement"] < MIN_TOP1_AGREEMENT:
        problems.append(f"top-1 agreement below {MIN_TOP1_AGREEMENT}")
    if figures["top1_unexplained_flips"]:
        problems.append("top-1 flips where fp32 has a clear winner")
    if any(g["explained_by_tie"] is False for g in greedy):
        problems.append("greedy continuation diverges where fp32 has a clear winner")
    divergences = [g["first_divergence"] for g in greedy]
    summary = (
        f"max|dlogit| {figures['max_abs_logit_diff']:.4f} (tol {figures['tolerance']:.4f}), "
        f"top-1 agreement {figures['top1_agreement']:.3f} over {figures['positions']} positions, "
        f"greedy identical {figures['greedy_identical']}/{len(greedy)} (first divergence {divergences}, "
        f"distinct tokens {[g['distinct_tokens'] for g in greedy]})"
    )
    if problems:
        summary += "; " + "; ".join(problems)
    return CheckResult(name, FAIL if problems else PASS, summary, figures)


FP8_HIDDEN, FP8_TOKENS = 256, 128  # multiples of 128: what the blockwise fp8 GEMM kernels accept
FP8_REL_TOL = 0.02  # fp8 inputs are exact on both sides; the GPU GEMM rounds its bf16 output (2^-9)


def _fp8_checkpoint(ctx: Context) -> tuple[Path, Path]:
    """A bf16 Llama checkpoint with 128-multiple dims, converted to fp8-block by crosschip on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from crosschip.checkpoint import write_checkpoint
    from crosschip.convert.pipeline import convert, resolve_options

    torch.manual_seed(ctx.seed)
    config = LlamaConfig(vocab_size=512, hidden_size=FP8_HIDDEN, intermediate_size=2 * FP8_HIDDEN,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    src, dst = ctx.workdir / "fp8-src", ctx.workdir / "fp8-block"
    write_checkpoint(src, model, None, {"source": "gpu_check"}, overwrite=True)
    convert(src, dst, resolve_options("fp8-block", None, None, None, overwrite=True))
    return src, dst


def _act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-128-channel fp8 activation quantization (DeepSeek-V3 inference/kernel.py act_quant)."""
    m, k = x.shape
    groups = x.float().view(m, k // 128, 128)
    scale = groups.abs().amax(-1).clamp(min=1e-12) / 448.0  # [m, k/128]
    q = (groups / scale[..., None]).to(torch.float8_e4m3fn).view(m, k)
    return q, scale


def _gpu_fp8_matmul(x_q: torch.Tensor, x_s: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor | None:
    """torch's fp8 GEMM with 1x128 activation and 128x128 weight scales (Hopper); None if unsupported."""
    try:
        # scale_a must be outer-dim (M) major for blockwise scaling: the transpose of a contiguous [k/128, m].
        return torch._scaled_mm(x_q, w.t(), x_s.t().contiguous().t(), w_s.t(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
        log(f"fp8_block: torch._scaled_mm blockwise unavailable here ({str(e).splitlines()[0][:120]})")
        return None


@register("fp8_block")
def check_fp8_block(ctx: Context) -> CheckResult:
    """crosschip's fp8-block weights through torch's fp8 GEMM on the device vs crosschip's CPU dequant."""
    from crosschip.checkpoint import open_checkpoint, read_state_dict
    from crosschip.formats.quant import fp8_block_dequantize

    name = "fp8_block"
    _, dst = _fp8_checkpoint(ctx)
    stored = read_state_dict(open_checkpoint(dst))
    weights = [k for k, v in stored.items() if v.dtype == torch.float8_e4m3fn]
    gen = torch.Generator().manual_seed(ctx.seed)
    worst, exact_dequant, gemm_ran = 0.0, True, 0
    for key in weights:
        w, w_s = stored[key], stored[key + "_scale_inv"]
        cpu_w = fp8_block_dequantize(w, w_s, dtype=torch.float32)  # crosschip's CPU path
        dev_w = fp8_block_dequantize(w.to(ctx.device), w_s.to(ctx.device), dtype=torch.float32).cpu()
        exact_dequant &= torch.equal(cpu_w, dev_w)
        x = torch.randn(FP8_TOKENS, w.shape[1], generator=gen)
        x_q, x_s = _act_quant(x)
        x_deq = (x_q.float().view(FP8_TOKENS, -1, 128) * x_s[..., None]).view_as(x)
        ref = x_deq.double() @ cpu_w.double().t()  # what the fp8 GEMM should compute, exactly
        out = _gpu_fp8_matmul(x_q.to(ctx.device), x_s.to(ctx.device), w.to(ctx.device), w_s.to(ctx.device))
        if out is None:
            continue
        gemm_ran += 1
        worst = max(worst, float((out.double().cpu() - ref).abs().max() / ref.abs().max()))
    figures = {"weights": len(weights), "dequant_bit_exact": exact_dequant, "gemm_checked": gemm_ran,
               "gemm_max_rel_err": worst, "tolerance": FP8_REL_TOL}
    summary = (f"{len(weights)} fp8 weights: device dequant bit-exact with CPU: {exact_dequant}; "
               f"fp8 GEMM on {gemm_ran}/{len(weights)}, max rel err {worst:.2e} (tol {FP8_REL_TOL})")
    if not exact_dequant or worst > FP8_REL_TOL:
        return CheckResult(name, FAIL, summary, figures)
    if gemm_ran == 0:
        return CheckResult(name, SKIP if ctx.device.type == "cpu" else FAIL,
                           summary + "; torch's blockwise fp8 GEMM did not run", figures)
    return CheckResult(name, PASS, summary, figures)


# ---------------------------------------------------------------- driver


# ---------------------------------------------------------------- verify: bf16 on the device vs fp32 on the CPU


@register("verify")
def check_verify(ctx: Context) -> CheckResult:
    """`crosschip verify` with ref = the tiny checkpoint on CPU fp32, target = the same on the device in bf16."""
    from crosschip.verify.run import VerifyOptions, run_verify

    name = "verify"
    if "bf16" not in devices.train_precisions(ctx.device):
        return CheckResult(name, SKIP, f"{ctx.device} has no native bf16")
    try:  # the foundation check's checkpoint when it ran first in this workdir
        ckpt = resolve_checkpoint_dir(ctx.workdir / "run")
    except CrosschipError:
        ckpt = _train_tiny(ctx)
    opts = VerifyOptions(ref=f"{ckpt}@cpu:fp32", target=f"{ckpt}@{ctx.device}:bf16", max_new_tokens=24,
                         report_dir=ctx.workdir / "verify-report", overwrite=True, certify=False)
    report = run_verify(opts, log)
    dist, layers = report.get("distribution") or {}, report.get("layers") or {}
    greedy = report.get("greedy") or {}
    figures = {k: dist.get(k) for k in ("kl_mean", "kl_mean_ci", "kl_p99", "kl_max", "top1_agreement",
                                        "top5_overlap", "ppl_ratio", "tokens")}
    figures |= {"greedy_identical": greedy.get("identical"), "greedy_prompts": greedy.get("prompts"),
                "first_failing_layer": layers.get("first_failing"), "gates": report["gates"]}
    summary = (f"{report['verdict']} ({report['precision']} gates): mean KL {dist.get('kl_mean', 0):.2e} nats, "
               f"p99 {dist.get('kl_p99', 0):.2e}, top-1 {dist.get('top1_agreement', 0):.3f}, "
               f"ppl ratio {dist.get('ppl_ratio', 0):.4f}, greedy identical "
               f"{greedy.get('identical')}/{greedy.get('prompts')}, first failing layer "
               f"{layers.get('first_failing')}")
    return CheckResult(name, PASS if report["verdict"] == "pass" else FAIL, summary, figures)


# ---------------------------------------------------------------- probe: the same run recorded on the device and on CPU

PROBE_STEPS = 20


@register("probe")
def check_probe(ctx: Context) -> CheckResult:
    """Record the same short tiny run with `--probe stats` on the device (bf16) and on the CPU (fp32), compare.

    bf16 rounds every matmul by up to 2^-9, and training amplifies that step by step, so the two runs are
    expected to leave the tolerance somewhere: that drift is reported (first diverging step and module),
    not failed. The check FAILs only on a NaN/Inf in either recording (or a non-finite loss): a healthy
    bf16 device run of this size has none, and when one appears the probe names the module and step.
    """
    from crosschip.probe.compare import compare_runs
    from crosschip.probe.report import write_probe_report

    name = "probe"
    if "bf16" not in devices.train_precisions(ctx.device):
        return CheckResult(name, SKIP, f"{ctx.device} has no native bf16")
    corpus, tok_dir = prepare_data(ctx.workdir, max_bytes=400_000, vocab_size=2048)
    runs = {}
    for side, device, precision in (("cpu", "cpu", "fp32"), ("device", str(ctx.device), "bf16")):
        cfg = TrainConfig(
            data=corpus, model="tiny", out=ctx.workdir / f"probe-{side}", device=device, precision=precision,
            steps=PROBE_STEPS, batch_size=8, seq_len=128, warmup_steps=5, tokenizer=tok_dir,
            eval_every=PROBE_STEPS, eval_batches=2, save_every=PROBE_STEPS, seed=ctx.seed, overwrite=True,
            cache_dir=ctx.workdir / "cache", probe="stats", probe_modules="*", probe_steps=None,
        )
        log(f"probe: training tiny for {PROBE_STEPS} steps in {precision} on {device} with --probe stats ...")
        result = train(cfg, NullReporter())
        runs[side] = (cfg.out, result.train_loss)
    cmp = compare_runs(runs["cpu"][0], runs["device"][0])
    paths = write_probe_report(cmp, ctx.workdir / "probe-report", overwrite=True)
    div, doc = cmp.first_divergence, cmp.to_dict()  # to_dict: plain JSON (non-finite floats as strings)
    figures: dict[str, Any] = {k: doc[k] for k in ("verdict", "aligned_rows", "divergent_rows", "first_divergence")}
    figures |= {f"{side}_{what}": doc[run][what] for side, run in (("cpu", "run_a"), ("device", "run_b"))
                for what in ("nonfinite_origin", "overflow_origin", "loss_nonfinite_step")}
    figures |= {"final_loss_cpu_fp32": runs["cpu"][1], "final_loss_device_bf16": runs["device"][1],
                "worst": doc["worst"][:3], "report": str(paths["html"])}
    where = "none" if div is None else (f"step {div.step} {div.module} ({div.kind}) {div.statistic}: rel diff "
                                       f"{div.rel_diff:.3g} > tol {div.tolerance:.3g}")
    origin = cmp.run_b.nonfinite_origin
    summary = (f"{cmp.verdict} over {cmp.aligned_rows} rows ({cmp.divergent_rows} out of tolerance; cross-precision "
               f"drift is expected and reported, not failed); first divergence: {where}; loss cpu fp32 "
               f"{runs['cpu'][1]:.4f} vs {ctx.device} bf16 {runs['device'][1]:.4f}; device NaN/Inf origin: "
               + ("none" if origin is None else f"step {origin.step} {origin.module} ({origin.kind})"))
    problems = [f"{label} run has NaN/Inf" for label, s in (("CPU fp32", cmp.run_a), ("device bf16", cmp.run_b))
                if s.nonfinite_origin is not None or s.loss_nonfinite_step is not None]
    if problems:
        summary += "; " + "; ".join(problems)
    return CheckResult(name, FAIL if problems else PASS, summary, figures)


# ---------------------------------------------------------------- distributed: FSDP2 + DCP on one device

DIST_STEPS = 2
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _process_group(device: torch.device) -> Iterator[None]:
    """The device's backend (nccl on cuda, gloo on cpu) over a world of 1, unless torchrun set the env.

    The variables it adds are removed afterwards: the other checks' Trainers read RANK/WORLD_SIZE and would
    otherwise believe they run under torchrun.
    """
    import torch.distributed as dist

    defaults = dict(zip(DIST_ENV, ("127.0.0.1", str(_free_port()), "0", "1", "0"), strict=True))
    added = [k for k in DIST_ENV if k not in os.environ]
    os.environ.update({k: defaults[k] for k in added})
    try:
        if device.type != "cpu":
            devices.local_device(str(device), int(os.environ["LOCAL_RANK"]))  # bind this rank's device first
        dist.init_process_group(devices.dist_backend(device), rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
        yield
    finally:
        if dist.is_initialized():
            dist.barrier()
            time.sleep(0.2)  # let gloo's threads drop finished works before teardown joins them
            dist.destroy_process_group()
        for k in added:
            os.environ.pop(k, None)


def _fsdp_run(ctx: Context, precision: str, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The tiny preset (vocab 512) on the device, wrapped by crosschip's FSDP2, with crosschip's optimizer."""
    from crosschip.models import build_model, get_preset
    from crosschip.train import parallel
    from crosschip.train.loop import make_optimizer

    model = build_model(get_preset("tiny").build_config(512, 1, 2, 0), seed).to(ctx.device)
    model = parallel.wrap(model, "fsdp", ctx.device, precision)
    return model, make_optimizer(model, _dist_config(ctx), ctx.device)


def _dist_config(ctx: Context) -> TrainConfig:
    return TrainConfig(data=ctx.workdir / "unused", model="tiny", out=ctx.workdir / "dist", batch_size=4,
                       seq_len=64, parallel="fsdp", seed=ctx.seed)


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Model and optimizer as full CPU tensors, flattened to one name -> tensor map (scalars as tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    flat: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in msd.items()}
    for name, state in osd["state"].items():
        flat |= {f"optim.{name}.{k}": torch.as_tensor(v) for k, v in state.items()}
    for i, group in enumerate(osd["param_groups"]):
        flat |= {f"group{i}.{k}": torch.as_tensor(v) for k, v in group.items() if isinstance(v, int | float)}
    return flat


def _unequal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    if a.keys() != b.keys():
        return sorted(a.keys() ^ b.keys())
    return [k for k in a if not torch.equal(a[k], b[k])]


def _save_reload_continue(ctx: Context, precision: str) -> dict[str, Any]:
    """Train DIST_STEPS, DCP-save, load into a differently initialised twin, compare, take one more step on each."""
    from crosschip.data import PackedBatches
    from crosschip.train.loop import train_step
    from crosschip.train.state import load_sharded, save_train_state

    cfg = _dist_config(ctx)
    tokens = np.random.default_rng(ctx.seed).integers(3, 512, size=50_000, dtype=np.int64)

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: PackedBatches) -> float:
        loss, _ = train_step(model, optimizer, None, loader, cfg, ctx.device, precision, None, "fsdp")
        return float(loss)

    model, optimizer = _fsdp_run(ctx, precision, ctx.seed)
    loader = PackedBatches(tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
    losses = [step(model, optimizer, loader) for _ in range(DIST_STEPS)]
    state_dir = ctx.workdir / "dist-state"
    t0 = time.perf_counter()
    save_train_state(state_dir, model, optimizer, 0, devices.get_rng_state(ctx.device), {"loader": loader.state_dict()})
    t1 = time.perf_counter()
    twin, twin_optimizer = _fsdp_run(ctx, precision, ctx.seed + 1)  # another init: the load must overwrite it all
    before = [k for k in _unequal(_full_state(model, optimizer), _full_state(twin, twin_optimizer))
              if k.startswith("model.")]
    t2 = time.perf_counter()
    load_sharded(state_dir, twin, twin_optimizer)
    load_s = time.perf_counter() - t2
    twin_loader = PackedBatches(tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
    twin_loader.load_state_dict(loader.state_dict())
    original = _full_state(model, optimizer)
    unequal = _unequal(original, _full_state(twin, twin_optimizer))
    continued, resumed = step(model, optimizer, loader), step(twin, twin_optimizer, twin_loader)
    return {
        "precision": precision, "world_size": torch.distributed.get_world_size(),
        "backend": torch.distributed.get_backend(), "losses": losses, "tensors_compared": len(original),
        "optimizer_tensors": sum(k.startswith("optim.") for k in original),
        "weights_differed_before_load": len(before), "unequal_after_load": unequal[:10],
        "next_loss_continued": continued, "next_loss_resumed": resumed, "save_s": t1 - t0, "load_s": load_s,
        "state_bytes": sum(f.stat().st_size for f in state_dir.rglob("*") if f.is_file()),
    }


@register("distributed")
def check_distributed(ctx: Context) -> CheckResult:
    """FSDP2 on the device over a 1-rank group: 2 steps, DCP save, reload into a fresh model, compare, continue.

    Everything must be bit-identical: the reload copies bytes, and the next step's forward runs the same
    kernels on the same weights and batch. (Weights after that step are not compared: CUDA's embedding
    backward accumulates with atomics, in no fixed order.)
    """
    import torch.distributed as dist

    name = "distributed"
    if not dist.is_available():
        return CheckResult(name, SKIP, "this torch build has no torch.distributed")
    precision = "bf16" if "bf16" in devices.train_precisions(ctx.device) else "fp32"
    with _process_group(ctx.device):
        f = _save_reload_continue(ctx, precision)
    problems = []
    if not f["weights_differed_before_load"]:
        problems.append("the fresh model already equalled the trained one: the reload proves nothing")
    if f["unequal_after_load"]:
        problems.append(f"not restored exactly: {', '.join(f['unequal_after_load'])}")
    if f["next_loss_continued"] != f["next_loss_resumed"]:
        problems.append("the next step's loss differs between the continued and the reloaded run")
    summary = (f"FSDP2 {f['precision']} over {f['backend']} (world {f['world_size']}): {DIST_STEPS} steps "
               f"(loss {f['losses'][0]:.4f} -> {f['losses'][-1]:.4f}), DCP save {f['save_s']:.2f} s / load "
               f"{f['load_s']:.2f} s ({f['state_bytes'] / 1e6:.1f} MB); {f['tensors_compared']} tensors "
               f"({f['optimizer_tensors']} optimizer) equal after reload: {not f['unequal_after_load']}; next "
               f"loss continued {f['next_loss_continued']:.6f} vs reloaded {f['next_loss_resumed']:.6f}")
    if problems:
        summary += "; " + "; ".join(problems)
    return CheckResult(name, FAIL if problems else PASS, summary, f)


@register("serve")
def check_serve(ctx: Context) -> CheckResult:
    """The serving engine on the device: paged cache + chunked prefill, greedy text equal to transformers."""
    from gpu_serve import check_serve as serve_check

    return serve_check(ctx, CheckResult, PASS, FAIL)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="device to check (default: cuda; cpu for a dry run)")
    p.add_argument("--require", action="store_true", help="without the device: fail (exit 1), not skip")
    p.add_argument("--check", action="append", choices=sorted(CHECKS), help="run only these (repeatable)")
    p.add_argument("--workdir", type=Path, default=None, help="keep corpus, run and checkpoints here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    return p.parse_args(argv)


def available_device(spec: str) -> torch.device | None:
    """The device, or None if this machine has none of that kind (a bad spelling still raises)."""
    kind = devices.parse_device(spec).kind
    if kind != "auto" and not devices.is_available(kind):
        return None
    return devices.resolve_device(spec)


def run_checks(names: list[str], ctx: Context) -> list[CheckResult]:
    results = []
    for name in names:
        try:
            results.append(CHECKS[name](ctx))
        except CrosschipError as e:  # bad environment or input: a failed check, not a traceback
            results.append(CheckResult(name, FAIL, f"error: {e}"))
    return results


def report(results: list[CheckResult], device: str, as_json: bool, extra: dict[str, Any]) -> None:
    if as_json:
        print_json({"device": device, **extra, "checks": [asdict(r) for r in results]})
        return
    for r in results:
        print(f"{r.status} {r.name}: {r.summary}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.check or list(CHECKS)
    try:
        device = available_device(args.device)
    except CrosschipError as e:
        print(f"error: {e}", file=sys.stderr)
        return CrosschipError.exit_code
    if device is None:
        status = FAIL if args.require else SKIP
        why = f"no {devices.parse_device(args.device).kind} device"
        results = [CheckResult(n, status, why) for n in names]
        report(results, args.device, args.json, {"machine": machine(torch.device("cpu"))})
        if not args.json:
            print(f"{'FAILED' if args.require else 'SKIPPED'}: {why}")
        return 1 if args.require else 0
    if args.workdir is not None:
        results = run_checks(names, Context(device, args.workdir, args.seed))
    else:
        with tempfile.TemporaryDirectory(prefix="crosschip-gpu-check-") as tmp:
            results = run_checks(names, Context(device, Path(tmp), args.seed))
    report(results, str(device), args.json, {"machine": machine(device)})
    return 1 if any(r.status == FAIL for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
