"""Compile every Triton kernel launch the host wrappers make, for real GPU targets, without a GPU.

The interpreter (TRITON_INTERPRET=1) checks the kernels' arithmetic but not what only the GPU
compiler enforces (tl.dot shapes, types, shared-memory limits). This script runs the real host
wrappers on ``meta`` tensors with the kernel launches intercepted, so the exact arguments,
constexprs, block sizes, warps and stages a GPU run would use are compiled with
``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` down to a cubin, and prints each
kernel's registers, spills and shared memory as read by cuobjdump. ptxas's own log is read too:
a launch fails if ptxas serializes its wgmmas (sm_90 warnings C7515, C7511, C7518: every wgmma then
waits for the previous one, which costs the Hopper tensor cores most of their speed).

    python tests/triton/gpu_compile.py --arch 90 --arch 80      (must run WITHOUT TRITON_INTERPRET)

With ``--sass-dir DIR`` it also writes each launch's SASS, so that two versions of the code can be
compared instruction by instruction (scripts/sass_diff.py), and what the launch gives the compiler
(its Triton IR without source locations, and the compile options), which tells two versions apart
where the SASS cannot: some compiles are not deterministic.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import lora_kernels.triton.lora_backward as bwd  # noqa: E402
import lora_kernels.triton.lora_forward as fwd  # noqa: E402
import lora_kernels.triton.tma_gemm as tma  # noqa: E402
from lora_kernels.triton import _launch  # noqa: E402

TRITON_TYPE = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int64: "i64",
    torch.int32: "i32",
}


class LaunchRecorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` is recorded, not run."""

    def __init__(self, jit_fn, launches):
        self.fn, self.launches = jit_fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def signature_of(fn, args, kwargs):
    """Triton's signature, constexprs and attributes for a call, specialised as the JIT does:
    ints equal to 1 become constexprs; pointers (torch allocations) and ints divisible by 16 get the
    16-divisibility hint that lets the compiler vectorise loads. direct_launch_check.py checks this
    against the JIT's own specialisation (triton 3.8 in make test, 3.6 and 3.9 in make test-triton36/39).
    Launch and compile options (_launch.COMPILE_OPTIONS) are options, not constexprs."""
    # getattr: trees before cd8724e have no COMPILE_OPTIONS (scripts/sass_diff.py compiles them too)
    compile_options = getattr(_launch, "COMPILE_OPTIONS", {})
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", *compile_options) if k in kwargs}
    sig, consts, attrs = {}, dict(kwargs), {}
    for index, (name, value) in enumerate(zip(fn.arg_names, args)):
        if isinstance(value, torch.Tensor) or (
            isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0
        ):
            attrs[(index,)] = [["tt.divisibility", 16]]
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + TRITON_TYPE[value.dtype]
        elif isinstance(value, bool) or (isinstance(value, int) and value == 1):
            sig[name], consts[name] = "constexpr", value
        elif isinstance(value, int):
            sig[name] = "i32" if abs(value) < 2**31 else "i64"
        else:
            sig[name] = "fp32"
    for name in kwargs:
        sig[name] = "constexpr"
    return sig, consts, attrs, options


# Shared memory one block may use (bytes): H100/H200 (sm_90) and A100 (sm_80). A launch over it
# compiles but fails at load time on that GPU ("out of resources").
MAX_SHARED = {90: 232448, 80: 166912}
# Register spills (stack bytes) tolerated for 16-bit launches: some r = 128 launches spill a little
# on sm_80 (≤ 144 B seen, triton 3.6 and 3.8); a table change that spills kilobytes fails here.
# fp32 (FMA dots) is not bounded: it spills at r ≥ 64 (see the README).
MAX_STACK_16BIT = 256


