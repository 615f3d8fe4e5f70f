"""Time a grid of Triton tile configs per kernel, shape and M on this GPU (CUDA-graph replay, so
launch overhead stays out) next to cuBLAS for the same product, and print the fastest per case:
the source of the tables in lora_kernels/triton/_common.py.

    python3 scripts/sweep_tiles.py [--quick]
"""

import sys
import time

import torch
import triton
import triton.testing

from lora_kernels import triton as tk
from lora_kernels.triton import lora_backward, lora_forward


def cfg(bm, bn, bk, group, warps, stages):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=warps, num_stages=stages)


# bucket -> candidates; "forward" tiles y (BM×BN, walks K by BK); "dx" tiles dX (BM×BK, walks N by BN)
GRID = {
    "forward": {
        "small": [cfg(16, bn, bk, 1, 4, st) for bn in (32, 64) for bk in (128, 256) for st in (3, 4)],
        "mid": [
            cfg(64, 64, 64, 4, 4, 4),
            cfg(64, 128, 64, 4, 4, 3),
            cfg(128, 64, 64, 4, 4, 3),
            cfg(128, 128, 64, 8, 8, 3),
            cfg(64, 64, 128, 4, 4, 3),
            cfg(32, 64, 128, 4, 4, 4),
        ],
        "large": [
            cfg(128, 128, 64, 8, 8, 3),
            cfg(128, 128, 64, 8, 8, 4),
            cfg(128, 256, 64, 8, 8, 3),
            cfg(256, 128, 64, 8, 8, 3),
            cfg(128, 128, 128, 8, 8, 2),
            cfg(128, 128, 64, 8, 4, 4),
        ],
    },
    "dx": {
        "small": [cfg(16, bn, bk, 1, 4, st) for bn in (128, 256) for bk in (32, 64) for st in (3, 4)],
        "mid": [
            cfg(64, 64, 64, 4, 4, 4),
            cfg(64, 128, 64, 4, 4, 3),
            cfg(128, 64, 64, 4, 4, 3),
            cfg(128, 64, 128, 8, 8, 3),
            cfg(32, 128, 64, 4, 4, 4),
        ],
        "large": [
            cfg(128, 64, 128, 8, 8, 3),
            cfg(128, 64, 128, 8, 8, 4),
            cfg(128, 64, 256, 8, 8, 3),
            cfg(128, 128, 128, 8, 8, 3),
            cfg(256, 64, 128, 8, 8, 3),
            cfg(128, 64, 128, 8, 4, 4),
        ],
    },
}
CHOSEN = {}
lora_forward.tuned = lora_backward.tuned = lambda key, default, launch: CHOSEN.get(key[0], default)


def bucket(M):
    return "small" if M <= 16 else "mid" if M <= 128 else "large"


def graph_ms(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def main():
    quick = "--quick" in sys.argv
    shapes = [(4096, 4096), (4096, 11008), (11008, 4096)]
    ms = [1, 16, 128, 1024, 8192] if not quick else [16, 1024]
    r, dt, s = 16, torch.bfloat16, 2.0
    rows = []
    t_start = time.time()
    for K, N in shapes:
        w = torch.randn(N, K, device="cuda", dtype=dt) / K**0.5
        a = torch.randn(r, K, device="cuda", dtype=dt) / K**0.5
        b = torch.randn(N, r, device="cuda", dtype=dt) / r**0.5
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=dt)
            dy = torch.randn(M, N, device="cuda", dtype=dt)
            xa = (x @ a.t()) * s
            base = {"forward": graph_ms(lambda: x @ w.t()), "dx": graph_ms(lambda: dy @ w)}
            for kernel in ("forward", "dx"):
                results = []
                for c in GRID[kernel][bucket(M)]:
                    CHOSEN.clear()
                    CHOSEN[kernel] = c
                    fn = (
                        (lambda: tk.forward(x, w, None, a, b, s))
                        if kernel == "forward"
                        else (lambda: tk.backward(dy, x, w, a, b, xa, s))
                    )
                    try:
                        results.append((graph_ms(fn), c))
                    except Exception as exc:  # noqa: BLE001
                        print("skip", kernel, K, N, M, c, type(exc).__name__, str(exc)[:80])
                results.sort(key=lambda t: t[0])
                best_ms, best = results[0]
                knobs = tuple(best[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"))
                rows.append((kernel, K, N, M, base[kernel], best_ms, knobs, results[-1][0]))
                print(
                    f"{kernel:<8} {K:>6}x{N:<6} M={M:<5} cublas {base[kernel]:.4f}  best {best_ms:.4f} "
                    f"({best_ms / base[kernel]:.2f}x) {knobs}  worst {results[-1][0]:.4f}  "
                    f"[{time.time() - t_start:.0f}s]",
                    flush=True,
                )
    print("\nkernel    shape          M      cuBLAS ms  best ms  ×cuBLAS  config (BM,BN,BK,G,warps,stages)")
    for kernel, K, N, M, base, best, knobs, _ in rows:
        print(f"{kernel:<8} {K:>6}x{N:<6} {M:>5}  {base:9.4f} {best:8.4f}  {best / base:6.2f}  {knobs}")


if __name__ == "__main__":
    main()
