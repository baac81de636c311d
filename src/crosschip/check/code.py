"""Static scan of training/serving scripts for CUDA-only usage, each finding with a portable fix.

Python files are walked with ``ast`` (so comments and docstrings never match) and names are
resolved through the file's imports (``import torch as t``, ``from torch.cuda.amp import autocast``).
C++ sources are scanned line by line with regexes. The output is meant to read like the GPU->NPU
migration reports users know: one row per line to change, as a table or CSV.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import functools
import io
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table
from rich.text import Text

from crosschip.errors import CrosschipError

FAIL, WARN = "FAIL", "WARN"
CUDA_SUFFIXES = (".cu", ".cuh")
CPP_SUFFIXES = (".cpp", ".cc", ".cxx", ".h", ".hpp")
SCANNED_SUFFIXES = (".py", *CUDA_SUFFIXES, *CPP_SUFFIXES)
CSV_HEADER = ("file", "line", "column", "pattern", "severity", "message", "fix")

# Directories that hold installed or generated code, not the user's scripts.
_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", "dist-packages"}
# Packages whose import alone fails off NVIDIA (no wheels for other devices). triton is WARN:
# Triton-Ascend exists, only the kernels need porting.
_CUDA_PACKAGES = {"apex": FAIL, "flash_attn": FAIL, "xformers": FAIL, "triton": WARN}
_CUDA_DEVICE_RE = re.compile(r"^cuda(:\d+)?$")
_BACKEND_SPEC_RE = re.compile(r"^[a-z]+:[a-z]+(,[a-z]+:[a-z]+)+$")  # "cpu:gloo,cuda:nccl"
_ENV_FIX = {"CUDA_VISIBLE_DEVICES": "ASCEND_RT_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF": "PYTORCH_NPU_ALLOC_CONF"}
_ENV_RE = re.compile(r"^(CUDA_VISIBLE_DEVICES|CUDA_LAUNCH_BLOCKING|PYTORCH_CUDA_ALLOC_CONF|NCCL_[A-Z0-9_]+)$")
# Calls whose string arguments are text or predicates, not a device choice.
_TEXT_SINKS = {"print", "startswith", "endswith", "replace", "split", "find", "count", "format", "join",
               "debug", "info", "warning", "warn", "error", "critical", "exception", "log", "write", "echo"}
_CPP_LOADERS = {"torch.utils.cpp_extension.load", "torch.utils.cpp_extension.load_inline"}
_NCCL_ENUM = "torch.distributed.Backend.NCCL"
_RESOLVE = '`device = crosschip.devices.resolve_device("auto")`'


@dataclass(frozen=True)
class Finding:
    """One CUDA-only usage: where it is (1-based line and column), how bad, and the portable fix."""

    file: str
    line: int
    col: int
    pattern: str
    severity: str  # FAIL | WARN
    message: str
    fix: str


@dataclass(frozen=True)
class _Rule:
    severity: str
    message: str
    fix: str


# ---------------------------------------------------------------- rules


@functools.lru_cache(maxsize=1)
def _torch_accelerator() -> tuple[str, frozenset[str]]:
    """Installed torch version and its torch.accelerator names, so fixes only promise what exists."""
    import torch  # deferred: only fixes that mention torch.accelerator need it

    names = frozenset(n for n in dir(getattr(torch, "accelerator", None) or object()) if not n.startswith("_"))
    return torch.__version__, names


def _accel(call: str) -> str:
    """``torch.accelerator.<call>`` and whether the installed torch has that function."""
    version, names = _torch_accelerator()
    where = "in" if call.split("(")[0] in names else "not in"
    return f"`torch.accelerator.{call}` ({where} the installed torch {version}; torch.accelerator began in 2.6)"


def _npu(call: str) -> str:
    return f"on Ascend `torch.npu.{call}` (torch_npu mirrors torch.cuda)"


def _put(r: dict[str, _Rule], keys: str, severity: str, message: str, fix: str) -> None:
    """Add one rule under each space-separated key."""
    for key in keys.split():
        r[key] = _Rule(severity, message, fix)


@functools.lru_cache(maxsize=1)
def _rules() -> dict[str, _Rule]:
    """Qualified name (the longest dotted prefix wins) -> rule."""
    r: dict[str, _Rule] = {}
    _torch_cuda_rules(r)
    _torch_cuda_more_rules(r)
    _backend_rules(r)
    _third_party_rules(r)
    return r


def _torch_cuda_rules(r: dict[str, _Rule]) -> None:
    """torch.cuda device, memory and RNG calls (behaviour without CUDA checked on a CPU build of torch)."""
    raises = "raises without CUDA"
    _put(r, "torch.cuda", FAIL, "CUDA-only torch.cuda API",
         f"the device-generic torch.accelerator API or {_npu('*')}; "
         "`from torch_npu.contrib import transfer_to_npu` patches torch.cuda wholesale as a stopgap")
    _put(r, "torch.cuda.is_available", WARN,
         "sees NVIDIA GPUs only: False on Ascend, so the script quietly takes its CPU path",
         f"{_accel('is_available()')} or {_RESOLVE}")
    _put(r, "torch.cuda.device_count", WARN, "counts NVIDIA GPUs only (0 on Ascend)",
         f"{_accel('device_count()')} or {_npu('device_count()')}")
    for name, accel, npu in (("current_device", "current_device_index()", "current_device()"),
                             ("set_device", "set_device_index(i)", "set_device(i)"),
                             ("reset_peak_memory_stats", "reset_peak_memory_stats()", "reset_peak_memory_stats()"),
                             ("mem_get_info", "get_memory_info()", "mem_get_info()")):
        _put(r, f"torch.cuda.{name}", FAIL, raises, f"{_accel(accel)} or {_npu(npu)}")
    _put(r, "torch.cuda.synchronize", FAIL, raises,
         f"{_accel('synchronize()')} or `crosschip.devices.synchronize(device)`")
    _put(r, "torch.cuda.empty_cache", WARN, "a no-op without CUDA: the accelerator's cache is never freed",
         f"{_accel('empty_cache()')} or {_npu('empty_cache()')}")
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved", "memory_stats"):
        _put(r, f"torch.cuda.{name}", WARN, "reads 0 without CUDA: memory reports are wrong on other devices",
             f"{_accel(name + '()')}, `crosschip.devices.memory_info(device)` or {_npu(name + '()')}")
    _put(r, "torch.cuda.manual_seed torch.cuda.manual_seed_all", WARN,
         "seeds CUDA only: other accelerators keep an unseeded generator",
         "`torch.manual_seed(seed)` seeds the CPU and every device backend (CUDA, XPU, MPS, torch_npu's NPU)")
    for name in ("get_rng_state", "set_rng_state"):
        _put(r, f"torch.cuda.{name}", FAIL, "CUDA generator only",
             f"`crosschip.devices.{name}(device)` or {_npu(name + '()')}")
    for name in ("get_device_name", "get_device_properties", "get_device_capability"):
        _put(r, f"torch.cuda.{name}", FAIL, raises,
             f"`crosschip.devices.device_name(device)` or {_npu(name + '()')}")
    _put(r, "torch.cuda.is_bf16_supported", WARN, "False without CUDA, even on chips with native bf16",
         f"`crosschip.devices.train_precisions(device)` or {_npu('is_bf16_supported()')}")


def _torch_cuda_more_rules(r: dict[str, _Rule]) -> None:
    """torch.cuda streams, graphs, profiling, tensor types and torch.cuda.amp."""
    for name in ("Stream", "Event", "stream", "current_stream", "default_stream", "StreamContext"):
        _put(r, f"torch.cuda.{name}", FAIL, "CUDA streams/events raise without CUDA",
             f"`torch.Stream(device)` / `torch.Event(device=device)`, {_accel('current_stream()')} or {_npu(name)}")
    _put(r, "torch.cuda.graphs torch.cuda.graph torch.cuda.CUDAGraph torch.cuda.make_graphed_callables", FAIL,
         "CUDA graphs exist only on CUDA",
         f"{_accel('Graph')}; keep an eager path for other devices; "
         "on Ascend `torch.npu.NPUGraph` / `torch.npu.graph` / `torch.npu.make_graphed_callables`")
    _put(r, "torch.cuda.nvtx", WARN, "NVTX ranges only show up in NVIDIA profilers",
         "`torch.profiler.record_function(name)` (device-generic)")
    types = "Float Half BFloat16 Double Long Int Bool Byte"
    _put(r, " ".join(f"torch.cuda.{t}Tensor" for t in types.split()), FAIL, "legacy CUDA tensor type",
         "`torch.tensor(..., dtype=..., device=device)` / `x.to(device, dtype)`")
    _put(r, "torch.cuda.amp", FAIL, "torch.cuda.amp is CUDA-only (and deprecated)",
         "the `torch.amp` equivalent with `device_type=device.type`")
    _put(r, "torch.cuda.amp.autocast", FAIL, "torch.cuda.amp.autocast switches itself off without CUDA: fp32 runs",
         "`torch.autocast(device_type=device.type, dtype=...)` or `crosschip.devices.autocast(device, precision)`")
    _put(r, "torch.cuda.amp.GradScaler", FAIL,
         "torch.cuda.amp.GradScaler disables itself without CUDA: fp16 gradients go unscaled",
         "`torch.amp.GradScaler(device.type)` or `crosschip.devices.make_grad_scaler(device, precision)`")
    for name in ("custom_fwd", "custom_bwd"):
        _put(r, f"torch.cuda.amp.{name}", FAIL, "CUDA-only autocast decorator",
             f"`torch.amp.{name}(device_type=device.type)`")


def _backend_rules(r: dict[str, _Rule]) -> None:
    """cuDNN / CUDA backend flags, the nccl enum and torch.utils.cpp_extension."""
    guard = 'guard with `if device.type == "cuda":` (harmless elsewhere, but it does nothing there)'
    _put(r, "torch.backends.cudnn", WARN, "cuDNN setting: ignored on other devices", guard)
    _put(r, "torch.backends.cudnn.deterministic", WARN, "makes only cuDNN deterministic",
         f"`torch.use_deterministic_algorithms(True)` covers every backend; {guard}")
    _put(r, "torch.backends.cuda", WARN, "CUDA backend setting: ignored on other devices", guard)
    _put(r, "torch.backends.cudnn.allow_tf32 torch.backends.cuda.matmul.allow_tf32", WARN,
         "TF32 switch for NVIDIA only", '`torch.set_float32_matmul_precision("high")` (device-generic)')
    sdp = "sdp_kernel enable_flash_sdp enable_mem_efficient_sdp enable_math_sdp"
    _put(r, " ".join(f"torch.backends.cuda.{n}" for n in sdp.split()), WARN, "selects CUDA sdpa kernels",
         "`torch.nn.attention.sdpa_kernel(...)`, or let sdpa pick per device")
    _put(r, _NCCL_ENUM, FAIL, "hard-codes the NVIDIA-only nccl backend", _NCCL_FIX)
    ext = "torch.utils.cpp_extension"
    _put(r, f"{ext}.CUDAExtension", FAIL, "custom CUDA extension: nvcc-built kernels run on NVIDIA only", _PORT)
    _put(r, f"{ext}.BuildExtension", WARN, "builds custom C++/CUDA extensions",
         f"make sure no extension is CUDA-only; else {_PORT}")
    _put(r, f"{ext}.load {ext}.load_inline", WARN,
         "JIT-built C++ extension: CPU kernels only, needs a compiler on the target", _PORT)


_PORT = "port it (Ascend C / torch_npu custom op) or add a pure-torch fallback dispatched on `device.type`"
_NCCL_FIX = ("`dist.init_process_group(backend=None)` picks each device's default (nccl on CUDA, gloo on CPU, "
             "hccl on Ascend once torch_npu is imported), or name `hccl` on Ascend")
_SDPA = ("`torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=...)` (q/k/v as [B, H, T, D]); "
         "on Ascend `torch_npu.npu_fusion_attention`")


def _third_party_rules(r: dict[str, _Rule]) -> None:
    """apex / flash_attn / xformers: NVIDIA-only packages with torch-native replacements."""
    _put(r, "apex", FAIL, "NVIDIA apex: CUDA-only extensions", "the torch.amp / torch.optim / torch.nn equivalent")
    _put(r, "apex.amp", FAIL, "apex.amp is CUDA-only",
         "`torch.autocast(device_type=device.type, dtype=...)` plus `torch.amp.GradScaler(device.type)`")
    _put(r, "apex.optimizers", FAIL, "apex fused optimizer is CUDA-only",
         "`torch.optim` with `fused=True` / `foreach=True` where the device supports it")
    _put(r, "apex.optimizers.FusedAdam", FAIL, "apex FusedAdam is CUDA-only",
         "`torch.optim.AdamW(params, fused=crosschip.devices.fused_adamw_supported(device))`; "
         "on Ascend `torch_npu.optim.NpuFusedAdamW`")
    _put(r, "apex.normalization", FAIL, "apex fused norm is CUDA-only", "`torch.nn.LayerNorm` / `torch.nn.RMSNorm`")
    _put(r, "apex.normalization.FusedLayerNorm", FAIL, "apex FusedLayerNorm is CUDA-only", "`torch.nn.LayerNorm`")
    _put(r, "apex.normalization.FusedRMSNorm", FAIL, "apex FusedRMSNorm is CUDA-only",
         "`torch.nn.RMSNorm` (torch >= 2.4)")
    _put(r, "apex.parallel", FAIL, "apex.parallel is CUDA-only",
         "`torch.nn.parallel.DistributedDataParallel` / `torch.nn.SyncBatchNorm`")
    _put(r, "flash_attn", FAIL, "flash-attn kernels run on NVIDIA only", _SDPA)
    _put(r, "xformers", FAIL, "xformers kernels run on NVIDIA only", _SDPA)


def _match(qualname: str) -> str | None:
    """Longest rule key that is a dotted prefix of ``qualname``."""
    rules, parts = _rules(), qualname.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in rules:
            return key
    return None


def _literal_rule(text: str) -> tuple[str, _Rule] | None:
    """(pattern, rule) for a string constant used as an argument or assigned value (not a comparison)."""
    if _CUDA_DEVICE_RE.match(text):
        return "cuda-device-literal", _Rule(FAIL, f"hard-coded device {text!r}",
                                            f"{_RESOLVE} and pass `device` / `device.type`")
    if text == "nccl":
        return "nccl", _Rule(FAIL, "nccl as the only distributed backend (NVIDIA-only)", _NCCL_FIX)
    if _BACKEND_SPEC_RE.match(text) and "nccl" in text and "npu:" not in text:
        return "nccl", _Rule(WARN, f"backend map {text!r} has no Ascend entry",
                             "add `npu:hccl`, or pass `backend=None`")
    if _ENV_RE.match(text):
        fix = _ENV_FIX.get(text, "the HCCL_* / ASCEND_* equivalent")
        return "cuda-env", _Rule(WARN, f"{text} only affects NVIDIA GPUs / NCCL", f"on Ascend `{fix}`")
    return None


def _string_of(node: ast.AST | None) -> str | None:
    """A string constant's text; "cuda:0" for a formatted "cuda:N" (f"cuda:{i}", "cuda:%d" % i, .format)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    head: ast.AST | None = None
    if isinstance(node, ast.JoinedStr) and node.values:
        head = node.values[0]
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        head = node.left
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        head = node.func.value
    if isinstance(head, ast.Constant) and isinstance(head.value, str) and head.value.startswith("cuda:"):
        return "cuda:0"
    return None


