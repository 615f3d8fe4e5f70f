"""A small workload for compute-sanitizer: forward and backward of every GPU backend on odd shapes,
with and without bias, fused dropout and a multi-adapter batch. Exits non-zero on a wrong result.

    compute-sanitizer --tool memcheck python3 scripts/sanitize_workload.py
    compute-sanitizer --tool racecheck python3 scripts/sanitize_workload.py
    LORA_SANITIZE_BACKENDS=cuda compute-sanitizer ...     (one backend only)
"""

import os

import torch

import lora_kernels
import lora_kernels.cuda


def check(name, got, want, tol):
    err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
    print(f"{name:<48} rel err {err:.2e}")
    assert err < tol, name


def main():
    torch.manual_seed(0)
    backends = [b for b in lora_kernels.available_backends("cuda") if b != "reference"]
    if os.environ.get("LORA_SANITIZE_BACKENDS"):  # e.g. "cuda": only that backend's kernels
        backends = [b for b in backends if b in os.environ["LORA_SANITIZE_BACKENDS"].split(",")]
    # odd shapes; for the CUDA kernels also decode at M = 24, 128×128 tensor-core tiles (M, N > 256)
    # and split-K of x·Aᵀ (K = 520) and of gᵀ·x, dYᵀ·xa (M = 300); decode on tensor cores (N ≥ 256;
    # K split over blocks at M = 24)
    shapes = [
        (1, 64, 48, 16, True),
        (37, 70, 50, 12, False),
        (130, 96, 80, 1, True),
        (24, 1040, 72, 8, True),
        (300, 520, 264, 16, False),
        (19, 136, 300, 8, True),
        (24, 1040, 264, 8, False),
    ]
    runs = [(backend, shape, None) for backend in backends for shape in shapes]
    if "cuda" in backends and lora_kernels.cuda.wgmma_supported():
        # the wgmma GEMMs (H100/H200), LORA_KERNELS_WGMMA_LOADS as given: y, and dX with W₀ and A
        # transposed; r = 4 staged element by element (cp.async whatever is asked); K split at
        # M = 300; the producer kernel's blocks taking more than one tile at 2100 rows (153 tiles of y
        # on 132 SMs); dX at 24 rows computed transposed, split along K
        runs += [
            ("cuda", (300, 520, 264, 16, False), "producer"),
            ("cuda", (300, 520, 264, 16, False), "tma"),
            ("cuda", (290, 264, 270, 4, True), "producer"),
            ("cuda", (2100, 264, 2100, 16, True), "producer"),
            ("cuda", (24, 1040, 264, 8, False), "producer"),
            ("cuda", (24, 1040, 264, 8, False), "tma"),
        ]
    for backend, (M, K, N, r, bias), wgmma_loads in runs:
        wgmma = wgmma_loads is not None
        os.environ["LORA_KERNELS_WGMMA"] = "1" if wgmma else "0"
        os.environ["LORA_KERNELS_WGMMA_LOADS"] = wgmma_loads or "producer"
        for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)]:
            x = torch.randn(M, K, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5
            b = torch.randn(N, device="cuda", dtype=dtype) if bias else None
            a = (torch.randn(r, K, device="cuda", dtype=dtype) / K**0.5).requires_grad_()
            bb = (torch.randn(N, r, device="cuda", dtype=dtype) / r**0.5).requires_grad_()
            y = lora_kernels.lora_linear(x, w, b, a, bb, 2.0, backend=backend)
            y.backward(torch.ones_like(y))
            ref = lora_kernels.lora_linear_reference(
                x.double(), w.double(), None if b is None else b.double(), a.double(), bb.double(), 2.0
            )
            check(f"{backend}{' wgmma ' + wgmma_loads if wgmma else ''} M={M} K={K} N={N} r={r} {dtype}", y, ref, tol)
            if not wgmma:  # fused dropout: the mask redrawn from a seed in forward and backward
                lora_kernels.lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.1, backend=backend).sum().backward()
    os.environ.pop("LORA_KERNELS_WGMMA")
    os.environ.pop("LORA_KERNELS_WGMMA_LOADS")
    for backend in backends:
        for M in (5, 33):  # multi-adapter batches: decode-sized and tensor-core/SIMT
            x = torch.randn(M, 64, device="cuda", requires_grad=True)
            w = torch.randn(40, 64, device="cuda")
            A = torch.randn(4, 8, 64, device="cuda", requires_grad=True)
            B = torch.randn(4, 40, 8, device="cuda", requires_grad=True)
            ids = torch.randint(-1, 4, (M,), device="cuda")
            y = lora_kernels.lora_linear_multi(x, w, None, A, B, [1.0, 2.0, 0.5, 1.5], ids, backend=backend)
            y.backward(torch.ones_like(y))
            ref = lora_kernels.lora_linear_multi_reference(
                x.double(), w.double(), None, A.double(), B.double(), [1.0, 2.0, 0.5, 1.5], ids
            )
            check(f"{backend} multi-adapter M={M}", y, ref, 1e-5)
    if "cuda" in backends and lora_kernels.cuda.wgmma_supported():
        # the multi-adapter mask in the wgmma epilogues: 32 adapters × rank 8, so xa and g have 256
        # columns; at 70 rows on 128×256 tiles (staged through shared memory), at 40 transposed
        os.environ["LORA_KERNELS_WGMMA"] = "1"
        for M in (40, 70):
            x = torch.randn(M, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            w = torch.randn(264, 72, device="cuda", dtype=torch.bfloat16) / 72**0.5
            A = torch.randn(32, 8, 72, device="cuda", dtype=torch.bfloat16).div_(72**0.5).requires_grad_()
            B = torch.randn(32, 264, 8, device="cuda", dtype=torch.bfloat16).div_(8**0.5).requires_grad_()
            ids = torch.randint(-1, 32, (M,), device="cuda")
            scales = [0.5 + i / 32 for i in range(32)]
            y = lora_kernels.lora_linear_multi(x, w, None, A, B, scales, ids, backend="cuda")
            y.backward(torch.ones_like(y))
            ref = lora_kernels.lora_linear_multi_reference(
                x.double(), w.double(), None, A.double(), B.double(), scales, ids
            )
            check(f"cuda wgmma multi-adapter M={M} bf16", y, ref, 1e-2)
        os.environ.pop("LORA_KERNELS_WGMMA")
    torch.cuda.synchronize()
    print("sanitize workload done:", backends)


if __name__ == "__main__":
    main()
