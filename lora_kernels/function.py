"""The autograd Function and the functional entry point :func:`lora_linear`.

Backends all implement the 2-D contract of :mod:`lora_kernels.reference` (``forward`` and
``backward``); this file only flattens leading dimensions, picks a backend, handles dropout (a seed
for backends that fuse it, a materialised mask for the others) and routes gradients. W₀ is frozen:
its gradient is computed only if a caller explicitly asks for it with ``weight.requires_grad=True``
(plain ``dYᵀ·x``, never inside the fused kernels).
"""
from __future__ import annotations

import math

import torch

from . import cuda, reference
from ._checks import check_lora_linear_args


# Backend modules, imported once here (not per call) so torch.compile can trace the dispatch.
_BACKENDS = {"reference": reference, "cuda": cuda}
try:
    from . import triton as _triton

    _BACKENDS["triton"] = _triton
except ImportError as _exc:  # triton is optional on CPU-only installs
    _TRITON_MISSING = f"triton is not importable ({_exc}); pip install triton"


# backend="auto" on a GPU: the fused Triton kernels up to this many rows of x, above it the
# cuBLAS-composed reference path. Measured on an H100 (bf16, r = 16, torch 2.11, 2026-11-22; see
# bench/results/README.md): at M ≤ 128 the fused kernels beat every unfused form, while at
# M ≥ 1024 cuBLAS's GEMM outruns Triton's (triton 3.6 reaches ~550 of cuBLAS's ~780 TFLOP/s), so
# three cuBLAS calls beat one fused pass.
AUTO_TRITON_MAX_ROWS = 512


def _backend(name: str, x: torch.Tensor, by_size: bool = True) -> str:
    """Resolve ``name`` ("auto" included) to a backend that can run on tensors like ``x``, or raise
    saying why it cannot. ``by_size=False``: auto means Triton whenever it can run (multi-adapter
    batches, whose reference path is a loop over adapters)."""
    if name == "reference" or (name == "auto" and x.device.type != "cuda"):
        return "reference"
    if name == "auto":  # the CUDA extension's portable kernel has no tensor cores yet: never auto
        usable = "triton" in _BACKENDS and _BACKENDS["triton"].unavailable_reason(x) is None
        small = not by_size or x.numel() <= AUTO_TRITON_MAX_ROWS * x.shape[-1]
        return "triton" if usable and small else "reference"
    reason = _BACKENDS[name].unavailable_reason(x) if name in _BACKENDS else _TRITON_MISSING
    if reason is not None:
        raise RuntimeError(f"backend={name!r} cannot run here: {reason}")
    return name


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as 2-D (rows, features); an explicit row count, since reshape(-1, 0) is ambiguous."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend):
    """The forward pass shared by the autograd Function and the inference path.
    Returns y and what backward needs: (backend, x2d, x_lora, xa, mask, seed, fused_dropout_p)."""
    # with dropout, auto stays on Triton at any size: its fused dropout stores no M×K mask
    backend = _backend(backend, x, by_size=dropout_p == 0.0)
    ops = _BACKENDS[backend]
    x2d = rows(x)
    mask = seed = None
    fused_dropout = dropout_p > 0.0 and getattr(ops, "FUSED_DROPOUT", False)
    if fused_dropout:  # the kernels draw the mask from this seed (on the device: no sync, graph-safe)
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
        y2d, xa = ops.forward(x2d, weight, bias, lora_A, lora_B, scale, None, dropout_p, seed)
        x_lora = x2d
    else:
        if dropout_p > 0.0:  # materialised; rescaled like nn.Dropout; contiguous: same mask for any layout
            mask = torch.empty(x2d.shape, dtype=x.dtype, device=x.device)
            mask = mask.bernoulli_(1.0 - dropout_p).div_(1.0 - dropout_p)
        x_lora = x2d if mask is None else x2d * mask
        y2d, xa = ops.forward(x2d, weight, bias, lora_A, lora_B, scale, x_lora=None if mask is None else x_lora)
    y = y2d.reshape(*x.shape[:-1], weight.shape[0])
    return y, (backend, x2d, x_lora, xa, mask, seed, dropout_p if fused_dropout else 0.0)


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout_p, backend):
        y, (backend, x2d, x_lora, xa, mask, seed, fused_p) = _forward(
            x, weight, bias, lora_A, lora_B, scale, dropout_p, backend)
        ctx.save_for_backward(x2d if ctx.needs_input_grad[1] else None, x_lora, weight, lora_A, lora_B, xa, mask, seed)
        ctx.backend, ctx.scale, ctx.x_shape, ctx.fused_dropout_p = backend, scale, x.shape, fused_p
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, x_lora, weight, lora_A, lora_B, xa, mask, seed = ctx.saved_tensors
        dy2d = rows(dy)
        fused = {} if seed is None else {"dropout_p": ctx.fused_dropout_p, "seed": seed}
        dx, d_lora_A, d_lora_B, g = _BACKENDS[ctx.backend].backward(
            dy2d, x_lora, weight, lora_A, lora_B, xa, ctx.scale, mask is None, **fused
        )
        if mask is not None:  # the LoRA branch saw dropout(x): its share of dX goes through the mask
            dx = dx + (g @ lora_A).mul_(ctx.scale).mul_(mask)
        d_weight = dy2d.t() @ x2d if ctx.needs_input_grad[1] else None
        d_bias = dy2d.sum(0) if ctx.needs_input_grad[2] else None
        return dx.reshape(ctx.x_shape), d_weight, d_bias, d_lora_A, d_lora_B, None, None, None


def _apply(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend):
    """Inference (no gradient wanted) skips the autograd Function and its few microseconds."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or lora_A.requires_grad
                                    or lora_B.requires_grad or (bias is not None and bias.requires_grad)):
        return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend)
    return _forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend)[0]


def lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p=0.0, backend="auto"):
    """``x·weightᵀ + bias + scale·(dropout(x)·lora_Aᵀ)·lora_Bᵀ`` with a fused backward.

    Args:
        x: ``(..., in_features)``.
        weight: ``(out_features, in_features)``, the frozen base W₀ (no gradient unless it requires one).
        bias: ``(out_features,)`` or ``None``.
        lora_A: ``(r, in_features)``; lora_B: ``(out_features, r)`` (PEFT's layout).
        scale: the LoRA scaling ``alpha / r`` (see :func:`lora_kernels.lora_scale`).
        dropout_p: dropout on the LoRA branch's input; applied whenever it is > 0.
        backend: ``"auto"`` (on a GPU: the fused Triton kernels up to 512 rows of x or with dropout,
            else the cuBLAS-composed reference path; the reference path on CPU), ``"reference"``,
            ``"triton"`` or ``"cuda"``.
    """
    scale = check_lora_linear_args(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend)
    return _apply(x, weight, bias, lora_A, lora_B, scale, float(dropout_p), backend)