def _catches_import_error(handlers: list[ast.ExceptHandler]) -> bool:
    """Whether a try statement swallows a failed import (ImportError or anything broader)."""
    broad = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
    for handler in handlers:
        if handler.type is None:
            return True
        names = {n.attr if isinstance(n, ast.Attribute) else n.id
                 for n in ast.walk(handler.type) if isinstance(n, (ast.Name, ast.Attribute))}
        if names & broad:
            return True
    return False


# ---------------------------------------------------------------- Python scan


class _Scanner(ast.NodeVisitor):
    """Collects findings for one module; tracks import aliases and CUDA-guarded regions."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.findings: list[Finding] = []
        self.aliases: dict[str, tuple[str, bool]] = {}  # local name -> (qualified name, optional import)
        self.guards = 0  # depth of `if <CUDA check>:` branches around the current node
        self.optional_imports = False  # inside `try: ... except ImportError:`

    def emit(self, node: ast.AST, pattern: str, rule: _Rule, optional: bool = False, at: tuple[int, int] = (0, 0),
             ) -> None:
        """Record a finding at ``node`` (or 1-based ``at``); FAIL drops to WARN when guarded or optional."""
        severity, message = rule.severity, rule.message
        if severity == FAIL and self.guards:
            severity, message = WARN, f"guarded by a CUDA check: {message}"
        elif severity == FAIL and optional:
            severity, message = WARN, f"optional (import guarded by try/except ImportError): {message}"
        line, col = at if at[0] else (getattr(node, "lineno", 1), getattr(node, "col_offset", 0) + 1)
        self.findings.append(Finding(self.file, line, col, pattern, severity, message, rule.fix))

    def resolve(self, node: ast.AST) -> tuple[str, bool] | None:
        """(qualified dotted name, via optional import) of a Name/Attribute chain, through the imports."""
        attrs: list[str] = []
        while isinstance(node, ast.Attribute):
            attrs.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        base, optional = self.aliases.get(node.id, (node.id, False))
        return ".".join([base, *reversed(attrs)]), optional

    def qualname(self, node: ast.AST) -> str:
        resolved = self.resolve(node)
        return resolved[0] if resolved else ""

    @contextlib.contextmanager
    def guarded(self, on: bool) -> Iterator[None]:
        self.guards += int(on)
        try:
            yield
        finally:
            self.guards -= int(on)

    def mentions_cuda(self, expr: ast.AST) -> bool:
        """Whether a condition tests for CUDA: availability, device type, backend, a *cuda* flag."""
        for node in ast.walk(expr):
            text = _string_of(node)
            if text is not None and (_CUDA_DEVICE_RE.match(text) or text == "nccl"):
                return True
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
            if "cuda" in name.lower():
                return True
        return False

    def guard_side(self, test: ast.AST) -> str | None:
        """Which branch of ``if test`` runs only with CUDA: 'body', 'orelse' or None."""
        swap = {"body": "orelse", "orelse": "body", None: None}
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            return swap[self.guard_side(test.operand)]
        if isinstance(test, ast.BoolOp):
            # `a and cuda` guards the body; `not cuda or a` guards the else branch.
            want = "body" if isinstance(test.op, ast.And) else "orelse"
            return want if any(self.guard_side(v) == want for v in test.values) else None
        if not self.mentions_cuda(test):
            return None
        if isinstance(test, ast.Compare):
            op = test.ops[0] if len(test.ops) == 1 else None
            if isinstance(op, (ast.NotEq, ast.IsNot, ast.NotIn)):
                return "orelse"
            return "body" if isinstance(op, (ast.Eq, ast.Is, ast.In, ast.Gt, ast.GtE)) else None
        return "body"

    def check_value(self, node: ast.AST | None) -> None:
        """String literals where a value is chosen: call arguments, assignments, defaults, returns."""
        if isinstance(node, ast.IfExp):
            side = self.guard_side(node.test)
            with self.guarded(side == "body"):
                self.check_value(node.body)
            with self.guarded(side == "orelse"):
                self.check_value(node.orelse)
            return
        text = _string_of(node)
        hit = _literal_rule(text) if text is not None else None
        if node is not None and hit:
            self.emit(node, *hit)

    # -- imports and try

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            top = alias.name.split(".")[0]  # `import a.b` binds `a`; `import a.b as c` binds c -> a.b
            self.aliases[alias.asname or top] = (alias.name if alias.asname else top, self.optional_imports)
            self.import_finding(node, top)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module:
            return  # relative imports are the user's own modules
        for alias in node.names:
            self.aliases[alias.asname or alias.name] = (f"{node.module}.{alias.name}", self.optional_imports)
        self.import_finding(node, node.module.split(".")[0])

    def import_finding(self, node: ast.stmt, top: str) -> None:
        """Importing an NVIDIA-only package fails by itself off NVIDIA (no wheels elsewhere)."""
        if top not in _CUDA_PACKAGES:
            return
        if _CUDA_PACKAGES[top] == WARN:
            rule = _Rule(WARN, f"imports {top}: its kernels target NVIDIA's backend",
                         "see the kernels reported below; Triton-Ascend compiles Triton on Ascend, "
                         "but NVIDIA-tuned kernels need porting")
        else:
            rule = _Rule(FAIL, f"imports {top}, which has no build for non-NVIDIA devices (ImportError there)",
                         _rules()[top].fix)
        self.emit(node, f"import {top}", rule, optional=self.optional_imports)

    def visit_Try(self, node: ast.Try) -> None:
        before = self.optional_imports
        self.optional_imports = before or _catches_import_error(node.handlers)
        for stmt in node.body:
            self.visit(stmt)
        self.optional_imports = before
        for part in (*node.handlers, *node.orelse, *node.finalbody):
            self.visit(part)

    visit_TryStar = visit_Try

    # -- statements: guards, literals, kernels

    def visit_If(self, node: ast.If | ast.IfExp) -> None:
        self.visit(node.test)
        side = self.guard_side(node.test)
        for branch, stmts in (("body", node.body), ("orelse", node.orelse)):
            with self.guarded(side == branch):
                for stmt in stmts if isinstance(stmts, list) else [stmts]:
                    self.visit(stmt)

    visit_IfExp = visit_If

    def visit_Assign(self, node: ast.Assign | ast.AnnAssign | ast.Return) -> None:
        self.check_value(node.value)
        self.generic_visit(node)

    visit_AnnAssign = visit_Return = visit_Assign

    def visit_Subscript(self, node: ast.Subscript) -> None:
        text = _string_of(node.slice)
        if text is not None and _ENV_RE.match(text):
            self.check_value(node.slice)  # os.environ["CUDA_VISIBLE_DEVICES"]
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for default in (*node.args.defaults, *node.args.kw_defaults):
            self.check_value(default)
        jit = any(self.qualname(d.func if isinstance(d, ast.Call) else d) == "triton.jit" for d in node.decorator_list)
        if jit:
            self.emit(node, "triton.jit", _Rule(
                FAIL, f"Triton kernel `{node.name}`: written and tuned for NVIDIA GPUs",
                "keep a torch reference implementation and dispatch on `device.type`; on Ascend port it to "
                "Triton-Ascend (retune NVIDIA block sizes / num_warps) or use the vendor kernel"))
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    # -- expressions

    def visit_Compare(self, node: ast.Compare) -> None:
        operands = [node.left, *node.comparators]
        nccl = [o for o in operands if _string_of(o) == "nccl" or self.qualname(o) == _NCCL_ENUM]
        if nccl:
            self.emit(node, "nccl-comparison", _Rule(
                WARN, "branches on the nccl backend: on Ascend (hccl) the other branch runs",
                "branch on `device.type`, or treat hccl like nccl"))
        for operand in operands:
            if all(operand is not n for n in nccl):
                self.visit(operand)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = self.qualname(func)
        if isinstance(func, ast.Attribute) and func.attr == "cuda":
            rule = _Rule(FAIL, "`.cuda()` moves to an NVIDIA GPU unconditionally (raises elsewhere)",
                         f"`.to(device)` with {_RESOLVE}")
            # Point at ".cuda" itself: in a chain split over lines the call's start line is elsewhere.
            at = (func.end_lineno or func.lineno, max((func.end_col_offset or 0) - len("cuda"), 1))
            self.emit(func, ".cuda()", rule, at=at)
            self.visit(func.value)
        elif name in _CPP_LOADERS:
            self.emit(func, name, self.cpp_loader_rule(node))
        else:
            self.visit(func)
        sink = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        for arg in (*node.args, *(kw.value for kw in node.keywords)):
            if sink not in _TEXT_SINKS:
                self.check_value(arg)
            self.visit(arg)

    def cpp_loader_rule(self, node: ast.Call) -> _Rule:
        """load/load_inline: FAIL when CUDA sources or with_cuda=True are passed, else WARN."""
        cuda = any(_string_of(sub) and str(_string_of(sub)).endswith(CUDA_SUFFIXES) for sub in ast.walk(node))
        for kw in node.keywords:
            value = kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
            cuda = cuda or (kw.arg == "cuda_sources" and value is not None) or (kw.arg == "with_cuda" and value is True)
        base = _rules()["torch.utils.cpp_extension.load"]
        return _Rule(FAIL, "JIT-built CUDA extension: nvcc kernels run on NVIDIA only", base.fix) if cuda else base

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if not self.usage(node):
            self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.usage(node)

    def usage(self, node: ast.Attribute | ast.Name) -> bool:
        """Report the longest name chain that matches a rule; True stops descent into the chain."""
        resolved = self.resolve(node)
        key = _match(resolved[0]) if resolved else None
        if resolved is None or key is None:
            return False
        self.emit(node, resolved[0], _rules()[key], optional=resolved[1])
        return True


def scan_source(text: str, file: str) -> list[Finding]:
    """Findings for one Python source; a file that does not parse gives one WARN, not an exception."""
    try:
        tree = ast.parse(text, filename=file)
    except SyntaxError as err:
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        return [Finding(file, err.lineno or 1, err.offset or 1, "syntax-error", WARN,
                        f"not parsed ({err.msg}): its CUDA usage was not checked",
                        f"make it valid Python {py} (the Python running crosschip)")]
    scanner = _Scanner(file)
    try:
        scanner.visit(tree)
    except RecursionError:
        scanner.findings.append(Finding(file, 1, 1, "too-deep", WARN, "nested too deeply to scan", "review by hand"))
    return sorted(set(scanner.findings), key=_sort_key)


# ---------------------------------------------------------------- C++ / CUDA sources

_CPP_INCLUDE_RE = re.compile(
    r"^\s*#\s*include\s*[<\"](cuda|cublas|cudnn|cufft|curand|cusparse|nccl|nvrtc|thrust/|cub/"
    r"|ATen/cuda/|c10/cuda/|ATen/native/cuda/)")
_CPP_CUDA_RE = re.compile(r"__global__|<<<|\bkCUDA\b|\bat::cuda::|\bc10::cuda::|\bcudaStream_t\b")
_CPP_REGISTER_RE = re.compile(r"\b(TORCH_LIBRARY(?:_FRAGMENT|_IMPL)?|PYBIND11_MODULE)\s*\(([^)]*)")
_CPP_PORT = "port the kernels (Ascend C / torch_npu custom op) or add a pure-torch fallback"


def _strip_cpp_comments(text: str) -> str:
    """Blank out // and /* */ comments, keeping line numbers."""
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group().count("\n"), text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def scan_cpp(text: str, file: str) -> list[Finding]:
    """CUDA includes and op registrations; a registration is FAIL when its file also holds CUDA code."""
    lines = _strip_cpp_comments(text).splitlines()
    has_cuda = any(_CPP_INCLUDE_RE.search(s) or _CPP_CUDA_RE.search(s) for s in lines)
    out: list[Finding] = []
    for number, line in enumerate(lines, start=1):
        include = _CPP_INCLUDE_RE.search(line)
        if include:
            out.append(Finding(file, number, 1, "cuda-include", FAIL,
                               f"includes the CUDA header {include.group(1)}...", _CPP_PORT))
        for match in _CPP_REGISTER_RE.finditer(line):
            macro, col = match.group(1), match.start() + 1
            cuda_key = macro == "TORCH_LIBRARY_IMPL" and re.search(r"\bCUDA\b", match.group(2))
            if cuda_key or has_cuda:
                out.append(Finding(file, number, col, macro, FAIL, "custom op bound to CUDA kernels",
                                   f"{_CPP_PORT}; register a PrivateUse1 (NPU) or CPU implementation"))
            else:
                out.append(Finding(file, number, col, macro, WARN, "custom C++ op: CPU kernels only, built per target",
                                   "rebuild it on the target, and add NPU kernels or a pure-torch fallback"))
    return out


