"""The direct launch path (LORA_KERNELS_DIRECT_LAUNCH=1) gives the launcher what the JIT gives it,
and gpu_compile.py compiles what the JIT compiles.

Runs the real host wrappers on CPU tensors through Triton's real launch path with only the driver
faked (tests/triton/fake_driver.py: kernels compiled for sm_90, never run). Each case is called
twice with the direct path on: the first call of an argument class goes through
``JITFunction.run``, the second must launch the kept ``CompiledKernel`` without it, and both must
hand the launcher the same grid and the same arguments (tensors by dtype and shape, everything else
by value), checked against the compiled signature. For every launch the JIT compiled, the
specialisation gpu_compile.py works out itself (signature, constants, divisibility hints: what its
sm_90 register, spill and serialized-wgmma checks compile) must be the JIT's. Prints one line per
case and exits non-zero on any difference.

    python tests/triton/direct_launch_check.py          (must run WITHOUT TRITON_INTERPRET)
"""

from __future__ import annotations

import os
import sys
from unittest import mock

import torch

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_compile  # noqa: E402
import triton  # noqa: E402
from fake_driver import fake_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import lora_kernels.triton as triton_backend  # noqa: E402
from lora_kernels.triton import _launch, tma_gemm  # noqa: E402

BF16 = dict(dtype=torch.bfloat16)


def tensors(M, K, N, R, dtype=torch.bfloat16):
    """x, W₀, bias, A, B, dy (CPU; their values do not matter, nothing runs)."""
    shapes = ((M, K), (N, K), (N,), (R, K), (N, R), (M, N))
    return [torch.zeros(*s, dtype=dtype) for s in shapes]


def forward(M, bias=False, dropout_p=0.0, dtype=torch.bfloat16):
    x, w, b, a, bb, _ = tensors(M, 96, 80, 16, dtype)
    seed = torch.zeros(1, dtype=torch.int64)
    return lambda: triton_backend.forward(x, w, b if bias else None, a, bb, 2.0, None, dropout_p, seed)


def backward(M, dropout_p=0.0):
    x, w, _, a, b, dy = tensors(M, 96, 80, 16)
    xa, seed = torch.zeros(M, 16, **BF16), torch.zeros(1, dtype=torch.int64)
    return lambda: triton_backend.backward(dy, x, w, a, b, xa, 2.0, True, dropout_p, seed)


def multi_adapter_forward(M):
    n, r = 3, 8
    x, w, _, a, b, _ = tensors(M, 96, 80, n * r)
    ids, scales = torch.zeros(M, dtype=torch.int32), torch.ones(n)
    return lambda: triton_backend.forward(x, w, None, a, b, 1.0, adapter_ids=ids, adapter_scales=scales, adapter_rank=r)


FWD, DROPOUT_XA, DX, DADB, TMA = (
    "_lora_forward_kernel",
    "_dropout_xa_kernel",
    "_lora_dx_kernel",
    "_lora_dadb_kernel",
    "_gemm_low_rank_tma_kernel",
)
CASES = {  # name: (the call, the kernels it must launch)
    "forward, M=16": (forward(16), [FWD]),
    "forward, bias, fused dropout": (forward(40, bias=True, dropout_p=0.1), [DROPOUT_XA, FWD]),
    "forward, fp32": (forward(16, dtype=torch.float32), [FWD]),
    "forward, multi-adapter": (multi_adapter_forward(24), [FWD]),
    "backward, M=40": (backward(40), [DX, DADB]),
    "backward, fused dropout, split rows (M=600)": (backward(600, dropout_p=0.1), [DX, DADB]),
    "forward, TMA kernel (M=1024)": (forward(1024), [TMA]),
    "backward, TMA dX kernel, fused dropout (M=1024)": (backward(1024, dropout_p=0.1), [TMA, DADB]),
}
TMA_ROWS = 1024  # LORA_KERNELS_TMA_ROWS for this check: the cases at 1024 rows take the TMA kernel


def comparable(launch):
    name, grid, args = launch
    return name, grid, tuple((a.dtype, tuple(a.shape)) if isinstance(a, torch.Tensor) else a for a in args)


def specialisation(src) -> tuple:
    """What an ASTSource compiles: signature, constants and the divisibility hints that are set."""
    return dict(src.signature), dict(src.constants), {path: hint for path, hint in src.attrs.items() if hint}


def gpu_compile_differs(fn, args, kwargs, compiled) -> str:
    """'' if gpu_compile.py's specialisation of this launch, and its compile options, are the JIT's,
    else how they differ."""
    sig, consts, attrs, options = gpu_compile.signature_of(fn, args, dict(kwargs))
    ours = specialisation(gpu_compile.ASTSource(fn, sig, consts, attrs))
    jit = specialisation(compiled.src)
    parts = ("signature", "constants", "divisibility")
    differs = [f"{p}: JIT {j} vs gpu_compile {o}" for p, j, o in zip(parts, jit, ours) if j != o]
    # num_warps not: a warp-specialized kernel's metadata counts its added warp groups too
    compared = {k for k in options if k != "num_warps"} | set(_launch.COMPILE_OPTIONS)
    differs += [
        f"{k}: JIT {getattr(compiled.metadata, k)} vs gpu_compile {options.get(k)}"
        for k in sorted(compared)
        if getattr(compiled.metadata, k) != options.get(k)
    ]
    return "; ".join(differs)[:2000]


def check(name, call, kernels) -> bool:
    _launch._COMPILED.clear()
    runs, log, compiled_by_jit = [], [], []
    jit_run = JITFunction.run

    def counted(self, *args, **kwargs):
        runs.append(self.fn.__name__)
        compiled = jit_run(self, *args, **kwargs)
        options = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        compiled_by_jit.append((self, args, options, compiled))
        return compiled

    try:
        with fake_driver(log), mock.patch.object(JITFunction, "run", counted):
            call()
            first, first_runs = list(log), list(runs)
            log.clear()
            call()
    except Exception as exc:  # noqa: BLE001  (reported per case, as a failure)
        print(f"FAILED {name}: {type(exc).__name__}: {exc}")
        return False
    problems = []
    if [launch[0] for launch in first] != kernels:
        problems.append(f"launched {[launch[0] for launch in first]}, not {kernels}")
    if not first or len(first_runs) != len(first):
        problems.append(f"first call: {len(first)} launches, {len(first_runs)} through the JIT")
    if len(runs) != len(first_runs):
        problems.append(f"second call went through the JIT: {runs[len(first_runs) :]}")
    if [comparable(launch) for launch in log] != [comparable(launch) for launch in first]:
        problems.append(f"the launcher got different arguments:\n  JIT:    {first}\n  direct: {log}")
    for fn, args, options, compiled in compiled_by_jit:
        differs = gpu_compile_differs(fn, args, options, compiled)
        if differs:
            problems.append(f"gpu_compile.py specialises {fn.__name__} unlike the JIT: {differs}")
    print(f"{'ok' if not problems else 'FAILED'} {name}: {', '.join(kernels)}")
    for problem in problems:
        print("  " + problem)
    return not problems


def main():
    print(f"triton {triton.__version__}, compiling for sm_90 behind a stand-in driver")
    _launch.DIRECT_LAUNCH = True
    tma_gemm.MIN_ROWS = TMA_ROWS
    results = [check(name, call, kernels) for name, (call, kernels) in CASES.items()]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
