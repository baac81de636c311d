"""Convert throughput: FP8-block -> bf16 with crosschip, against DeepSeek's whole-shard script and a plain copy.

On one synthetic multi-GB FP8-block checkpoint in the DeepSeek-V3 layout (float8_e4m3fn weights with
fp32 `_scale_inv` per 128x128 block, bf16 embeddings/norms/router, fp32 `e_score_correction_bias`,
DeepSeek-V3 tensor shapes with fewer layers, experts and vocabulary), it measures:
  copy       `shutil.copyfile` of every source file: what the disk allows
  reference  DeepSeek-V3 `inference/fp8_cast_bf16.py` on the CPU: for each shard `load_file` the
             whole shard, dequantize every fp8 weight with its `_scale_inv` (looked up through the
             index, in whichever shard it lives, keeping the 2 most recent shards loaded as the script
             does), `save_file` the shard, write the index without the scales
  crosschip  `crosschip.convert.pipeline.convert(..., ConvertOptions(fmt="bf16"))`, as `crosschip
             convert SRC DST --to bf16` runs it
Each runs in its own fresh process (so its peak RSS, VmHWM, is its own), after the page cache is
dropped when that is allowed, and each is timed until `os.sync()` returns (bytes on disk: crosschip
fsyncs its output anyway, the others would otherwise be timed into the page cache).

    python benchmarks/convert_throughput.py [--gb 2.5] [--shard-gb 1] [--repeat 1] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

HIDDEN = 7168  # DeepSeek-V3 hidden_size; the other widths below are DeepSeek-V3's too
MOE_INTER, Q_LORA, KV_LORA, ROPE, NOPE, V_HEAD, HEADS = 2048, 1536, 512, 64, 128, 128, 128
EXPERTS = 8  # DeepSeek-V3 has 256 routed experts per layer; 8 keep a layer at ~0.58 GB of fp8
VOCAB = 129280 // 8  # DeepSeek-V3's vocabulary scaled down: the bf16 embedding stays a large tensor
BLOCK = 128
INDEX = "model.safetensors.index.json"
TARGET_SPEED = 0.7  # crosschip >= 0.7x the copy's bytes moved per second
TARGET_RSS = 2.0  # crosschip's peak RSS above its baseline <= 2x the largest output tensor
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
METHODS = ("copy", "reference", "crosschip")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ synthetic checkpoint


def layer_shapes(i: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """One DeepSeek-V3 MoE decoder layer: name -> (shape, kind), kind fp8 / bf16 / fp32."""
    p = f"model.layers.{i}"
    out: dict[str, tuple[tuple[int, ...], str]] = {
        f"{p}.input_layernorm.weight": ((HIDDEN,), "bf16"),
        f"{p}.self_attn.q_a_proj.weight": ((Q_LORA, HIDDEN), "fp8"),
        f"{p}.self_attn.q_a_layernorm.weight": ((Q_LORA,), "bf16"),
        f"{p}.self_attn.q_b_proj.weight": ((HEADS * (NOPE + ROPE), Q_LORA), "fp8"),
        f"{p}.self_attn.kv_a_proj_with_mqa.weight": ((KV_LORA + ROPE, HIDDEN), "fp8"),  # 576 rows: a partial block
        f"{p}.self_attn.kv_a_layernorm.weight": ((KV_LORA,), "bf16"),
        f"{p}.self_attn.kv_b_proj.weight": ((HEADS * (NOPE + V_HEAD), KV_LORA), "fp8"),
        f"{p}.self_attn.o_proj.weight": ((HIDDEN, HEADS * V_HEAD), "fp8"),
        f"{p}.post_attention_layernorm.weight": ((HIDDEN,), "bf16"),
        f"{p}.mlp.gate.weight": ((EXPERTS, HIDDEN), "bf16"),
        f"{p}.mlp.gate.e_score_correction_bias": ((EXPERTS,), "fp32"),
    }
    for expert in [f"experts.{e}" for e in range(EXPERTS)] + ["shared_experts"]:
        out[f"{p}.mlp.{expert}.gate_proj.weight"] = ((MOE_INTER, HIDDEN), "fp8")
        out[f"{p}.mlp.{expert}.up_proj.weight"] = ((MOE_INTER, HIDDEN), "fp8")
        out[f"{p}.mlp.{expert}.down_proj.weight"] = ((HIDDEN, MOE_INTER), "fp8")
    return out


def model_shapes(gb: float) -> dict[str, tuple[tuple[int, ...], str]]:
    """Embedding, enough layers for ~`gb` GB of fp8 weights, final norm and lm_head."""
    per_layer = sum(math.prod(s) for s, kind in layer_shapes(0).values() if kind == "fp8")
    layers = max(1, round(gb * 1e9 / per_layer))
    shapes = {"model.embed_tokens.weight": ((VOCAB, HIDDEN), "bf16")}
    for i in range(layers):
        shapes.update(layer_shapes(i))
    shapes["model.norm.weight"] = ((HIDDEN,), "bf16")
    shapes["lm_head.weight"] = ((VOCAB, HIDDEN), "bf16")
    return shapes


def random_tensor(shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> torch.Tensor:
    if kind == "fp8":
        codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
        codes[(codes & 0x7F) == 0x7F] -= 1  # 0x7f / 0xff are e4m3fn NaN: use the largest finite codes
        return torch.from_numpy(codes).view(torch.float8_e4m3fn)
    values = torch.from_numpy(rng.standard_normal(size=shape, dtype=np.float32)) * 0.02
    return values if kind == "fp32" else values.to(torch.bfloat16)


def write_checkpoint(root: Path, gb: float, shard_gb: float, seed: int = 0) -> dict[str, Any]:
    """Write the checkpoint (config, shards of ~shard_gb GB, index); returns its description."""
    rng = np.random.default_rng(seed)
    shapes = model_shapes(gb)
    root.mkdir(parents=True)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    files: list[str] = []

    def flush() -> None:
        files.append(f"model-{len(files) + 1:05d}.safetensors")
        save_file(shard, root / files[-1], metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, files[-1]))
        shard.clear()

    for name, (shape, kind) in shapes.items():
        tensor = random_tensor(shape, kind, rng)
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > shard_gb * 1e9:
            flush()
        shard[name] = tensor
        if kind == "fp8":
            grid = (math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK))
            shard[name + "_scale_inv"] = torch.from_numpy(rng.uniform(1e-4, 1e-3, size=grid).astype(np.float32))
    flush()
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": HIDDEN,
              "num_hidden_layers": sum(1 for n in shapes if n.endswith(".input_layernorm.weight")),
              "vocab_size": VOCAB, "n_routed_experts": EXPERTS, "moe_intermediate_size": MOE_INTER,
              "torch_dtype": "bfloat16", "quantization_config": FP8_CONFIG}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    total = sum((root / f).stat().st_size for f in files)
    (root / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    fp8 = sum(math.prod(s) for s, kind in shapes.values() if kind == "fp8")
    largest = max(math.prod(s) * 2 for s, _ in shapes.values())  # every output tensor is bf16 (2 bytes) or tiny
    return {"layers": config["num_hidden_layers"], "tensors": len(weight_map), "shards": len(files),
            "fp8_bytes": fp8, "source_bytes": total, "largest_out_bytes": largest}


# ------------------------------------------------------------------------------ the three methods


def reference_convert(src: Path, dst: Path) -> None:
    """DeepSeek-V3 `fp8_cast_bf16.py`, on the CPU: whole shards in, whole shards out."""
    dst.mkdir()
    weight_map = json.loads((src / INDEX).read_text())["weight_map"]
    loaded: dict[str, dict[str, torch.Tensor]] = {}  # the script's cache of loaded shards

    def get_tensor(name: str) -> torch.Tensor:
        file = weight_map[name]
        if file not in loaded:
            loaded[file] = load_file(src / file)
        return loaded[file][name]

    fp8_names = []
    for path in sorted(src.glob("*.safetensors")):
        state = load_file(path)
        loaded[path.name] = state
        new_state = {}
        for name, weight in state.items():
            if name.endswith("_scale_inv"):
                continue
            if weight.element_size() == 1:  # an fp8 weight
                fp8_names.append(name)
                new_state[name] = weight_dequant(weight, get_tensor(name + "_scale_inv"))
            else:
                new_state[name] = weight
        save_file(new_state, dst / path.name)
        if len(loaded) > 2:  # "keep only the 2 most recently used files"
            del loaded[next(iter(loaded))]
    for name in fp8_names:
        weight_map.pop(name + "_scale_inv", None)
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def weight_dequant(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Triton `weight_dequant` kernel's arithmetic on the CPU: w.float() * its block's scale, to bf16."""
    rows, cols = w.shape
    scale = s.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return (w.to(torch.float32) * scale).to(torch.bfloat16)


