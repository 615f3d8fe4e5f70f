"""Where the CUDA backend stands on this GPU: its forward and backward against cuBLAS and the Triton
backend (CUDA-graph replay and eager, bf16, r = 16, inputs rotated past L2 as in bench/timing.py),
and, per kernel of csrc/ (decode_gemm, decode_mma_gemm, tensor_core_gemm, wgmma_gemm,
split_k_reduce, simt_gemm), the GPU time of one forward + backward from torch.profiler. The "wgmma"
columns and rows run with LORA_KERNELS_WGMMA=1 (H100/H200 with an sm_90a build): its default
warp-specialized kernel fed by a TMA producer, and "wgmma-tma" its single-role kernel with TMA
(LORA_KERNELS_WGMMA_LOADS=tma). Prints two tables; for kernel work, not the benchmark.

    python3 scripts/bench_cuda_kernels.py [--shapes 4096x4096,...] [--rows 1,16,...] [--reps 50]
"""

import argparse
import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from timing import input_sets_needed, time_eager, time_graph  # noqa: E402

from lora_kernels import cuda as ck  # noqa: E402

try:
    from lora_kernels import triton as tk
except ImportError:
    tk = None


def problem(M, K, N, r, n_sets, dt=torch.bfloat16):
    sets = []
    for _ in range(n_sets):
        x = torch.randn(M, K, device="cuda", dtype=dt)
        w = torch.randn(N, K, device="cuda", dtype=dt) / K**0.5
        a = torch.randn(r, K, device="cuda", dtype=dt) / K**0.5
        b = torch.randn(N, r, device="cuda", dtype=dt) / r**0.5
        dy = torch.randn(M, N, device="cuda", dtype=dt)
        sets.append((x, w, a, b, dy))
    return sets


# Columns that run with a switch of csrc/ set: y's decode kernel launched after xa's ends instead of
# overlapping it; the products of at least 256 columns on the wgmma kernels.
ENV = {
    "no PDL": {"LORA_KERNELS_PDL": "0"},
    "wgmma": {"LORA_KERNELS_WGMMA": "1"},
    "wgmma-tma": {"LORA_KERNELS_WGMMA": "1", "LORA_KERNELS_WGMMA_LOADS": "tma"},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096", help="in x out")
    ap.add_argument("--rows", default="1,16,32,128,1024,8192")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    s, r = 2.0, args.rank
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  bf16 r={r}  times in µs (graph / eager)")
    print(
        "| in×out | M | cuBLAS fwd | cuda fwd | cuda fwd, no PDL | cuda fwd, wgmma | cuda fwd, wgmma-tma | triton fwd "
        "| cuBLAS dX | cuda bwd | cuda bwd, wgmma | cuda bwd, wgmma-tma | triton bwd |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    per_kernel = defaultdict(float)
    for shape in args.shapes.split(","):
        K, N = map(int, shape.split("x"))
        for M in map(int, args.rows.split(",")):
            n_sets = input_sets_needed(2 * (N * K + M * (K + N)), "cuda")
            sets = problem(M, K, N, r, n_sets)
            # the same call under each switch of ENV ("-" where a wgmma column cannot run)
            cuda_fwd = lambda i: ck.forward(sets[i][0], sets[i][1], None, sets[i][2], sets[i][3], s)  # noqa: E731
            cuda_bwd = (
                lambda i: ck.backward(
                    sets[i][4],
                    sets[i][0],
                    sets[i][1],
                    sets[i][2],
                    sets[i][3],  # noqa: E731
                    sets[i][0][:, :r],
                    s,
                )
            )
            fns = {
                "cuBLAS fwd": lambda i: F.linear(sets[i][0], sets[i][1]),
                "cuda fwd": cuda_fwd,
                "cuda fwd, no PDL": cuda_fwd,
                "cuda fwd, wgmma": cuda_fwd,
                "cuda fwd, wgmma-tma": cuda_fwd,
                "triton fwd": lambda i: tk.forward(sets[i][0], sets[i][1], None, sets[i][2], sets[i][3], s),
                "cuBLAS dX": lambda i: sets[i][4] @ sets[i][1],
                "cuda bwd": cuda_bwd,
                "cuda bwd, wgmma": cuda_bwd,
                "cuda bwd, wgmma-tma": cuda_bwd,
                "triton bwd": lambda i: tk.backward(
                    sets[i][4], sets[i][0], sets[i][1], sets[i][2], sets[i][3], sets[i][0][:, :r].contiguous(), s
                ),
            }
            cells = []
            for name, fn in fns.items():
                if (tk is None and name.startswith("triton")) or ("wgmma" in name and not ck.wgmma_supported()):
                    cells.append("-")
                    continue
                env = ENV.get(name.split(", ")[-1], {})
                os.environ.update(env)
                graph = time_graph(fn, n_sets, args.reps, "cuda")
                eager = time_eager(fn, n_sets, args.reps, 5, "cuda")
                for key in env:
                    os.environ.pop(key)
                cells.append(f"{graph.median_ms * 1e3:.1f} / {eager.median_ms * 1e3:.1f}")
            print(f"| {K}×{N} | {M} | " + " | ".join(cells) + " |", flush=True)
            # per-kernel GPU time of one CUDA-backend forward + backward (and again with wgmma on)
            x, w, a, b, dy = sets[0]
            for setting in ["default"] + (["wgmma", "wgmma-tma"] if ck.wgmma_supported() else []):
                os.environ.update(ENV.get(setting, {}))
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    y, xa = ck.forward(x, w, None, a, b, s)
                    ck.backward(dy, x, w, a, b, xa, s)
                    torch.cuda.synchronize()
                for key in ENV.get(setting, {}):
                    os.environ.pop(key)
                for ev in prof.key_averages():
                    if ev.device_type == torch.autograd.DeviceType.CUDA:
                        name = ev.key.split("<")[0].split("(")[0].split("::")[-1]
                        us = getattr(ev, "device_time_total", None) or ev.cuda_time_total
                        per_kernel[(shape, M, setting, name)] += us
            sets = None  # free the inputs (not del: the closures above refer to it)
    print("\n| in×out | M | setting | kernel | µs (one forward + backward) |")
    print("|---|---|---|---|---|")
    for (shape, M, setting, name), us in per_kernel.items():
        print(f"| {shape} | {M} | {setting} | {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