# ---------------------------------------------------------------- files


def _sort_key(f: Finding) -> tuple[str, int, int, str]:
    return f.file, f.line, f.col, f.pattern


def _walk(root: Path) -> list[Path]:
    """Scannable files under ``root``, skipping hidden dirs, caches and virtual environments."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS
                             and not (Path(dirpath) / d / "pyvenv.cfg").exists())
        found.extend(Path(dirpath) / n for n in sorted(filenames) if n.endswith(SCANNED_SUFFIXES))
    return found


def _read(path: Path) -> str | Finding:
    """Text of a source file, or a WARN finding when it is binary, not UTF-8 or unreadable."""
    try:
        data = path.read_bytes()
        if b"\0" in data:
            raise ValueError("binary file")
        return data.decode("utf-8-sig")
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        reason = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else str(err)
        return Finding(str(path), 1, 1, "unreadable", WARN, f"skipped: {reason}", "save it as UTF-8 text to scan it")


def scan_file(path: Path) -> list[Finding]:
    """Findings for one file, by suffix; an unknown suffix (a script named `train`) is read as Python."""
    if path.suffix == ".ipynb":
        return [Finding(str(path), 1, 1, "notebook", WARN, "notebooks are not scanned",
                        "export it first: `jupyter nbconvert --to script`")]
    text = _read(path)
    if isinstance(text, Finding):
        return [text]
    if path.suffix in CUDA_SUFFIXES:
        return [Finding(str(path), 1, 1, "cuda-source", FAIL,
                        "CUDA source file: nvcc-compiled kernels run on NVIDIA only", _CPP_PORT)]
    if path.suffix in CPP_SUFFIXES:
        return scan_cpp(text, str(path))
    return scan_source(text, str(path))


def scan_paths(paths: list[Path]) -> list[Finding]:
    """Scan files and directories (recursively); findings sorted by (file, line, col)."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise CrosschipError(f"no such file or directory: {', '.join(missing)}",
                             fix="pass existing scripts or directories")
    findings: set[Finding] = set()
    for path in map(Path, paths):
        for file in _walk(path) if path.is_dir() else [path]:
            findings.update(scan_file(file))
    return sorted(findings, key=_sort_key)


# ---------------------------------------------------------------- output


def findings_csv(findings: list[Finding]) -> str:
    """CSV with a header row, RFC 4180 quoting and CRLF line ends (the csv module's defaults)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_HEADER)
    for f in findings:
        writer.writerow((f.file, f.line, f.col, f.pattern, f.severity, f.message, f.fix))
    return buf.getvalue()


def findings_table(findings: list[Finding]) -> Table:
    """Rich table, one row per finding: location, severity, pattern, problem, portable replacement."""
    table = Table(title=f"CUDA-only code: {len(findings)} finding(s)")
    for column in ("Location", "Severity", "Pattern", "Problem", "Portable replacement"):
        table.add_column(column, overflow="fold", no_wrap=column == "Location")
    for f in findings:
        # Text, not markup: messages contain brackets such as "[B, H, T, D]".
        style = "red" if f.severity == FAIL else "yellow"
        table.add_row(Text(f"{f.file}:{f.line}:{f.col}"), Text(f.severity, style=style), Text(f.pattern),
                      Text(f.message), Text(f.fix))
    return table
