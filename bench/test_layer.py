"""Layer suite: one LoRA linear layer, forward and training step, ours against the baselines.

Implementations, all measured in this run on the same inputs:
  base            x @ W₀ᵀ (cuBLAS): the frozen base layer, i.e. merged LoRA: the floor
  peft-style      F.linear(x, W₀) + s·F.linear(F.linear(x, A), B): PEFT / loralib's unmerged layer
  unsloth-style   o = x @ W₀ᵀ; o.addmm_(x @ Aᵀ, Bᵀ, alpha=s): Unsloth's matmul_lora
  peft            PEFT's own lora.Linear, when peft is installed
  lora_kernels[b] our lora_linear with backend b (triton, cuda, auto; reference on a CPU run)
  lora_kernels[triton] +tma  the Triton backend with its large-M TMA kernel for the forward and dX
                  (tma_gemm.py, opt-in by LORA_KERNELS_TMA_ROWS) at every M; 16-bit runs on a GPU
  ... +fp32 adapters  PEFT's default set-up on a 16-bit base (get_peft_model keeps lora_A/lora_B
                  in fp32): PEFT's lora.Linear and ours (auto) with fp32 A and B, x and W₀ in the
                  run's dtype; only in 16-bit runs. Against the pure 16-bit rows it shows what the
                  fp32 adapters cost.
The training step is forward + gradients for x, A, B (base: for x only, W₀ frozen).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from report import RESULTS, cell_text, progress
from timing import input_sets_needed, peak_memory_mb, time_eager, time_graph

import lora_kernels

FP32_ADAPTERS = " +fp32 adapters"
TMA = " +tma"


def implementations(device, dtype):
    names = ["base", "peft-style", "unsloth-style"]
    try:
        import peft  # noqa: F401

        names.append("peft")
    except ImportError:
        pass
    backends = [b for b in lora_kernels.available_backends(device) if b != "reference"] or ["reference"]
    names += [f"lora_kernels[{b}]" for b in backends] + (["lora_kernels[auto]"] if device == "cuda" else [])
    if device == "cuda" and "triton" in backends and dtype != torch.float32:
        names.append("lora_kernels[triton]" + TMA)
    if dtype != torch.float32:  # PEFT's default on a 16-bit base
        names += [
            n + FP32_ADAPTERS for n in ("peft", "lora_kernels[auto]" if device == "cuda" else names[-1]) if n in names
        ]
    return names


def known_implementations() -> set:
    """Every name --impls accepts, whatever the device, dtype or installed packages of the run (a
    run lists those its device has: the others are not measured there)."""
    kernels = [f"lora_kernels[{b}]" for b in lora_kernels.dispatch.BACKENDS]
    names = {"base", "peft-style", "unsloth-style", "peft", "lora_kernels[triton]" + TMA, *kernels}
    return names | {n + FP32_ADAPTERS for n in ["peft", *kernels]}


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        from conftest import run_info

        info = run_info(metafunc.config)
        unknown = sorted(set(info.impls or ()) - known_implementations())
        if unknown:  # a misspelt name would measure nothing, silently (on a GPU whose minutes are counted)
            raise pytest.UsageError(f"--impls: unknown {unknown}; known: {sorted(known_implementations())}")
        impls = [i for i in implementations(info.device, info.dtype) if info.impls is None or i in info.impls]
        cases = [(K, N, M, r, impl) for (K, N) in info.shapes for r in info.ranks for M in info.ms for impl in impls]
        metafunc.parametrize("case", cases, ids=[f"{K}x{N}-M{M}-r{r}-{impl}" for K, N, M, r, impl in cases])


def make_layer_fn(impl, W, A, B, s):
    """(forward(x) -> y, parameters that get gradients besides x)."""
    if impl == "base":
        return (lambda x: x @ W.t()), []
    if impl == "peft-style":
        return (lambda x: F.linear(x, W) + F.linear(F.linear(x, A), B) * s), [A, B]
    if impl == "unsloth-style":
        return (lambda x: (x @ W.t()).addmm_(x @ A.t(), B.t(), alpha=s)), [A, B]
    if impl.startswith("peft") and impl != "peft-style":  # PEFT's own layer, built the version-independent way
        import peft

        holder = torch.nn.Module()
        holder.base = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device, dtype=W.dtype)
        holder.base.weight = torch.nn.Parameter(W, requires_grad=False)
        peft.inject_adapter_in_model(
            peft.LoraConfig(r=A.shape[0], lora_alpha=s * A.shape[0], target_modules=["base"]), holder
        )
        # A and B in their own dtype: the run's, or fp32 (PEFT's default on a 16-bit base)
        layer = holder.base
        layer.lora_A["default"].weight = A
        layer.lora_B["default"].weight = B
        return layer, [A, B]
    backend = impl[len("lora_kernels[") : impl.index("]")]
    return (lambda x: lora_kernels.lora_linear(x, W, None, A, B, s, backend=backend)), [A, B]


def test_layer(case, info, benchmark, monkeypatch):
    K, N, M, r, impl = case
    if impl.endswith(TMA):  # the switch's effect, for this case only
        from lora_kernels.triton import tma_gemm

        monkeypatch.setattr(tma_gemm, "MIN_ROWS", 1)
    dtype, device, s = info.dtype, info.device, 2.0
    n_sets = input_sets_needed((M * K + N * K + M * N + r * (K + N)) * dtype.itemsize, device)
    sets = []
    for _ in range(n_sets):
        W = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
        adapter_dtype = torch.float32 if impl.endswith(FP32_ADAPTERS) else dtype
        A = torch.nn.Parameter(torch.randn(r, K, device=device, dtype=adapter_dtype) / K**0.5)
        B = torch.nn.Parameter(torch.randn(N, r, device=device, dtype=adapter_dtype) / r**0.5)
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        fn, params = make_layer_fn(impl, W, A, B, s)
        sets.append((fn, x, dy, [x] + params))

    def forward(i):
        fn, x, _, _ = sets[i]
        with torch.no_grad():
            return fn(x)

    def train_step(i):
        fn, x, dy, wrt = sets[i]
        return torch.autograd.grad(fn(x), wrt, dy)

    warmup = 10 if device == "cuda" else 3
    row = dict(K=K, N=N, M=M, r=r, impl=impl, dtype=str(dtype).replace("torch.", ""), n_input_sets=n_sets)
    fwd = time_eager(forward, n_sets, info.reps, warmup, device)
    train = time_eager(train_step, n_sets, info.reps, warmup, device)
    fwd_graph = time_graph(forward, n_sets, info.reps, device)
    train_graph = time_graph(train_step, n_sets, info.reps, device)
    as_dict = lambda t: t and t.as_dict()  # noqa: E731
    row.update(
        fwd=dict(eager=fwd.as_dict(), graph=as_dict(fwd_graph)),
        train=dict(eager=train.as_dict(), graph=as_dict(train_graph)),
        train_peak_mb=peak_memory_mb(lambda: train_step(0), device),
    )
    RESULTS["layer"].append(row)
    progress(info, "layer", f"{K}x{N} r={r} M={M} {impl}: {cell_text(row, 'fwd')} fwd, {cell_text(row, 'train')} train")
    benchmark.extra_info.update(row)

    def synced_forward():  # what pytest-benchmark times: one eager forward, host-synchronised
        out = forward(0)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(synced_forward, rounds=max(3, info.reps // 4), warmup_rounds=2)