def cuobjdump(cubin: bytes, option: str) -> str:
    """What Triton's own cuobjdump prints for a cubin with ``option`` (-res-usage, -sass)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, option, f.name], capture_output=True, text=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local bytes per thread of a cubin, as cuobjdump reads them."""
    out = cuobjdump(cubin, "-res-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump gave no resource usage: {out.strip()[:80]}")
    return {"regs": int(m[1]), "stack": int(m[2]), "local": int(m[4])}


def sass_instructions(cubin: bytes) -> list:
    """The cubin's instructions in order, as text (no addresses, no encodings): what
    scripts/sass_diff.py compares between two versions of the code."""
    lines = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", cuobjdump(cubin, "-sass"))
    if not lines:
        raise RuntimeError("cuobjdump gave no SASS")
    return lines


# An MLIR source location, inline (`loc(#loc3)`, `loc("x_ptr"(#loc))`): one level of nesting
LOCATION = re.compile(r" loc\((?:[^()]|\([^()]*\))*\)")


def compiler_input(ttir: str, arch: int, options: dict) -> str:
    """What a launch gives Triton's GPU compiler: its Triton IR (the first, target-independent
    stage, deterministic) without source locations, so that moving code is no change, and every
    compile option as the backend resolves it (defaults included). Two launches with the same
    input are compiled alike, up to the compiler's own non-determinism (the warp-specialized TMA
    kernel's: bench/results/sm90-sass-diffs.md)."""
    ir = [LOCATION.sub("", line) for line in ttir.splitlines() if not line.startswith("#loc")]
    left = [line for line in ir if "loc(" in line]
    if left:
        raise RuntimeError(f"a source location was left in the Triton IR: {left[0][:200]}")
    resolved = vars(make_backend(GPUTarget("cuda", arch, 32)).parse_options(dict(options)))
    # library paths differ between installs of one Triton version; their names do not
    resolved["extern_libs"] = [(name, os.path.basename(path)) for name, path in resolved.get("extern_libs") or ()]
    return "\n".join(ir) + "\n" + json.dumps(resolved, sort_keys=True, default=str, indent=1) + "\n"


def launch_key(arch, fn, sig, consts, options) -> str:
    """A launch's name across versions of the code: kernel, argument types, constexprs, warps,
    stages (not the other compile options, so that adding one does not rename every launch)."""
    return (
        f"sm_{arch} {fn.__name__} {sorted(sig.items())} {sorted(consts.items())} "
        f"w{options.get('num_warps')} s{options.get('num_stages')}"
    )


# ptxas's "Potential Performance Loss: wgmma.mma_async instructions are serialized due to ..."
SERIALIZED_WGMMA = re.compile(r"\((C75(?:11|15|18))\)[^\n]*wgmma[^\n]*serialized[^\n]*")


def compile_with_ptxas_log(fn, sig, consts, attrs, arch, options):
    """triton.compile for ``arch``, returning the kernel and what ptxas printed (Triton prints it
    when dump_ptxas_log is on). For sm_90 never from Triton's cache: a cached kernel has no log,
    and only wgmma (sm_90) can be serialized."""
    knobs = triton.knobs
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = arch >= 90, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32), options=options
            )
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    return kernel, log.getvalue()


