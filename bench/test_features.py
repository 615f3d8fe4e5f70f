"""Beyond the peers: the cost of fused LoRA dropout and of multi-adapter batches.

dropout: training step (forward + dX, dA, dB) with p = 0.1 against p = 0, and against PEFT-style
         unfused code with nn.Dropout (what Unsloth also falls back to when dropout > 0).
multi:   forward of one batch whose rows use 8 different adapters (lora_linear_multi) against the
         same batch through one adapter, and against PEFT's mixed-batch forward (adapter_names=).
Shape: the first --shapes entry, rank the first --ranks entry, M the largest --m entry.
"""

import pytest
import torch
import torch.nn.functional as F
from report import RESULTS, progress
from timing import input_sets_needed, time_eager, time_graph

import lora_kernels

N_ADAPTERS = 8


def pytest_generate_tests(metafunc):
    if "feature_case" in metafunc.fixturenames:
        from conftest import run_info

        info = run_info(metafunc.config)
        ours = "triton" if info.device == "cuda" else "reference"
        cases = [
            ("dropout", f"lora_kernels[{ours}] p=0"),
            ("dropout", f"lora_kernels[{ours}] p=0.1"),
            ("dropout", "peft-style p=0.1"),
            ("multi", f"lora_kernels[{ours}] 1 adapter"),
            ("multi", f"lora_kernels[{ours}] {N_ADAPTERS} adapters"),
            ("multi", f"peft mixed batch, {N_ADAPTERS} adapters"),
        ]
        if info.device == "cuda" and lora_kernels.cuda.extension_loaded():  # the CUDA backend's own kernels
            cases.insert(5, ("multi", f"lora_kernels[cuda] {N_ADAPTERS} adapters"))
            cases.insert(2, ("dropout", "lora_kernels[cuda] p=0.1"))
            cases.insert(2, ("dropout", "lora_kernels[cuda] p=0"))
        metafunc.parametrize("feature_case", cases, ids=[f"{c}-{i}" for c, i in cases])


def make_step(case, impl, K, N, M, r, dtype, device):
    backend = impl[impl.find("[") + 1 : impl.find("]")] if impl.startswith("lora_kernels") else None
    W = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=case == "dropout")
    if case == "dropout":
        A = torch.randn(r, K, device=device, dtype=dtype, requires_grad=True)
        B = torch.randn(N, r, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        p = 0.1 if "p=0.1" in impl else 0.0
        if backend:
            fwd = lambda: lora_kernels.lora_linear(x, W, None, A, B, 2.0, dropout_p=p, backend=backend)  # noqa: E731
        else:
            fwd = lambda: F.linear(x, W) + F.linear(F.linear(F.dropout(x, p), A), B) * 2.0  # noqa: E731
        return lambda: torch.autograd.grad(fwd(), (x, A, B), dy)
    A = torch.randn(N_ADAPTERS, r, K, device=device, dtype=dtype) / K**0.5
    B = torch.randn(N_ADAPTERS, N, r, device=device, dtype=dtype) / r**0.5
    ids = torch.arange(M, device=device) % N_ADAPTERS
    scales = [2.0] * N_ADAPTERS
    if impl.endswith("1 adapter"):
        return lambda: lora_kernels.lora_linear(x, W, None, A[0], B[0], 2.0, backend=backend)
    if backend:
        return lambda: lora_kernels.lora_linear_multi(x, W, None, A, B, scales, ids, backend=backend)
    import peft

    holder = torch.nn.Module()
    holder.base = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    holder.base.weight.data.copy_(W)
    for i in range(N_ADAPTERS):
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["base"])
        peft.inject_adapter_in_model(config, holder, adapter_name=f"a{i}")
        holder.base.lora_A[f"a{i}"].weight.data.copy_(A[i])
        holder.base.lora_B[f"a{i}"].weight.data.copy_(B[i])
    holder.eval()
    names = [f"a{i % N_ADAPTERS}" for i in range(M)]
    x3 = x.unsqueeze(1)  # PEFT's adapter_names are per sample: one row per sample
    return lambda: holder.base(x3, adapter_names=names)


def test_features(feature_case, info):
    case, impl = feature_case
    if impl.startswith("peft mixed"):
        pytest.importorskip("peft")
    K, N = info.shapes[0]
    M, r = max(info.ms), info.ranks[0]
    sets = [
        make_step(case, impl, K, N, M, r, info.dtype, info.device)
        for _ in range(input_sets_needed((M * K + N * K + M * N) * info.dtype.itemsize, info.device, cap=4))
    ]
    run = lambda i: sets[i]()  # noqa: E731
    with torch.set_grad_enabled(case == "dropout"):  # multi: inference
        eager = time_eager(run, len(sets), info.reps, 5, info.device)
        graph = time_graph(run, len(sets), info.reps, info.device)
    RESULTS["features"].append(
        dict(case=case, impl=impl, K=K, N=N, M=M, r=r, eager=eager.as_dict(), graph=graph and graph.as_dict())
    )
    t = graph or eager
    progress(info, "features", f"{case} {impl}: {t.median_ms:.4f} ms [{t.q1_ms:.4f}, {t.q3_ms:.4f}]")
