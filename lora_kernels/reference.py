"""The LoRA math, written once, in plain torch.

    y = x·W₀ᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ        W₀ (out, in) frozen, A (r, in), B (out, r)

Two things live here:

* :func:`lora_linear_reference` — the differentiable definition. Tests run it in float64 under
  autograd and compare every backend against it.
* :func:`forward` / :func:`backward` — the same math split the way the fused kernels split it
  (the ``reference`` backend). Every backend implements exactly these two signatures on 2-D
  tensors, so :mod:`lora_kernels.function` can dispatch to any of them in one line.

Names used throughout the package:
    x_lora = dropout(x)  (x itself when there is no dropout)
    xa     = s·x_lora·Aᵀ (M, r)   kept from forward for dB; the only M-sized extra that is saved
    g      = dY·B        (M, r)   the rank-r projection of the output gradient
"""
from __future__ import annotations

import math

import torch.nn.functional as F


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scale, dropout_mask=None):
    """Differentiable reference. ``dropout_mask`` is the already scaled keep-mask (0 or 1/(1-p))."""
    x_lora = x if dropout_mask is None else x * dropout_mask
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x_lora, lora_A), lora_B)


def forward(x, weight, bias, lora_A, lora_B, scale, x_lora=None):
    """2-D forward of the backend contract: returns ``(y, xa)``, both in x's dtype.

    Three cuBLAS calls, the LoRA product accumulated into y in place (Unsloth's ``addmm_``): the
    fastest unfused form measured (bench/results/, H100), which ``backend="auto"`` uses for large M on a GPU."""
    xa = F.linear(x if x_lora is None else x_lora, lora_A).mul_(scale)
    return F.linear(x, weight, bias).addmm_(xa, lora_B.t()), xa


def backward(dy, x_lora, weight, lora_A, lora_B, xa, scale, fuse_lora_dx=True):
    """2-D backward of the backend contract for a frozen W₀: returns ``(dx, dA, dB, g)``.

    ``dx = dY·W₀ + s·g·A`` when ``fuse_lora_dx``, else only ``dY·W₀`` (the caller then applies the
    dropout mask to the LoRA term itself). ``dA = s·gᵀ·x_lora``, ``dB = dYᵀ·xa``.
    """
    g = dy @ lora_B
    dx = dy @ weight
    if fuse_lora_dx:
        dx.addmm_(g, lora_A, alpha=scale)
    d_lora_A = (g.t() @ x_lora).mul_(scale)
    d_lora_B = dy.t() @ xa
    return dx, d_lora_A, d_lora_B, g


def lora_linear_multi_reference(x, weight, bias, lora_A, lora_B, scales, adapter_ids):
    """Multi-adapter batch, one adapter per row of x: ``lora_A`` (n, r, in), ``lora_B`` (n, out, r),
    ``scales`` (n,), ``adapter_ids`` (x.shape[:-1]) with −1 for the base layer alone. Written as a loop
    over adapters (an independent formulation from the kernels' stacked one)."""
    y = F.linear(x, weight, bias)
    for a in range(lora_A.shape[0]):
        rows = (adapter_ids == a).unsqueeze(-1).to(x.dtype)
        y = y + float(scales[a]) * F.linear(F.linear(x * rows, lora_A[a]), lora_B[a])
    return y
