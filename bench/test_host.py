"""Host time per eager call, by stage, with every kernel launch stubbed: what our Python costs.

Eager LoRA (generate() without compilation, evaluation inside training) is host-bound at small M:
a layer's time there is the time spent on the host before the GPU has work. This suite measures
each stage of a lora_kernels call with the Triton kernels replaced by no-ops and the Triton
backend accepting CPU tensors, so the same Python runs as on a GPU host, on any machine.

What it cannot see: the launches themselves (a Triton ``JITFunction`` launch, the driver), which
need a GPU; there the layer suite's eager column has everything. Nor a baseline layer's host time:
on a CPU, nn.Linear and PEFT's layer would compute (and on meta tensors torch runs Python meta
functions, which cost more than the GPU path's dispatch). ``torch.empty`` is given as the floor:
one torch op's host cost on this machine.

Stages (inference forward unless the name says training; 4096x4096, r = 16, bf16):
    torch.empty (M, N)      one tensor op, for scale
    prepare_args            autocast look-up + argument checks (lora_kernels.function.prepare_args)
    resolve (auto)          the backend decision backend="auto" makes for a CUDA tensor (lora_kernels.dispatch)
    triton wrapper          lora_kernels.triton.forward's host code: dtype flags, tiles, allocation, grid
    lora_linear             the whole functional call on backend="triton" (the three above + glue)
    LoRALinear              the module's forward (nn.Module call, explain() record, the functional call)
    patched PEFT layer      a PEFT lora.Linear after patch_peft (its per-call checks + the functional
                            call); bf16 adapters, as the fp32 default's two casts would compute here
    nn.Linear 16×16, PEFT layer 16×16
                            for comparison, unpatched and computing on the CPU: tiny shapes, so that
                            their time is mostly host time (an upper bound of it)
    training: lora_linear   forward + backward through the autograd Function (backward kernels stubbed)

and, not stubbed but through Triton's own launch path with only the driver faked
(tests/triton/fake_driver.py: binding, specialisation, cache look-up, CompiledKernel's runner; the
kernels compiled for sm_90 on first use, never run; the C launcher a no-op):
    lora_linear +Triton launch  lora_linear as above, each kernel launched by JITFunction.run
    lora_linear +direct launch  the same with LORA_KERNELS_DIRECT_LAUNCH=1 (lora_kernels/triton/_launch.py)
    training +Triton launch, training +direct launch
                            the training step likewise (three launches)
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import pytest
import torch
from report import RESULTS, progress
from timing import Timing

import lora_kernels
from lora_kernels import dispatch, function

K = N = 4096
RANK = 16
MS = (1, 8, 16, 32)
CALLS_PER_SAMPLE = 200
SAMPLES = 25

triton_backend = pytest.importorskip("lora_kernels.triton")
from lora_kernels.triton import _launch, lora_backward, lora_forward  # noqa: E402
from lora_kernels.triton._common import INTERPRETING  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "triton"))


class _NoLaunch:
    """Stands in for a Triton JITFunction: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stubbed_launches():
    """The Triton kernels replaced by no-ops, and CPU tensors accepted as if on a GPU."""
    names = [
        (lora_forward, "_lora_forward_kernel"),
        (lora_forward, "_dropout_xa_kernel"),
        (lora_backward, "_lora_dx_kernel"),
        (lora_backward, "_lora_dadb_kernel"),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name in names]
    saved_reason = triton_backend.unavailable_reason
    try:
        for mod, name, _ in saved:
            setattr(mod, name, _NoLaunch())
        triton_backend.unavailable_reason = lambda x: None
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        triton_backend.unavailable_reason = saved_reason


def per_call_us(fn) -> Timing:
    """Median etc. of SAMPLES samples, each the mean over CALLS_PER_SAMPLE calls, in µs per call
    (stored in Timing's *_ms fields, which here hold µs)."""
    for _ in range(CALLS_PER_SAMPLE):
        fn()
    samples = []
    for _ in range(SAMPLES):
        t0 = time.perf_counter_ns()
        for _ in range(CALLS_PER_SAMPLE):
            fn()
        samples.append((time.perf_counter_ns() - t0) / CALLS_PER_SAMPLE / 1e3)
    return Timing.of(samples)


