"""Tests for crosschip.check.code: the CUDA-only usage scan of real script files on disk."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from crosschip.check.code import (
    CSV_HEADER,
    FAIL,
    WARN,
    Finding,
    findings_csv,
    findings_table,
    scan_paths,
    scan_source,
)
from crosschip.errors import CrosschipError

# Every CUDA-only pattern the scan knows, one per line; `# expect: PATTERN SEVERITY` (';' between several)
# marks what must be reported on that line. Comments are invisible to `ast`, so the markers cannot match.
CUDA_SCRIPT = '''\
"""Training script written for NVIDIA only. This docstring says torch.cuda.synchronize() and .cuda()."""
import os

import torch
import torch as t
import torch.distributed as dist
from torch import cuda
from torch.cuda.amp import autocast, GradScaler
from torch.utils.cpp_extension import load_inline, load, CUDAExtension, BuildExtension
import apex  # expect: import apex FAIL
from apex import amp  # expect: import apex FAIL
from apex.optimizers import FusedAdam  # expect: import apex FAIL
from apex.normalization import FusedLayerNorm  # expect: import apex FAIL
from flash_attn import flash_attn_func  # expect: import flash_attn FAIL
import triton  # expect: import triton WARN
import triton.language as tl  # expect: import triton WARN
import xformers.ops  # expect: import xformers FAIL


@triton.jit
def add_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):  # expect: triton.jit FAIL
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def main(rank, q, k, v, opt, SRC):
    # t.cuda.synchronize() in a comment is not code
    t.cuda.synchronize()  # expect: torch.cuda.synchronize FAIL
    ok = cuda.is_available()  # expect: torch.cuda.is_available WARN
    n = torch.cuda.device_count()  # expect: torch.cuda.device_count WARN
    torch.cuda.set_device(rank)  # expect: torch.cuda.set_device FAIL
    torch.cuda.empty_cache()  # expect: torch.cuda.empty_cache WARN
    peak = torch.cuda.max_memory_allocated()  # expect: torch.cuda.max_memory_allocated WARN
    torch.cuda.manual_seed(0)  # expect: torch.cuda.manual_seed WARN
    torch.cuda.manual_seed_all(0)  # expect: torch.cuda.manual_seed_all WARN
    stream = torch.cuda.Stream()  # expect: torch.cuda.Stream FAIL
    event = torch.cuda.Event(enable_timing=True)  # expect: torch.cuda.Event FAIL
    graph = torch.cuda.CUDAGraph()  # expect: torch.cuda.CUDAGraph FAIL
    with torch.cuda.graphs.graph(graph):  # expect: torch.cuda.graphs.graph FAIL
        pass
    torch.cuda.nvtx.range_push("step")  # expect: torch.cuda.nvtx.range_push WARN
    model = torch.nn.Linear(4, 4).cuda()  # expect: .cuda() FAIL
    x = torch.randn(2, 4, device="cuda")  # expect: cuda-device-literal FAIL
    x = x.to("cuda:0")  # expect: cuda-device-literal FAIL
    x = x.to(f"cuda:{rank}")  # expect: cuda-device-literal FAIL
    x = x.to("cuda:%d" % rank)  # expect: cuda-device-literal FAIL
    x = x.to("cuda:{}".format(rank))  # expect: cuda-device-literal FAIL
    dev = torch.device("cuda")  # expect: cuda-device-literal FAIL
    with torch.cuda.amp.autocast():  # expect: torch.cuda.amp.autocast FAIL
        y = model(x)
    with autocast(dtype=torch.float16):  # expect: torch.cuda.amp.autocast FAIL
        y = model(x)
    scaler = GradScaler()  # expect: torch.cuda.amp.GradScaler FAIL
    model, opt = amp.initialize(model, opt, opt_level="O1")  # expect: apex.amp.initialize FAIL
    opt = FusedAdam(model.parameters())  # expect: apex.optimizers.FusedAdam FAIL
    norm = FusedLayerNorm(4)  # expect: apex.normalization.FusedLayerNorm FAIL
    out = flash_attn_func(q, k, v, causal=True)  # expect: flash_attn.flash_attn_func FAIL
    out = xformers.ops.memory_efficient_attention(q, k, v)  # expect: xformers.ops.memory_efficient_attention FAIL
    add_kernel[(1,)](x, y, 4, BLOCK=4)
    dist.init_process_group("nccl")  # expect: nccl FAIL
    dist.init_process_group(backend="nccl")  # expect: nccl FAIL
    if dist.get_backend() == "nccl":  # expect: nccl-comparison WARN
        pass
    torch.backends.cudnn.benchmark = True  # expect: torch.backends.cudnn.benchmark WARN
    torch.backends.cudnn.deterministic = True  # expect: torch.backends.cudnn.deterministic WARN
    ext = load_inline(name="e", cpp_sources="", cuda_sources=SRC)  # expect: torch.utils.cpp_extension.load_inline FAIL
    ext = load(name="e2", sources=["e2.cpp", "e2_kernel.cu"])  # expect: torch.utils.cpp_extension.load FAIL
    ext3 = CUDAExtension("e3", ["e3.cu"])  # expect: torch.utils.cpp_extension.CUDAExtension FAIL
    cmd = {"build_ext": BuildExtension}  # expect: torch.utils.cpp_extension.BuildExtension WARN
    os.environ["CUDA_VISIBLE_DEVICES"] = "0"  # expect: cuda-env WARN
    if torch.cuda.is_available():  # expect: torch.cuda.is_available WARN
        model = model.cuda()  # expect: .cuda() WARN
    return ok, n, peak, stream, event, dev, y, scaler, norm, out, ext, ext3, cmd
'''

# Device-agnostic code doing the same jobs; runnable on this CPU-only machine.
PORTABLE_SCRIPT = '''\
"""Portable step. Mentions torch.cuda.synchronize(), .cuda(), flash_attn and device="cuda" only here."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from crosschip.devices import resolve_device