def crosschip_convert(src: Path, dst: Path) -> None:
    from crosschip.convert.pipeline import ConvertOptions, convert

    convert(src, dst, ConvertOptions(fmt="bf16"))


def copy_files(src: Path, dst: Path) -> None:
    dst.mkdir()
    for path in sorted(src.iterdir()):
        shutil.copyfile(path, dst / path.name)


def proc_status(field: str) -> int:
    """A size from /proc/self/status in bytes: VmRSS (resident now) or VmHWM (peak resident).

    VmHWM, not `getrusage().ru_maxrss`: Linux carries ru_maxrss across exec from the process that
    forked, so a child started by a big parent would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(method: str, src: Path, dst: Path) -> None:
    """Run one method in this (fresh) process and print its figures as JSON on stdout."""
    import crosschip.convert.pipeline  # noqa: F401 - every method pays the same imports before the clock starts

    run = {"copy": copy_files, "reference": reference_convert, "crosschip": crosschip_convert}[method]
    baseline = proc_status("VmRSS")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    run(src, dst)
    returned = time.perf_counter() - start
    os.sync()
    synced = time.perf_counter() - start
    peak = proc_status("VmHWM")
    usage = resource.getrusage(resource.RUSAGE_SELF)  # CPU times are this process's own (unlike ru_maxrss)
    print(json.dumps({"method": method, "seconds": synced, "seconds_unsynced": returned,
                      "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu_before,
                      "baseline_rss": baseline, "peak_rss": peak}))


# ------------------------------------------------------------------------------ measuring and reporting


def drop_caches() -> bool:
    """Drop the page cache so every method reads its source from the disk (needs root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("*.safetensors"))