def _auto_on_gpu(x, **kw):
    """resolve("auto") past its device test: the branch a CUDA tensor takes."""
    return dispatch._auto(x, by_size=True, inference=kw.get("inference", True), out_features=N, rank=RANK)


def stages(M):
    """{stage: a no-argument callable running it once} for M rows."""
    like = dict(dtype=torch.bfloat16)
    x = torch.zeros(M, K, **like)
    W = torch.zeros(N, K, **like)
    A = torch.zeros(RANK, K, **like)
    B = torch.zeros(N, RANK, **like)
    layer = lora_kernels.LoRALinear(K, N, r=RANK, alpha=32, bias=False, backend="triton", **like)
    layer.requires_grad_(False)
    out = {
        "torch.empty (M, N)": lambda: torch.empty(M, N, **like),
        "prepare_args": lambda: function.prepare_args(x, W, None, A, B, 2.0, 0.0, "triton"),
        "resolve (auto)": lambda: _auto_on_gpu(x),
        "triton wrapper": lambda: triton_backend.forward(x, W, None, A, B, 2.0),
        "lora_linear": lambda: lora_kernels.lora_linear(x, W, None, A, B, 2.0, backend="triton"),
        "LoRALinear": lambda: layer(x),
    }
    peft_layer = _peft_layer(K, N, **like)
    if peft_layer is not None:
        out["patched PEFT layer"] = lambda: peft_layer(x)
        tiny_linear, tiny_peft = torch.nn.Linear(16, 16, bias=False, **like), _peft_layer(16, 16, patched=False, **like)
        tiny_x = torch.zeros(M, 16, **like)
        out["nn.Linear 16×16"] = lambda: tiny_linear(tiny_x)
        out["PEFT layer 16×16"] = lambda: tiny_peft(tiny_x)
    xg = x.clone().requires_grad_()
    Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()
    dy = torch.zeros(M, N, **like)

    def training_step():
        y = lora_kernels.lora_linear(xg, W, None, Ag, Bg, 2.0, backend="triton")
        torch.autograd.backward(y, dy)

    out["training: lora_linear"] = training_step
    return out


def _peft_layer(in_features, out_features, dtype, patched=True):
    """A PEFT LoRA layer (r = 16, adapters in the base's dtype), switched by patch_peft to the Triton
    backend if ``patched``; None without PEFT."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    base = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False, dtype=dtype))
    config = LoraConfig(r=RANK, lora_alpha=32, target_modules=["0"])
    model = get_peft_model(base, config, autocast_adapter_dtype=False).eval().requires_grad_(False)
    if patched:
        lora_kernels.patch_peft(model, backend="triton")
    return model.base_model.model[0]


@pytest.mark.parametrize("M", MS)
def test_host(M, info):
    """The inference stages under no_grad, the training step with autograd, from one set of inputs."""
    with stubbed_launches():
        for name, fn in stages(M).items():
            with contextlib.nullcontext() if name.startswith("training") else torch.no_grad():
                _record(info, name, M, per_call_us(fn))
    if INTERPRETING:  # the interpreter replaced the kernels: there is no launch path to time
        return
    from fake_driver import fake_driver

    stage = stages(M)
    with _accepting_cpu_tensors(), fake_driver(check=False):
        for direct in (False, True):
            with _direct_launch(direct):
                launch = "direct launch" if direct else "Triton launch"
                with torch.no_grad():
                    _record(info, f"lora_linear +{launch}", M, per_call_us(stage["lora_linear"]))
                _record(info, f"training +{launch}", M, per_call_us(stage["training: lora_linear"]))


@contextlib.contextmanager
def _accepting_cpu_tensors():
    saved = triton_backend.unavailable_reason
    triton_backend.unavailable_reason = lambda x: None
    try:
        yield
    finally:
        triton_backend.unavailable_reason = saved


@contextlib.contextmanager
def _direct_launch(on: bool):
    saved = _launch.DIRECT_LAUNCH
    _launch.DIRECT_LAUNCH = on
    try:
        yield
    finally:
        _launch.DIRECT_LAUNCH = saved


def _record(info, stage, M, timing):
    RESULTS["host"].append(dict(stage=stage, M=M, K=K, N=N, r=RANK, us=timing.as_dict()))
    progress(info, "host", f"M={M:<3} {stage:<28} {timing.median_ms:7.1f} µs [{timing.q1_ms:.1f}, {timing.q3_ms:.1f}]")
