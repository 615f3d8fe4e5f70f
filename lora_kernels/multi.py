"""Multi-adapter batches: every row of x has its own LoRA adapter (or none), fused with the base
GEMM in one pass, like PEFT's mixed batch without its per-adapter Python loop.

The n adapters are stacked into one rank-n·r LoRA, A (n·r, in) and B (out, n·r); the fused kernel
computes each row's product with all of them and keeps, per row, only its own adapter's r columns
(times that adapter's scale) before the rank-n·r product with B. The extra work is n·r/out of the
base GEMM (6% for 8 adapters of rank 16 at out = 4096); backward reuses the fused kernels with g
masked the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch, reference
from ._checks import check_lora_linear_args
from .dispatch import FUNCTORCH, Dispatch, resolve
from .function import differentiate, in_functorch_transform, rows
from .precision import autocast_args, autocast_dtype


class LoRALinearMultiFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scales, adapter_ids, backend):
        n, r, K = lora_A.shape
        N = weight.shape[0]
        ops = dispatch.backend(backend)
        x2d = rows(x)
        ids = adapter_ids.reshape(-1).to(device=x.device, dtype=torch.int32).contiguous()
        a_all = lora_A.reshape(n * r, K)
        b_all = lora_B.permute(1, 0, 2).reshape(N, n * r)  # (out, n·r): a copy of n·r·out elements
        y2d, xa = ops.forward(
            x2d, weight, bias, a_all, b_all, 1.0, adapter_ids=ids, adapter_scales=scales, adapter_rank=r
        )
        ctx.save_for_backward(x, weight, lora_A, lora_B, a_all, b_all, xa, ids, scales, adapter_ids)
        ctx.shapes, ctx.backend = (n, r), backend
        return y2d.reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, a_all, b_all, xa, ids, scales, adapter_ids = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: the reference loop differentiated by autograd
            y = reference.lora_linear_multi_reference(x, weight, None, lora_A, lora_B, scales, adapter_ids)
            dx, d_weight, d_lora_A, d_lora_B = differentiate(
                y, dy, (x, weight, lora_A, lora_B), [need[i] for i in (0, 1, 3, 4)]
            )
            return dx, d_weight, rows(dy).sum(0) if need[2] else None, d_lora_A, d_lora_B, None, None, None
        n, r = ctx.shapes
        x2d, dy2d = rows(x), rows(dy)
        dx, d_a, d_b, _ = dispatch.backend(ctx.backend).backward(
            dy2d, x2d, weight, a_all, b_all, xa, 1.0, True, adapter_ids=ids, adapter_scales=scales, adapter_rank=r
        )
        d_lora_A = d_a.reshape(n, r, -1)
        d_lora_B = d_b.reshape(-1, n, r).permute(1, 0, 2)
        d_weight = dy2d.t() @ x2d if need[1] else None  # a trainable W₀ gets its true gradient, as in lora_linear
        d_bias = dy2d.sum(0) if need[2] else None
        return dx.reshape(x.shape), d_weight, d_bias, d_lora_A, d_lora_B, None, None, None


def lora_linear_multi(x, weight, bias, lora_A, lora_B, scales, adapter_ids, backend="auto"):
    """``y[m] = x[m]·W₀ᵀ + bias + scales[a]·(x[m]·A[a]ᵀ)·B[a]ᵀ`` with ``a = adapter_ids[m]``
    (−1: base only). ``lora_A`` (n, r, in), ``lora_B`` (n, out, r), ``scales`` n numbers (or an
    (n,) tensor), ``adapter_ids`` integers of shape ``x.shape[:-1]``. Gradients flow to x, A, B and bias.

    Backends: ``"triton"`` and ``"cuda"`` (fused), ``"reference"`` (a loop over adapters),
    ``"auto"`` (Triton on CUDA tensors).
    """
    return _lora_linear_multi(x, weight, bias, lora_A, lora_B, scales, adapter_ids, backend)[0]


def _lora_linear_multi(x, weight, bias, lora_A, lora_B, scales, adapter_ids, backend):
    """:func:`lora_linear_multi`, also returning the Dispatch it made (layers record it)."""
    if not isinstance(lora_A, torch.Tensor) or lora_A.dim() != 3:
        raise ValueError(
            f"lora_A must be a (n_adapters, r, in_features) tensor, got "
            f"{tuple(lora_A.shape) if isinstance(lora_A, torch.Tensor) else type(lora_A).__name__}"
        )
    if not isinstance(lora_B, torch.Tensor) or lora_B.dim() != 3 or lora_B.shape[0] != lora_A.shape[0]:
        raise ValueError(
            f"lora_B must be a (n_adapters={lora_A.shape[0]}, out_features, r) tensor, got "
            f"{tuple(lora_B.shape) if isinstance(lora_B, torch.Tensor) else type(lora_B).__name__}"
        )
    n = lora_A.shape[0]
    amp = autocast_dtype(x.device.type) if isinstance(x, torch.Tensor) else None
    if amp is not None:  # as lora_linear: x, W₀, bias in the autocast dtype, fp32 adapters read as they are
        x, weight, bias, lora_A, lora_B = autocast_args(amp, x, weight, bias, lora_A, lora_B)
    check_lora_linear_args(
        x,
        weight,
        bias,
        lora_A[0] if n else lora_A.reshape(0, lora_A.shape[-1]),
        lora_B[0] if n else lora_B.reshape(lora_B.shape[1], 0),
        1.0,
        0.0,
        backend,
    )
    scales = torch.as_tensor(scales, dtype=torch.float32, device=x.device).reshape(-1)
    if scales.shape[0] != n or not torch.isfinite(scales).all():
        raise ValueError(f"scales must be {n} finite numbers, got {scales.tolist()}")
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.is_floating_point() or adapter_ids.is_complex():
        raise TypeError("adapter_ids must be an integer tensor")
    if tuple(adapter_ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"adapter_ids must have shape {tuple(x.shape[:-1])} (one id per row of x), got {tuple(adapter_ids.shape)}"
        )
    capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if adapter_ids.numel() and not capturing and (adapter_ids.min() < -1 or adapter_ids.max() >= n):
        raise ValueError(
            f"adapter_ids must be in [-1, {n}), got values in [{int(adapter_ids.min())}, {int(adapter_ids.max())}]"
        )
    chosen = resolve(backend, x, by_size=False)
    if in_functorch_transform():  # torch.func sees the plain-torch loop (see lora_linear)
        chosen = FUNCTORCH
    if chosen.backend == "reference":
        return reference.lora_linear_multi_reference(x, weight, bias, lora_A, lora_B, scales, adapter_ids), chosen
    return LoRALinearMultiFunction.apply(x, weight, bias, lora_A, lora_B, scales, adapter_ids, chosen.backend), chosen


# PEFT's mixed batch: one adapter name per sample, this name for a sample that runs the base layer alone.
BASE_ONLY_NAME = "__base__"
BASE_ONLY = Dispatch("merged", True, f"mixed batch of {BASE_ONLY_NAME!r} rows only: a plain F.linear", "merged")


def lora_linear_mixed_batch(x, weight, bias, adapters, adapter_names, backend):
    """PEFT's mixed batch as one fused call, for LoRA layers and patched PEFT layers alike.

    ``adapters``: {name: (lora_A (r, in), lora_B (out, r), scale)} for the names of
    ``adapter_names`` (one per sample, x.shape[0]) that have an adapter; a sample whose name is not
    in it runs the base layer alone. Returns (y, the Dispatch made).
    """
    if not adapters:
        return F.linear(x, weight, bias), BASE_ONLY
    names = list(adapters)
    lora_A, lora_B = stack_adapters([adapters[n][0] for n in names], [adapters[n][1] for n in names])
    scales = [adapters[n][2] for n in names]
    ids = sample_adapter_ids(adapter_names, {n: i for i, n in enumerate(names)}, x)
    return _lora_linear_multi(x, weight, bias, lora_A, lora_B, scales, ids, backend)


def stack_adapters(lora_As, lora_Bs):
    """Stack adapters of possibly different ranks as (n, r_max, in) and (n, out, r_max); the zero
    padding is exact (it adds zero terms). Differentiable: gradients reach each adapter."""
    r_max = max(a.shape[0] for a in lora_As)
    stacked_A = torch.stack([F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a in lora_As])
    stacked_B = torch.stack([F.pad(b, (0, r_max - b.shape[1])) for b in lora_Bs])
    return stacked_A, stacked_B


def sample_adapter_ids(adapter_names, index, x):
    """PEFT's mixed-batch convention: one adapter name per sample (x.shape[0]); a name absent from
    ``index`` (e.g. BASE_ONLY_NAME) means the base layer alone. Returns ids of shape x.shape[:-1]."""
    if x.dim() < 2 or len(adapter_names) != x.shape[0]:
        raise ValueError(
            f"adapter_names must name one adapter per sample: {x.shape[0] if x.dim() > 1 else 0} "
            f"expected, got {len(adapter_names)}"
        )
    ids = torch.tensor([index.get(n, -1) for n in adapter_names], device=x.device)
    return ids.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
