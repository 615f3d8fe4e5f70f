"""Fused LoRA forward in one pass:  y = x·W₀ᵀ + bias + (s·x·Aᵀ)·Bᵀ.

Each program owns one (BLOCK_M, BLOCK_N) tile of y. Its K loop reads a tile of x once and feeds
two tensor-core products from it: x·W₀ᵀ into the output accumulator and x·Aᵀ into a small
(BLOCK_M, r) accumulator. After the loop the rank-r product is one more K-tile, ``[xa | Bᵀ]``,
added into the same accumulator, so y is written once and never read back. The programs of the
first column of tiles also store xa = s·x·Aᵀ (M, r), the only thing backward needs besides x.

Recomputing x·Aᵀ per column tile costs r/BLOCK_N extra FLOPs (1/8 at r=16, BLOCK_N=128) and saves
a launch and a second read of x, which matters most at small M where the op is launch- and
memory-bound.

Fused dropout is the exception: every column tile would redraw the whole mask of its rows
(N/BLOCK_N draws per element of x; on an H100 that made the training step 11× slower at
M = 1024, N = 4096; torch 2.11, triton 3.6, 2026-11-22). There a first, thin pass
(_dropout_xa_kernel) draws each element once and stores xa = s·dropout(x)·Aᵀ, and the main kernel
loads xa as if the caller had given it.

At large M on Hopper (opt-in, LORA_KERNELS_TMA_ROWS) the main kernel is the persistent,
warp-specialized TMA kernel of tma_gemm.py instead, with xa computed once per row first.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import reference
from . import tma_gemm
from ._common import (
    INTERPRETING,
    adapter_rows,
    as_activation_dtype,
    cast_to,
    cdiv,
    dropout_uniform,
    grouped_tile,
    kernel_flags,
    next_power_of_2,
    on_tensor_device,
    rank_block,
    sm_count,
    tile_config,
    tuned,
)
from ._launch import launch


@triton.jit
def _lora_forward_kernel(
    # Pointers: the tensors, in global memory
    x_ptr,
    w_ptr,
    bias_ptr,
    a_ptr,
    b_ptr,
    y_ptr,
    xa_ptr,
    ids_ptr,
    scales_ptr,
    # Sizes and scalars
    M,
    N,
    K,
    R,
    scale,
    n_adapters,
    adapter_rank,
    # Strides, in elements: x[i, j] is at x_ptr + i·stride_xm + j·stride_xk, and so on
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    stride_sm,
    stride_sr,
    # Meta-parameters (compile time): code paths, then tile sizes
    HAS_BIAS: tl.constexpr,
    XA_GIVEN: tl.constexpr,
    MULTI: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # Row/column offsets in int64: M·stride_xm and N·stride_wn can pass 2^31.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m, mask_n, mask_r = offs_m < M, offs_n < N, offs_r < R

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BM, BK)
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (BK, BN) of W₀ᵀ
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar  # (BK, BR) of Aᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # At least one trip (the wrapper never launches with K = 0): a loop that may run zero times makes
    # the compiler zero the accumulators on that path between the wgmmas and their wait, and ptxas
    # then serializes them (C7515; tests/triton/gpu_compile.py checks every launch).
    for k in range(0, tl.maximum(tl.cdiv(K, BLOCK_K), 1)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if not XA_GIVEN:
            a = tl.load(a_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
            acc_xa = tl.dot(x, a, acc_xa, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    xa_ptrs = xa_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr
    xa_mask = mask_m[:, None] & mask_r[None, :]
    if XA_GIVEN:  # dropout: xa came from dropout(x) (the first pass below, or the caller)
        xa = tl.load(xa_ptrs, mask=xa_mask, other=0.0)
    else:
        # Rounded to the input dtype, as an unfused layer would hold it; stored once per row tile.
        # the rank padding (columns R..BLOCK_R, zero in A) is exactly zero, also where x holds inf (0·inf)
        acc_xa = tl.where(mask_r[None, :], acc_xa, 0.0)
        if MULTI:  # row m keeps only the columns of its own adapter, scaled by that adapter's scale
            acc_xa = adapter_rows(acc_xa, ids_ptr, scales_ptr, offs_m, mask_m, offs_r, n_adapters, adapter_rank)
        xa = cast_to(acc_xa * scale, xa_ptr.dtype.element_ty, UPCAST)
        # by the first column tile only; where(), not `&`: triton 3.9's interpreter rejects a block & scalar mask
        tl.store(xa_ptrs, xa, mask=tl.where(pid_n == 0, xa_mask, False))
    b = tl.load(
        b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
        mask=mask_r[:, None] & mask_n[None, :],
        other=0.0,
    )  # (BR, BN) of Bᵀ
    if UPCAST:
        xa, b = xa.to(tl.float32), b.to(tl.float32)
    acc = tl.dot(xa, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, cast_to(acc, y_ptr.dtype.element_ty, UPCAST), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dropout_xa_kernel(
    # Pointers: the tensors, in global memory
    x_ptr,
    a_ptr,
    xa_ptr,
    seed_ptr,
    # Sizes and scalars
    M,
    K,
    R,
    scale,
    dropout_p,
    # Strides, in elements: x[i, j] is at x_ptr + i·stride_xm + j·stride_xk, and so on
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_sm,
    stride_sr,
    # Meta-parameters (compile time): code paths, then tile sizes
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """xa = s·dropout(x)·Aᵀ for one row tile, each element of x dropped once: the fused-dropout
    forward's first pass (its K loop is the main kernel's x·Aᵀ product, with the mask)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m, mask_r = offs_m < M, offs_r < R
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BM, BK)
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar  # (BK, BR) of Aᵀ
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.maximum(tl.cdiv(K, BLOCK_K), 1)):  # at least one trip, as above
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        a = tl.load(a_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0.0)
        if UPCAST:
            x, a = x.to(tl.float32), a.to(tl.float32)
        # zero dropped elements exactly; 1/(1-p) goes into the fp32 scale below
        keep = dropout_uniform(seed, offs_m, k * BLOCK_K, BLOCK_K) >= dropout_p
        acc = tl.dot(tl.where(keep, x, 0.0), a, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    xa = cast_to(acc * (1.0 / (1.0 - dropout_p)) * scale, xa_ptr.dtype.element_ty, UPCAST)
    tl.store(
        xa_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, xa, mask=mask_m[:, None] & mask_r[None, :]
    )


@on_tensor_device
def fused_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    x_lora: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    adapter_ids: Optional[torch.Tensor] = None,
    adapter_scales: Optional[torch.Tensor] = None,
    adapter_rank: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backend contract (see :mod:`lora_kernels.reference`): 2-D x → ``(y, xa)``.

    Reads x once, W₀ once per row tile (once in total when M ≤ BLOCK_M), and writes y once. fp32
    adapters on a 16-bit x are rounded to x's dtype first (see as_activation_dtype).
    Dropout is fused: with ``dropout_p > 0`` a first pass drops elements of x for the LoRA branch
    with a counter-based RNG keyed by ``seed`` (an int64 tensor of one element) while it computes
    xa, and nothing of the mask is stored. A given ``x_lora`` instead (a caller's own dropout) is
    multiplied by cuBLAS and only added in the kernel.

    Multi-adapter batches: with ``adapter_ids`` (M,) int32, lora_A (n·r, K) and lora_B (N, n·r)
    hold n stacked rank-``adapter_rank`` adapters; row m uses adapter ``adapter_ids[m]`` (−1: none)
    with scale ``adapter_scales[id]`` (fp32, n), times ``scale``.
    """
    M, K = x.shape
    N, R = lora_B.shape
    if M == 0 or N == 0 or K == 0:  # nothing to tile; the LoRA term is zero or empty
        return reference.forward(x, weight, bias, lora_A, lora_B, scale, x_lora)
    lora_A, lora_B = as_activation_dtype(lora_A, lora_B, x.dtype)
    if x.stride(-1) != 1:  # any row stride is fine; the feature dimension must be dense
        x = x.contiguous()
    if bias is not None:  # the kernel reads bias with unit stride
        bias = bias.contiguous()
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    fused_dropout = x_lora is None and dropout_p > 0.0
    if fused_dropout and seed is None:
        raise ValueError("fused dropout needs a seed tensor")
    multi = adapter_ids is not None
    if multi and (x_lora is not None or fused_dropout or adapter_scales is None or adapter_rank < 1):
        raise ValueError("multi-adapter batches take adapter_scales and adapter_rank, and no x_lora or dropout")
    flags, block_r = kernel_flags(x.dtype), rank_block(R)
    # large M on Hopper (opt-in): xa once per row, then the warp-specialized TMA kernel (tma_gemm.py)
    tma = 0 < tma_gemm.MIN_ROWS <= M and not multi and tma_gemm.forward_reason(x, weight, lora_B) is None
    if x_lora is not None or (tma and not fused_dropout):
        xa = ((x if x_lora is None else x_lora) @ lora_A.t()).mul_(scale)
    else:
        xa = torch.empty((M, R), device=x.device, dtype=x.dtype)
    if fused_dropout:  # first pass: xa = s·dropout(x)·Aᵀ, each element of x dropped once
        # rows per program: about one program per SM, 16 to 64 rows each (fp32's FMA dots: ≤ 32;
        # the interpreter: 16, few rows per numpy step)
        wide = x.dtype == torch.float32 or INTERPRETING  # FMA dots or numpy steps: smaller tiles
        rows_per_sm = next_power_of_2(cdiv(M, sm_count(x.device)))
        most_rows = 16 if INTERPRETING else (32 if wide else 64)
        block_m = min(most_rows, max(16, rows_per_sm))
        launch(
            _dropout_xa_kernel,
            (cdiv(M, block_m),),
            x,
            lora_A,
            xa,
            seed,
            M,
            K,
            R,
            scale,
            dropout_p,
            *x.stride(),
            *lora_A.stride(),
            *xa.stride(),
            BLOCK_M=block_m,
            BLOCK_K=32 if wide else 128,
            BLOCK_R=block_r,
            num_warps=4,
            num_stages=3,
            **flags,
        )
    if tma:
        return tma_gemm.forward(x, weight, bias, xa, lora_B, out=y), xa
    args = (
        x,
        weight,
        bias if bias is not None else y,
        lora_A,
        lora_B,
        y,
        xa,
        adapter_ids if multi else y,
        adapter_scales if multi else y,
        M,
        N,
        K,
        R,
        scale,
        adapter_scales.shape[0] if multi else 0,
        adapter_rank,
        *x.stride(),
        *weight.stride(),
        *lora_A.stride(),
        *lora_B.stride(),
        *y.stride(),
        *xa.stride(),
    )
    flags.update(HAS_BIAS=bias is not None, XA_GIVEN=x_lora is not None or fused_dropout, MULTI=multi, BLOCK_R=block_r)

    def launch_forward(cfg):
        grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
        launch(_lora_forward_kernel, grid, *args, **flags, **cfg)

    key = lambda: ("forward", next_power_of_2(M), N, K, R, x.dtype, tuple(sorted(flags.items())))  # noqa: E731
    launch_forward(tuned(key, tile_config("forward", M, R, x.dtype), launch_forward))
    return y, xa
