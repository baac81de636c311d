"""DenseRunner's CPU decode kernel: a whole pure-decode step in one C++ call (`csrc/dense_decode.cpp`).

On a CPU a batch-1 decode step of the torch path is ~50 small ops per layer whose dispatch (5-10 us each)
costs about as much as streaming the weights; the kernel runs the step's projections as register-tiled
dot products split across torch's intra-op threads and everything in between as plain loops, so a step
costs little more than its weight reads. It is built on first use on the machine that runs it (a C++
compiler and ninja are needed; ~30 s once, then cached by torch under TORCH_EXTENSIONS_DIR) and used only
for float32 on the CPU, for steps whose every sequence decodes one token. Prefill and mixed steps, and
every other device and format, run DenseRunner's torch ops (on GPUs: CUDA graphs are the analogue).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from crosschip.errors import CrosschipError

if TYPE_CHECKING:
    from crosschip.serve.paged import StepBatch
    from crosschip.serve.runner import DenseRunner

log = logging.getLogger("crosschip.serve")

KERNELS = ("auto", "cpp", "torch")
SOURCE = Path(__file__).with_name("csrc") / "dense_decode.cpp"
BUILD_NOTICE_S = 3.0  # a load still running after this long is a build: say so


def _cflags() -> list[str]:
    """Optimise for the CPU that builds it (which is the one that runs it); let a*b+c become FMAs."""
    machine = platform.machine().lower()
    native = {"x86_64": "-march=native", "amd64": "-march=native", "aarch64": "-mcpu=native"}.get(machine)
    return ["-O3", "-fopenmp", "-ffp-contract=fast", *([native] if native else [])]


@functools.cache
def load_extension() -> ModuleType:
    """The compiled kernel module, built once per machine and source; CrosschipError when it cannot be built."""
    from torch.utils import cpp_extension

    # The CPU capability is part of the name: a cache directory shared between machines must not hand an
    # AVX-512 build to an AVX2 CPU.
    name = f"crosschip_dense_decode_{torch.backends.cpu.get_cpu_capability().lower()}"
    # A cached build loads in well under a second; a server that seems to hang for 30 s at its first start on a
    # machine must say why (stderr, not a logger: nothing configures logging for `crosschip serve`).
    notice = threading.Timer(BUILD_NOTICE_S, lambda: print(
        f"building the CPU decode kernel {name} (once per machine, ~30 s)", file=sys.stderr, flush=True))
    notice.start()
    try:
        # OpenMP comes from the libgomp torch already loaded (no -fopenmp at link: one runtime, one thread pool).
        return cpp_extension.load(name, [str(SOURCE)], extra_cflags=_cflags(), verbose=False)
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CrosschipError(
            f"cannot build the CPU decode kernel ({first})",
            "install a C++ compiler and ninja, or serve with --decode-kernel torch",
        ) from e
    finally:
        notice.cancel()


def check_kernel_name(kernel: str) -> None:
    """A one-line error for a --decode-kernel value that is not auto, cpp or torch."""
    if kernel not in KERNELS:
        raise CrosschipError(f"unknown decode kernel {kernel!r}", f"use one of {', '.join(KERNELS)}")


def kernel_problem(runner: DenseRunner, compile: bool, int8: bool) -> str | None:
    """Why the kernel cannot run this runner's decode steps, or None when it can."""
    if runner.device.type != "cpu":
        return f"it runs on the CPU, the model is on {runner.device}"
    if runner.dtype != torch.float32:
        return f"it computes in float32, the model is {runner.dtype}"
    if int8:
        return "W8A8 projections run on int8 kernels"
    if compile:
        return "--compile runs the torch ops through inductor"
    if any(layer.act is not torch.nn.functional.silu for layer in runner.layers):
        return "the MLP activation is not SiLU"
    projs = [p for layer in runner.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    if any(getattr(p, "nn", False) for p in [*projs, runner.lm_head]):
        return "it streams [out, in] weights, the nn layout stores [in, out]"
    return None


def _spare_core() -> bool:
    """Whether a core is left over beside the intra-op threads, for the server's event loop to run on.

    With one, the kernel releases the GIL so that streaming overlaps the step. Without one, it keeps the GIL:
    the event loop then runs between steps instead of pre-empting a thread mid-projection, which every other
    thread waits for (2-core VM, `base` at 1 concurrent: 188-193 tok/s against 171-174 released)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return torch.get_num_threads() < cores


class DenseDecodeKernel:
    """The kernel bound to one DenseRunner's weights, RoPE tables and KV cache (shared, not copied)."""

    def __init__(self, runner: DenseRunner) -> None:
        empty = torch.empty(0)
        tensors: list[torch.Tensor] = []
        eps: list[float] = []
        for layer in runner.layers:
            for norm, projs in ((layer.norm1, (layer.qkv, layer.o)), (layer.norm2, (layer.gate_up, layer.down))):
                tensors.append(norm.contiguous())
                for proj in projs:
                    tensors += [proj.w, empty if proj.b is None else proj.b.contiguous()]
            eps += [layer.eps1, layer.eps2]
        lm = runner.lm_head
        self._impl = load_extension().DenseDecode(
            runner.embed.contiguous(), tensors, eps, runner.norm.contiguous(), runner.norm_eps, lm.w,
            empty if lm.b is None else lm.b.contiguous(), runner.cos.contiguous(), runner.sin_signed.contiguous(),
            runner.k_cache, runner.v_cache, runner.n_heads, runner.n_kv, runner.head_dim, runner.block_size,
            runner.scale, _spare_core(),
        )

    def __call__(self, batch: StepBatch) -> torch.Tensor:
        """Logits [B, V] of a step in which every sequence decodes one token; writes their K/V."""
        return self._impl.decode(batch.tokens, batch.decode_tables, batch.context_lens)
