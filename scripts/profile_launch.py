"""Where an eager call's host time goes: per-call wall time of the wrappers and the raw launch,
and a cProfile of the forward and the training step (M = 1, bf16, 4096×4096, r = 16)."""

import cProfile
import pstats
import time

import torch

import lora_kernels
from lora_kernels import triton as tk

K = N = 4096
r, dt = 16, torch.bfloat16
x = torch.randn(1, K, device="cuda", dtype=dt)
w = torch.randn(N, K, device="cuda", dtype=dt)
a = torch.randn(r, K, device="cuda", dtype=dt, requires_grad=True)
b = torch.randn(N, r, device="cuda", dtype=dt, requires_grad=True)


def per_call_us(fn, n=500):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def train():
    lora_kernels.lora_linear(x, w, None, a, b, 2.0, backend="triton").sum().backward()


with torch.no_grad():
    cases = {
        "F.linear": lambda: torch.nn.functional.linear(x, w),
        "tk.forward (wrapper, custom op)": lambda: tk.forward(x, w, None, a, b, 2.0),
        "fused_forward (no custom op)": lambda: tk.lora_forward.fused_forward(x, w, None, a, b, 2.0),
        "lora_linear no_grad": lambda: lora_kernels.lora_linear(x, w, None, a, b, 2.0, backend="triton"),
    }
    for name, fn in cases.items():
        print(f"{name:<36} {per_call_us(fn):8.1f} us/call")
print(f"{'train step (fwd+bwd+sum)':<36} {per_call_us(train, 200):8.1f} us/call")
for name, fn in (
    ("forward", lambda: lora_kernels.lora_linear(x.detach(), w, None, a.detach(), b.detach(), 2.0, backend="triton")),
    ("train", train),
):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        fn()
    prof.disable()
    print(f"--- cProfile {name}, 200 calls, by tottime")
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