def measure(method: str, src: Path, dst: Path, cold: bool) -> dict[str, Any]:
    if dst.exists():
        shutil.rmtree(dst)
    dropped = drop_caches() if cold else False
    proc = subprocess.run([sys.executable, __file__, "--child", method, str(src), str(dst)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result |= {"cold": dropped, "read_bytes": dir_bytes(src), "written_bytes": dir_bytes(dst)}
    return result


def compared_names(names: list[str]) -> list[str]:
    """What `check_same_output` compares: everything outside the layers, all of layer 0, the last o_proj."""
    last = max(int(n.split(".")[2]) for n in names if n.startswith("model.layers."))
    return [n for n in names if not n.startswith("model.layers.") or n.startswith("model.layers.0.")
            or n == f"model.layers.{last}.self_attn.o_proj.weight"]


def check_same_output(ref: Path, ours: Path) -> tuple[int, list[str]]:
    """Same tensor names, and a sample of tensors equal bit for bit: (tensors compared, differences)."""
    ref_map = json.loads((ref / INDEX).read_text())["weight_map"]
    our_map = json.loads((ours / INDEX).read_text())["weight_map"]
    if set(ref_map) != set(our_map):
        return 0, [f"tensor names differ, e.g. {sorted(set(ref_map) ^ set(our_map))[:3]}"]
    problems = []
    names = compared_names(sorted(ref_map))
    for name in names:
        with safe_open(ref / ref_map[name], "pt") as f, safe_open(ours / our_map[name], "pt") as g:
            a, b = f.get_tensor(name), g.get_tensor(name)
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            problems.append(f"{name}: {a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)}")
    return len(names), problems


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest repeat (other load on the machine only ever adds time), with the highest peak RSS seen."""
    fastest = dict(min(runs, key=lambda r: r["seconds"]))
    fastest["peak_rss"] = max(r["peak_rss"] for r in runs)
    return fastest


def speeds(r: dict[str, Any]) -> tuple[float, float]:
    """(source GB/s, GB moved (read + written) per s)."""
    return r["read_bytes"] / r["seconds"] / 1e9, (r["read_bytes"] + r["written_bytes"]) / r["seconds"] / 1e9


def report(info: dict[str, Any], results: dict[str, dict[str, Any]], check: tuple[int, list[str]]) -> list[str]:
    gb = 1e9
    lines = [f"synthetic DeepSeek-V3-like FP8-block checkpoint: {info['layers']} layers, {info['tensors']} tensors, "
             f"{info['shards']} shards, {info['source_bytes'] / gb:.2f} GB ({info['fp8_bytes'] / gb:.2f} GB fp8); "
             f"largest output tensor {info['largest_out_bytes'] / 2**20:.0f} MiB (bf16)",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
             f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}",
             "page cache dropped before each run: " + ("yes" if all(r["cold"] for r in results.values())
                                                      else "no (warm page cache)"),
             "times end when os.sync() returns; GB/s src = source bytes / s, moved = (read + written) / s",
             f"{'method':10s} {'seconds':>8s} {'unsynced':>8s} {'CPU s':>6s} {'src GB/s':>9s} {'moved GB/s':>10s} "
             f"{'written GB':>10s} {'peak RSS':>9s} {'baseline':>9s} {'peak-base':>9s}"]
    for name, r in results.items():
        src, moved = speeds(r)
        lines.append(f"{name:10s} {r['seconds']:8.2f} {r['seconds_unsynced']:8.2f} {r['cpu_seconds']:6.1f} "
                     f"{src:9.3f} {moved:10.3f} "
                     f"{r['written_bytes'] / gb:10.2f} {r['peak_rss'] / 2**20:8.0f}M {r['baseline_rss'] / 2**20:8.0f}M "
                     f"{(r['peak_rss'] - r['baseline_rss']) / 2**20:8.0f}M")
    ours = results["crosschip"]
    for other in ("copy", "reference"):
        if other in results:
            (s1, m1), (s2, m2) = speeds(ours), speeds(results[other])
            lines.append(f"crosschip / {other}: {s1 / s2:.2f}x source bytes/s, {m1 / m2:.2f}x bytes moved/s, "
                         f"peak RSS {ours['peak_rss'] / results[other]['peak_rss']:.2f}x")
    above = (ours["peak_rss"] - ours["baseline_rss"]) / info["largest_out_bytes"]
    lines.append(f"crosschip peak RSS / largest tensor: {ours['peak_rss'] / info['largest_out_bytes']:.2f}x "
                 f"(above the interpreter's baseline: {above:.2f}x)")
    if "copy" in results:
        ratio = speeds(ours)[1] / speeds(results["copy"])[1]
        lines.append(f"target: >= {TARGET_SPEED}x copy (bytes moved/s): {'met' if ratio >= TARGET_SPEED else 'MISSED'}"
                     f" ({ratio:.2f}x)")
    lines.append(f"target: peak RSS above baseline <= {TARGET_RSS}x largest tensor: "
                 f"{'met' if above <= TARGET_RSS else 'MISSED'} ({above:.2f}x)")
    if check[0] or check[1]:
        verdict = "identical" if not check[1] else "DIFFERENT: " + "; ".join(check[1][:5])
        lines.append(f"crosschip vs reference output, {check[0]} tensors compared bit for bit: {verdict}")
    return lines


def prepare_source(work: Path, gb: float, shard_gb: float) -> dict[str, Any]:
    """The checkpoint in work/src: reused when an earlier run (--keep) wrote one of the same size."""
    src, record = work / "src", work / "src.json"
    if record.is_file() and src.is_dir():
        saved = json.loads(record.read_text())
        if saved.get("gb") == gb and saved.get("shard_gb") == shard_gb:
            log(f"reusing the checkpoint in {src}")
            return saved["info"]
    if src.exists():
        shutil.rmtree(src)
    log(f"writing a ~{gb} GB fp8 checkpoint to {src}")
    info = write_checkpoint(src, gb, shard_gb)
    record.write_text(json.dumps({"gb": gb, "shard_gb": shard_gb, "info": info}))
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.5, help="fp8 weight bytes of the checkpoint, in GB")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="source shard size in GB")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each method (the fastest is reported)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache between runs")
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoint and outputs go")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (a later run reuses its checkpoint)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "SRC", "DST"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return 0
    methods = [m for m in args.methods.split(",") if m]
    if "crosschip" not in methods or not set(methods) <= set(METHODS):
        raise SystemExit(f"--methods must include crosschip and name only {', '.join(METHODS)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="crosschip-convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        info = prepare_source(work, args.gb, args.shard_gb)
        src = work / "src"
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for i in range(args.repeat):
            for m in methods:
                log(f"run {i + 1}/{args.repeat}: {m}")
                runs[m].append(measure(m, src, work / m, cold=not args.warm))
        results = {m: best(r) for m, r in runs.items()}
        check = check_same_output(work / "reference", work / "crosschip") if "reference" in methods else (0, [])
        if args.json:
            print(json.dumps({"checkpoint": info, "results": results, "differences": check[1]}, indent=2))
        else:
            print("\n".join(report(info, results, check)))
        return 1 if check[1] else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
