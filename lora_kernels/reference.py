"""The LoRA math, written once, in plain torch.

    y = x·W₀ᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ        W₀ (out, in) frozen, A (r, in), B (out, r)

Three things live here:

* :func:`lora_linear_reference` — the differentiable definition. Tests run it in float64 under
  autograd and compare every backend against it.
* :func:`forward` / :func:`backward` — the same math split the way the fused kernels split it
  (the ``reference`` backend). Every backend implements exactly these two signatures on 2-D
  tensors, so :mod:`lora_kernels.dispatch` can hand any of them to the autograd Function.
* :func:`dropout_keep` — the dropout mask the Triton and CUDA kernels draw from a seed.

Names used throughout the package:
    x_lora = dropout(x)  (x itself when there is no dropout)
    xa     = s·x_lora·Aᵀ (M, r)   kept from forward for dB; the only M-sized extra that is saved
    g      = dY·B        (M, r)   the rank-r projection of the output gradient
"""

from __future__ import annotations

import math

import torch
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
    fastest unfused form measured (bench/results/, H100), which ``backend="auto"`` uses for large M on a GPU.
    fp32 adapters on a 16-bit x are rounded to x's dtype first (r·(in + out) elements; see
    :mod:`lora_kernels.precision`)."""
    lora_A, lora_B = _in_dtype(lora_A, x.dtype), _in_dtype(lora_B, x.dtype)
    xa = F.linear(x if x_lora is None else x_lora, lora_A).mul_(scale)
    return F.linear(x, weight, bias).addmm_(xa, lora_B.t()), xa


def backward(dy, x_lora, weight, lora_A, lora_B, xa, scale, fuse_lora_dx=True):
    """2-D backward of the backend contract for a frozen W₀: returns ``(dx, dA, dB, g)``.

    ``dx = dY·W₀ + s·g·A`` when ``fuse_lora_dx``, else only ``dY·W₀`` (the caller then applies the
    dropout mask to the LoRA term itself). ``dA = s·gᵀ·x_lora``, ``dB = dYᵀ·xa``, accumulated in
    fp32 by the matmuls and returned in the adapters' own dtype (fp32 adapters on a 16-bit dy: the
    activation-dtype result widened, as autocast's gradient of a cast weight is).
    """
    adapter_A, adapter_B = lora_A, lora_B
    lora_A, lora_B = _in_dtype(lora_A, dy.dtype), _in_dtype(lora_B, dy.dtype)
    g = dy @ lora_B
    dx = dy @ weight
    if fuse_lora_dx:
        dx.addmm_(g, lora_A, alpha=scale)
    d_lora_A = (g.t() @ x_lora).mul_(scale).to(adapter_A.dtype)
    d_lora_B = (dy.t() @ xa).to(adapter_B.dtype)
    return dx, d_lora_A, d_lora_B, g


def _in_dtype(t, dtype):
    return t if t.dtype is dtype else t.to(dtype)


# Fused dropout (the Triton and CUDA kernels): element (m, k) of x (M×K) is kept iff its uniform draw
# is ≥ p. Draws come four at a time from Philox-4×32-10 (Salmon et al. 2011, as Triton's
# tl.randint4x computes it): key (seed low 32 bits, high 32 bits), counter (k // 4, m, 0, 0), output
# k % 4, read as int32 x and mapped to (x < 0 ? ~x : x)·4.6566127342e-10 in fp32 (tl.rand4x). Any
# kernel, whatever its tiling, redraws the same mask from the seed; here it is once more in int64
# torch arithmetic.
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
_LOW32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b):
    """(a·b) >> 32 and (a·b) mod 2³² of 32-bit unsigned a (an int) and b (an int64 tensor), without
    overflowing int64: b is split into 16-bit halves."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_part = a * b_lo  # < 2⁴⁸
    mid = a * b_hi + (lo_part >> 16)  # < 2⁴⁹
    return mid >> 16, ((mid & 0xFFFF) << 16 | (lo_part & 0xFFFF)) & _LOW32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int):
    """Philox-4×32-10 (Salmon et al. 2011) of counters c0..c3 (int64 tensors of 32-bit values) and
    key (k0, k1): the four 32-bit outputs."""
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND[1], c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND[0], c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _LOW32, (k1 + _PHILOX_KEY[1]) & _LOW32
    return c0, c1, c2, c3


def dropout_keep(seed: int, M: int, K: int, p: float, device=None):
    """The (M, K) bool keep-mask the fused-dropout kernels draw for ``seed`` (see above)."""
    groups = (K + 3) // 4
    c0 = torch.arange(groups, dtype=torch.int64, device=device).expand(M, groups)
    c1 = torch.arange(M, dtype=torch.int64, device=device)[:, None].expand(M, groups) & _LOW32
    zero = torch.zeros_like(c0)
    draws = torch.stack(philox4x32(c0, c1, zero, zero, seed & _LOW32, (seed >> 32) & _LOW32), dim=-1)
    x = draws.reshape(M, groups * 4)[:, :K]  # column 4g + i: output i of group g
    x = torch.where(x >= 2**31, x - 2**32, x)  # the int32 bit pattern
    x = torch.where(x < 0, -x - 1, x)
    uniform = x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)
    return uniform >= torch.tensor(p, dtype=torch.float32)


def lora_linear_multi_reference(x, weight, bias, lora_A, lora_B, scales, adapter_ids):
    """Multi-adapter batch, one adapter per row of x: ``lora_A`` (n, r, in), ``lora_B`` (n, out, r),
    ``scales`` (n,), ``adapter_ids`` (x.shape[:-1]) with −1 for the base layer alone. Written as a loop
    over adapters (an independent formulation from the kernels' stacked one)."""
    y = F.linear(x, weight, bias)
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)  # fp32 adapters on a 16-bit base
    for a in range(lora_A.shape[0]):
        rows = (adapter_ids == a).unsqueeze(-1).to(x.dtype)
        y = y + float(scales[a]) * F.linear(F.linear(x * rows, lora_A[a]), lora_B[a])
    return y