def check_tma_and_warp_specialization(ptx: str, warp_specialized: bool) -> None:
    """What tma_gemm.py is built for, read from the compiled PTX (Triton drops either silently
    when it cannot apply it): TMA loads and stores, and where asked for, warp groups given different
    register budgets (setmaxnreg: a lean producer, consumers with the accumulators)."""
    if "cp.async.bulk.tensor" not in ptx:
        raise RuntimeError("no TMA copies (cp.async.bulk.tensor) in the TMA kernel")
    if not warp_specialized:
        return
    budgets = {int(n) for n in re.findall(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+(\d+)", ptx)}
    if not budgets or min(budgets) > 64:
        raise RuntimeError(f"not warp-specialized: no producer warp group with a small register budget ({budgets})")


def recorded_launches(quick):
    """Run forward and backward for a grid of problems on meta tensors; return unique launches."""
    launches = []
    fwd._lora_forward_kernel = LaunchRecorder(fwd._lora_forward_kernel, launches)
    fwd._dropout_xa_kernel = LaunchRecorder(fwd._dropout_xa_kernel, launches)
    bwd._lora_dx_kernel = LaunchRecorder(bwd._lora_dx_kernel, launches)
    bwd._lora_dadb_kernel = LaunchRecorder(bwd._lora_dadb_kernel, launches)
    tma._gemm_low_rank_tma_kernel = LaunchRecorder(tma._gemm_low_rank_tma_kernel, launches)
    tma.MIN_ROWS = 8192  # the opt-in TMA kernel, at the largest M (its launches do not depend on M)
    ms = [1, 128, 8192] if quick else [1, 16, 128, 1024, 8192]
    ranks = [16, 128] if quick else [1, 16, 64, 128]
    # (activation dtype, adapter dtype): fp32 adapters on a 16-bit base are PEFT's default (rounded to
    # the activation dtype before the launches; dA and dB are written in fp32)
    dtypes = [(torch.float16,) * 2, (torch.bfloat16,) * 2, (torch.float32,) * 2, (torch.bfloat16, torch.float32)]
    if not quick:
        dtypes.append((torch.float16, torch.float32))
    for dtype, adapter_dtype in dtypes:
        for M in ms:
            for r in ranks:
                K, N = 4096, 11008
                x = torch.empty(M, K, device="meta", dtype=dtype)
                w = torch.empty(N, K, device="meta", dtype=dtype)
                a = torch.empty(r, K, device="meta", dtype=adapter_dtype)
                b = torch.empty(N, r, device="meta", dtype=adapter_dtype)
                bias = torch.empty(N, device="meta", dtype=dtype)
                dy = torch.empty(M, N, device="meta", dtype=dtype)
                seed = torch.empty(1, device="meta", dtype=torch.int64)
                y, xa = fwd.fused_forward(x, w, bias, a, b, 2.0)  # no dropout
                bwd.fused_backward(dy, x, w, a, b, xa, 2.0)
                y, xa = fwd.fused_forward(x, w, bias, a, b, 2.0, dropout_p=0.1, seed=seed)  # fused dropout
                bwd.fused_backward(dy, x, w, a, b, xa, 2.0, dropout_p=0.1, seed=seed)
                y, xa = fwd.fused_forward(x, w, bias, a, b, 2.0, x_lora=x)  # caller's dropout
                bwd.fused_backward(dy, x, w, a, b, xa, 2.0, fuse_lora_dx=False)
                if r % 8 == 0:  # multi-adapter batch: 8 adapters of rank r/8 stacked to rank r
                    ids = torch.empty(M, device="meta", dtype=torch.int32)
                    scales = torch.empty(8, device="meta", dtype=torch.float32)
                    multi = dict(adapter_ids=ids, adapter_scales=scales, adapter_rank=r // 8)
                    y, xa = fwd.fused_forward(x, w, bias, a, b, 1.0, **multi)
                    bwd.fused_backward(dy, x, w, a, b, xa, 1.0, **multi)
    unique = {}
    for fn, args, kwargs in launches:
        sig, consts, attrs, options = signature_of(fn, args, dict(kwargs))
        if quick and fn is tma._gemm_low_rank_tma_kernel.fn and sig["p_ptr"] == "*fp16":
            continue  # its fp16 launches are its bf16 ones but for the element type (35 s of CI for both)
        key = (
            fn.__name__,
            tuple(sorted(sig.items())),
            tuple(sorted(consts.items())),
            tuple(sorted(attrs)),
            tuple(sorted(options.items())),
        )
        unique[key] = (fn, sig, consts, attrs, options)
    return list(unique.values())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90; repeatable")
    parser.add_argument("--quick", action="store_true", help="fewer problem sizes (what CI compiles)")
    parser.add_argument("--kernel", action="append", help="only launches of this kernel; repeatable")
    parser.add_argument(
        "--sass-dir", help="write each launch's SASS there (index.json names the files), for scripts/sass_diff.py"
    )
    args = parser.parse_args()
    if args.sass_dir:
        os.makedirs(args.sass_dir, exist_ok=True)
    failures, sass_index, input_index = 0, {}, {}
    launches = [
        launch for launch in recorded_launches(args.quick) if not args.kernel or launch[0].__name__ in args.kernel
    ]
    for arch in args.arch or [90]:
        for fn, sig, consts, attrs, options in launches:
            if fn.__name__ == "_gemm_low_rank_tma_kernel" and arch < 90:
                continue  # TMA: Hopper and newer only (tma_forward_reason)
            blocks = " ".join(
                f"{k}={v}"
                for k, v in consts.items()
                if k.startswith("BLOCK")
                or k
                in (
                    "HAS_BIAS",
                    "XA_GIVEN",
                    "FUSE_LORA_DX",
                    "DROPOUT",
                    "MULTI",
                    "TRANSPOSED",
                    "LOW_RANK",
                    "WARP_SPECIALIZE",
                )
            )
            dtype = next(v for v in sig.values() if v.startswith("*"))[1:]
            adapter = sig.get("a_ptr", sig.get("da_part_ptr", "*" + dtype))[1:]  # dA's type (fp32 partial sums too)
            dtype = dtype if adapter == dtype else f"{dtype}+{adapter}"
            label = (
                f"sm_{arch} {fn.__name__:<18} {dtype:<9} w{options.get('num_warps')} "
                f"s{options.get('num_stages')} {blocks}"
            )
            try:
                kernel, ptxas_log = compile_with_ptxas_log(fn, sig, consts, attrs, arch, options)
                if arch >= 90 and "Compiling entry function" not in ptxas_log:
                    raise RuntimeError("no ptxas log was captured, so serialization could not be checked")
                serialized = SERIALIZED_WGMMA.search(ptxas_log)
                if serialized:
                    raise RuntimeError(f"ptxas serializes the wgmmas: {serialized[0].strip()[:200]}")
                if kernel.metadata.shared > MAX_SHARED.get(arch, 1 << 30):
                    raise RuntimeError(
                        f"needs {kernel.metadata.shared} B of shared memory, sm_{arch} has {MAX_SHARED[arch]}"
                    )
                if fn.__name__ == "_gemm_low_rank_tma_kernel":
                    check_tma_and_warp_specialization(kernel.asm["ptx"], consts["WARP_SPECIALIZE"])
                use = resource_usage(kernel.asm["cubin"])
                if args.sass_dir:
                    key = launch_key(arch, fn, sig, consts, options)
                    sass_index[key] = f"{len(sass_index):04d}.sass"
                    with open(os.path.join(args.sass_dir, sass_index[key]), "w") as f:
                        f.write("\n".join(sass_instructions(kernel.asm["cubin"])) + "\n")
                    input_index[key] = sass_index[key].replace(".sass", ".input")
                    with open(os.path.join(args.sass_dir, input_index[key]), "w") as f:
                        f.write(compiler_input(kernel.asm["ttir"], arch, options))
                usage = f"regs {use['regs']:>3} stack {use['stack']:>4} local {use['local']:>4}"
                if not dtype.startswith("fp32") and use["stack"] > MAX_STACK_16BIT:
                    raise RuntimeError(f"spills: {usage}")
                print(f"ok   {label} | {usage} smem {kernel.metadata.shared}", flush=True)
            except Exception as exc:  # report every failing launch, then fail
                failures += 1
                print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
    if args.sass_dir:
        with open(os.path.join(args.sass_dir, "index.json"), "w") as f:
            json.dump({"triton": triton.__version__, "launches": sass_index, "inputs": input_index}, f, indent=1)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