# torch.cuda.amp.autocast() and dist.init_process_group("nccl") in a comment are not code.


def step(world: int = 1) -> float:
    device = resolve_device("auto")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=None)  # each device's default: nccl, hccl or gloo
    proj = torch.nn.Linear(8, 8).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type != "cpu")
    x = torch.randn(1, 2, 4, 8, device=device)  # x: [B, H, T, D]
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        q = proj(x)
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    loss = scaler.scale(out.float().pow(2).mean())
    loss.backward()
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()
    return float(loss)


if __name__ == "__main__":
    print("loss", step())
'''


def _expected(source: str) -> set[tuple[int, str, str]]:
    """(line, pattern, severity) from the `# expect:` markers."""
    out = set()
    for number, line in enumerate(source.splitlines(), start=1):
        if "# expect:" in line:
            for item in line.split("# expect:")[1].split(";"):
                pattern, severity = item.strip().rsplit(" ", 1)
                out.add((number, pattern, severity))
    return out


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _rows(findings: list[Finding]) -> set[tuple[int, str, str]]:
    return {(f.line, f.pattern, f.severity) for f in findings}


def test_every_cuda_pattern_is_reported_on_its_line(tmp_path: Path) -> None:
    script = _write(tmp_path / "train_cuda.py", CUDA_SCRIPT)
    findings = scan_paths([script])
    expected = _expected(CUDA_SCRIPT)
    assert len(expected) >= 45
    assert _rows(findings) == expected
    assert all(f.file == str(script) and f.message and f.fix for f in findings)
    assert findings == sorted(findings, key=lambda f: (f.file, f.line, f.col))


def test_fixes_name_the_portable_replacement(tmp_path: Path) -> None:
    findings = {f.pattern: f for f in scan_source(CUDA_SCRIPT, "train.py")}
    assert "torch.accelerator.synchronize()" in findings["torch.cuda.synchronize"].fix
    assert "installed torch" in findings["torch.cuda.synchronize"].fix
    assert "torch.npu.set_device" in findings["torch.cuda.set_device"].fix
    assert "torch.autocast(device_type=device.type" in findings["torch.cuda.amp.autocast"].fix
    assert "torch.amp.GradScaler(device.type)" in findings["torch.cuda.amp.GradScaler"].fix
    assert "scaled_dot_product_attention" in findings["flash_attn.flash_attn_func"].fix
    assert "npu_fusion_attention" in findings["flash_attn.flash_attn_func"].fix
    assert "scaled_dot_product_attention" in findings["xformers.ops.memory_efficient_attention"].fix
    assert "AdamW" in findings["apex.optimizers.FusedAdam"].fix
    assert "torch.nn.LayerNorm" in findings["apex.normalization.FusedLayerNorm"].fix
    assert "hccl" in findings["nccl"].fix
    assert "Triton-Ascend" in findings["triton.jit"].fix and "add_kernel" in findings["triton.jit"].message
    assert 'resolve_device("auto")' in findings[".cuda()"].fix
    assert 'device.type == "cuda"' in findings["torch.backends.cudnn.benchmark"].fix
    assert "ASCEND_RT_VISIBLE_DEVICES" in findings["cuda-env"].fix


def test_portable_script_has_no_findings_and_runs(tmp_path: Path) -> None:
    script = _write(tmp_path / "train_portable.py", PORTABLE_SCRIPT)
    assert scan_paths([script]) == []
    # The clean script is real, working code: run it on this CPU-only machine.
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("loss ")


def test_aliases_are_resolved() -> None:
    source = """\
        import torch.cuda.amp as tamp
        from torch.cuda import amp as camp, nvtx
        from torch import backends as bk
        import torch.distributed as d
        from torch.utils import cpp_extension as cx
        tamp.GradScaler()
        camp.autocast()
        nvtx.range_pop()
        bk.cudnn.benchmark = False
        flag = d.Backend.NCCL == d.get_backend()
        d.init_process_group(d.Backend.NCCL)
        cx.load_inline("ops", cpp_sources="int f() { return 1; }")
    """
    got = _rows(scan_source(textwrap.dedent(source), "a.py"))
    assert got == {
        (6, "torch.cuda.amp.GradScaler", FAIL),
        (7, "torch.cuda.amp.autocast", FAIL),
        (8, "torch.cuda.nvtx.range_pop", WARN),
        (9, "torch.backends.cudnn.benchmark", WARN),
        (10, "nccl-comparison", WARN),
        (11, "torch.distributed.Backend.NCCL", FAIL),
        (12, "torch.utils.cpp_extension.load_inline", WARN),  # C++ only: builds anywhere
    }


def test_comments_docstrings_and_text_do_not_trigger() -> None:
    source = '''\
        """Module doc: call torch.cuda.synchronize() and model.cuda() with device="cuda" and nccl."""
        import torch


        def f(args, device):
            """Function doc: torch.backends.cudnn.benchmark = True; import flash_attn."""
            # torch.cuda.empty_cache(); x.cuda(); dist.init_process_group("nccl")
            print("cuda")
            if str(device).startswith("cuda"):
                pass
            use = args.cuda and device.type == "cuda"
            msg = "pass --device cuda to run on a GPU"
            return use, msg, {"cuda", "nccl"}
    '''
    assert scan_source(textwrap.dedent(source), "doc.py") == []


def test_guarded_code_is_reported_as_warn() -> None:
    source = """\
        import torch
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if not torch.cuda.is_available():
            x = torch.zeros(1)
        else:
            x = torch.zeros(1).cuda()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.cuda.synchronize()
        torch.cuda.synchronize()
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            flash_attn_func = None
        out = flash_attn_func(x, x, x)
    """
    findings = scan_source(textwrap.dedent(source), "g.py")
    assert _rows(findings) == {
        (2, "cuda-device-literal", WARN),
        (2, "torch.cuda.is_available", WARN),
        (3, "torch.cuda.is_available", WARN),
        (6, ".cuda()", WARN),
        (8, "torch.backends.cudnn.benchmark", WARN),
        (9, "torch.cuda.synchronize", WARN),
        (10, "torch.cuda.synchronize", FAIL),  # outside the guard
        (12, "import flash_attn", WARN),
        (15, "flash_attn.flash_attn_func", WARN),
    }
    guarded = [f for f in findings if f.line in (2, 6, 9) and f.pattern != "torch.cuda.is_available"]
    assert all("guarded" in f.message for f in guarded)
    assert all("optional" in f.message for f in findings if f.line in (12, 15))


def test_cuda_call_is_located_on_its_own_line_and_column() -> None:
    source = "import torch\nmodel = (torch.nn.Linear(2, 2)\n         .cuda())\n"
    [finding] = scan_source(source, "m.py")
    assert (finding.line, finding.col, finding.pattern) == (3, 10, ".cuda()")


def test_directory_scan_finds_cuda_and_cpp_sources(tmp_path: Path) -> None:
    root = tmp_path / "project"
    _write(root / "train.py", "import torch\ntorch.cuda.synchronize()\n")
    _write(root / "csrc" / "kernel.cu", "__global__ void k(float* x) { x[0] = 1; }\n")
    _write(root / "csrc" / "kernel.cuh", "#pragma once\n")
    _write(root / "csrc" / "ops.cpp", """\
        #include <torch/extension.h>
        #include <ATen/cuda/CUDAContext.h>
        // TORCH_LIBRARY(commented, m) {}
        TORCH_LIBRARY(myops, m) { m.def("f(Tensor x) -> Tensor"); }
        TORCH_LIBRARY_IMPL(myops, CUDA, m) { m.impl("f", &f_cuda); }
    """)
    _write(root / "csrc" / "cpu_only.cc", """\
        #include <torch/extension.h>
        /* PYBIND11_MODULE(commented, m) {} */
        PYBIND11_MODULE(cpu_ops, m) { m.def("f", &f); }
    """)
    _write(root / "README.md", "torch.cuda.synchronize()\n")
    _write(root / ".venv" / "lib" / "dep.py", "import torch\ntorch.cuda.synchronize()\n")
    _write(root / "env" / "pyvenv.cfg", "home = /usr\n")
    _write(root / "env" / "lib" / "dep.py", "import torch\ntorch.cuda.synchronize()\n")
    findings = scan_paths([root])
    got = {(Path(f.file).relative_to(root).as_posix(), f.line, f.pattern, f.severity) for f in findings}
    assert got == {
        ("train.py", 2, "torch.cuda.synchronize", FAIL),
        ("csrc/kernel.cu", 1, "cuda-source", FAIL),
        ("csrc/kernel.cuh", 1, "cuda-source", FAIL),
        ("csrc/ops.cpp", 2, "cuda-include", FAIL),
        ("csrc/ops.cpp", 4, "TORCH_LIBRARY", FAIL),
        ("csrc/ops.cpp", 5, "TORCH_LIBRARY_IMPL", FAIL),
        ("csrc/cpu_only.cc", 3, "PYBIND11_MODULE", WARN),
    }
    assert [f.file for f in findings] == sorted(f.file for f in findings)


def test_syntax_error_and_unreadable_files_give_warnings(tmp_path: Path) -> None:
    broken = _write(tmp_path / "broken.py", "import torch\n\ndef f(:\n    torch.cuda.synchronize()\n")
    binary = tmp_path / "blob.py"
    binary.write_bytes(b"\x00\x01\x02torch.cuda")
    latin = tmp_path / "latin.py"
    latin.write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    findings = scan_paths([broken, binary, latin])
    assert [(Path(f.file).name, f.line, f.pattern, f.severity) for f in findings] == [
        ("blob.py", 1, "unreadable", WARN),
        ("broken.py", 3, "syntax-error", WARN),
        ("latin.py", 1, "unreadable", WARN),
    ]
    assert "not checked" in findings[1].message


def test_missing_path_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(CrosschipError, match="no_such.py"):
        scan_paths([tmp_path / "no_such.py"])


def test_csv_round_trips_with_header(tmp_path: Path) -> None:
    findings = scan_source(CUDA_SCRIPT, "dir, with comma/train.py")
    text = findings_csv(findings)
    assert text.endswith("\r\n")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert tuple(rows[0]) == CSV_HEADER
    assert rows[1:] == [
        [f.file, str(f.line), str(f.col), f.pattern, f.severity, f.message, f.fix] for f in findings
    ]
    assert any('"' in f.fix for f in findings)  # quotes and commas survive the trip
    assert findings_csv([]) == ",".join(CSV_HEADER) + "\r\n"


def test_table_has_one_row_per_finding_and_keeps_brackets() -> None:
    findings = scan_source("from flash_attn import flash_attn_func\nflash_attn_func(1, 2, 3)\n", "attn.py")
    table = findings_table(findings)
    assert table.row_count == len(findings) == 2
    console = Console(file=io.StringIO(), width=300, color_system=None)
    console.print(table)
    rendered = console.file.getvalue()
    assert "attn.py:2:1" in rendered and "FAIL" in rendered
    assert "[B, H, T, D]" in rendered  # fix text is shown literally, not eaten as markup
