"""Fused LoRA backward for a frozen W₀: dX, dA, dB in two launches; dW₀ is never computed.

    g  = dY·B                 (M, r)
    dX = dY·W₀ + s·g·A        kernel 1: one (BLOCK_M, BLOCK_K) tile of dX per program
    dA = s·gᵀ·x_lora          kernel 2: programs [0, tiles_k) own column tiles of dA,
    dB = dYᵀ·xa               programs [tiles_k, tiles_k + tiles_n) own row tiles of dB

Kernel 1 walks N: each dY tile it loads feeds both dY·W₀ and dY·B, and after the loop s·g·A is
one more N-tile added to the same accumulator, so dX is written once. The first column of
programs stores g for kernel 2. Kernel 2 reduces over M; to fill the GPU when the outputs are
small (r×K, N×r) the M range is split across a second grid axis into fp32 partial sums that are
added in a fixed order afterwards — deterministic, no atomics.

Reads: dY twice (kernel 1, and the dB half of kernel 2), x once (dA half of kernel 2), W₀ once
per row tile of dX (once in total when M ≤ BLOCK_M), xa and g once each.
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
def _lora_dx_kernel(
    # Pointers: the tensors, in global memory
    dy_ptr,
    w_ptr,
    a_ptr,
    b_ptr,
    dx_ptr,
    g_ptr,
    seed_ptr,
    ids_ptr,
    scales_ptr,
    # Sizes and scalars
    M,
    N,
    K,
    R,
    scale,
    dropout_p,
    n_adapters,
    adapter_rank,
    # Strides, in elements: x[i, j] is at x_ptr + i·stride_xm + j·stride_xk, and so on
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_dxm,
    stride_dxk,
    stride_gm,
    stride_gr,
    # Meta-parameters (compile time): code paths, then tile sizes
    FUSE_LORA_DX: tl.constexpr,
    DROPOUT: tl.constexpr,
    MULTI: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m, mask_k, mask_r = offs_m < M, offs_k < K, offs_r < R

    dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn  # (BM, BN)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk  # (BN, BK) of W₀
    b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br  # (BN, BR) of B
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # At least one trip (never launched with N = 0): see the forward kernel's K loop (C7515).
    for n in range(0, tl.maximum(tl.cdiv(N, BLOCK_N), 1)):
        n_left = N - n * BLOCK_N
        dy = tl.load(dy_ptrs, mask=mask_m[:, None] & (offs_n[None, :] < n_left), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_n[:, None] < n_left) & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=(offs_n[:, None] < n_left) & mask_r[None, :], other=0.0)
        if UPCAST:
            dy, w, b = dy.to(tl.float32), w.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        acc_g = tl.dot(dy, b, acc_g, input_precision=DOT_PRECISION)
        dy_ptrs += BLOCK_N * stride_dyn
        w_ptrs += BLOCK_N * stride_wn
        b_ptrs += BLOCK_N * stride_bn

    acc_g = tl.where(mask_r[None, :], acc_g, 0.0)  # the rank padding stays zero where dY holds inf (0·inf)
    if MULTI:  # g of row m only through its own adapter, with that adapter's scale (dA then needs no scale)
        acc_g = adapter_rows(acc_g, ids_ptr, scales_ptr, offs_m, mask_m, offs_r, n_adapters, adapter_rank)
    g = cast_to(acc_g, g_ptr.dtype.element_ty, UPCAST)
    g_mask = mask_m[:, None] & mask_r[None, :]
    g_mask = tl.where(pid_k == 0, g_mask, False)  # the first split only (where(), as in the forward's xa store)
    tl.store(g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr, g, mask=g_mask)
    if FUSE_LORA_DX:
        sg = cast_to(acc_g * scale, g_ptr.dtype.element_ty, UPCAST)
        a = tl.load(
            a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
            mask=mask_r[:, None] & mask_k[None, :],
            other=0.0,
        )  # (BR, BK) of A
        if UPCAST:
            sg, a = sg.to(tl.float32), a.to(tl.float32)
        if DROPOUT:  # the LoRA branch saw dropout(x): its share of dX goes through the same mask
            keep = dropout_uniform(tl.load(seed_ptr), offs_m, pid_k * BLOCK_K, BLOCK_K) >= dropout_p
            lora_dx = tl.dot(sg, a, input_precision=DOT_PRECISION)
            acc += tl.where(keep, lora_dx * (1.0 / (1.0 - dropout_p)), 0.0)
        else:
            acc = tl.dot(sg, a, acc, input_precision=DOT_PRECISION)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, cast_to(acc, dx_ptr.dtype.element_ty, UPCAST), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _reduce_over_rows(
    lhs_ptr,
    stride_lm,
    stride_lc,
    rhs_ptr,
    stride_rm,
    stride_rc,
    out_ptr,
    stride_oc,
    stride_od,
    out_scale,
    m_start,
    m_end,
    C,
    D,
    pid_c,
    seed,
    dropout_p,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[c, d] = out_scale·Σ_{m in [m_start, m_end)} lhs[m, c]·rhs[m, d] for one BLOCK_C tile of c,
    all d, in out's dtype (an fp32 partial sum, or the gradient itself when there is one split).
    With DROPOUT, lhs (M, C) is x and its dropped elements are zeroed."""
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = m_start + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_c, mask_d = offs_c < C, offs_d < D
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    # At least one trip (every split has rows): a loop that may run zero times makes the compiler
    # zero the accumulator on that path between the wgmmas and their wait, and ptxas then
    # serializes them (C7515).
    for _ in range(0, tl.maximum(tl.cdiv(m_end - m_start, BLOCK_M), 1)):
        mask_m = offs_m < m_end
        lhs_t = tl.load(
            lhs_ptr + offs_c[:, None] * stride_lc + offs_m[None, :] * stride_lm,
            mask=mask_c[:, None] & mask_m[None, :],
            other=0.0,
        )  # (BC, BM)
        rhs = tl.load(
            rhs_ptr + offs_m[:, None] * stride_rm + offs_d[None, :] * stride_rc,
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )  # (BM, BD)
        if DROPOUT:
            lhs_t = tl.where(tl.trans(dropout_uniform(seed, offs_m, pid_c * BLOCK_C, BLOCK_C)) >= dropout_p, lhs_t, 0.0)
        if UPCAST:
            lhs_t, rhs = lhs_t.to(tl.float32), rhs.to(tl.float32)
        acc = tl.dot(lhs_t, rhs, acc, input_precision=DOT_PRECISION)
        offs_m += BLOCK_M
    out_ptrs = out_ptr + offs_c[:, None] * stride_oc + offs_d[None, :] * stride_od
    tl.store(
        out_ptrs, cast_to(acc * out_scale, out_ptr.dtype.element_ty, UPCAST), mask=mask_c[:, None] & mask_d[None, :]
    )


@triton.jit
def _lora_dadb_kernel(
    # Pointers: the tensors, in global memory
    g_ptr,
    x_ptr,
    dy_ptr,
    xa_ptr,
    da_part_ptr,
    db_part_ptr,
    seed_ptr,
    # Sizes and scalars
    M,
    N,
    K,
    R,
    rows_per_split,
    dropout_p,
    da_scale,
    # Strides, in elements: x[i, j] is at x_ptr + i·stride_xm + j·stride_xk, and so on
    stride_gm,
    stride_gr,
    stride_xm,
    stride_xk,
    stride_dym,
    stride_dyn,
    stride_sm,
    stride_sr,
    # Meta-parameters (compile time): code paths, then tile sizes
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    m_start = split.to(tl.int64) * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    tiles_k = tl.cdiv(K, BLOCK_K)
    seed = tl.load(seed_ptr) if DROPOUT else 0
    if pid < tiles_k:  # dAᵀ tile (BK, R) = dropout(x)ᵀ·g, stored transposed into dA (R, K)
        _reduce_over_rows(
            x_ptr,
            stride_xm,
            stride_xk,
            g_ptr,
            stride_gm,
            stride_gr,
            da_part_ptr + split.to(tl.int64) * R * K,
            1,
            K,
            da_scale,
            m_start,
            m_end,
            K,
            R,
            pid,
            seed,
            dropout_p,
            DROPOUT,
            UPCAST,
            DOT_PRECISION,
            BLOCK_M,
            BLOCK_K,
            BLOCK_R,
        )
    else:  # dB tile (BN, R) = dYᵀ·xa
        _reduce_over_rows(
            dy_ptr,
            stride_dym,
            stride_dyn,
            xa_ptr,
            stride_sm,
            stride_sr,
            db_part_ptr + split.to(tl.int64) * N * R,
            R,
            1,
            1.0,
            m_start,
            m_end,
            N,
            R,
            pid - tiles_k,
            seed,
            dropout_p,
            False,
            UPCAST,
            DOT_PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_R,
        )


def _num_splits(M: int, tiles: int, block_m: int, sms: int) -> int:
    """Split the M reduction so tiles × splits ≈ 2 waves of the GPU's SMs, each split ≥ 4 row blocks."""
    if INTERPRETING:
        return min(2, cdiv(M, block_m))
    return max(1, min(cdiv(2 * sms, tiles), cdiv(M, 4 * block_m)))


@on_tensor_device
def fused_backward(
    dy: torch.Tensor,
    x_lora: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scale: float,
    fuse_lora_dx: bool = True,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    adapter_ids: Optional[torch.Tensor] = None,
    adapter_scales: Optional[torch.Tensor] = None,
    adapter_rank: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend contract (see :mod:`lora_kernels.reference`): returns ``(dx, dA, dB, g)``.

    With ``dropout_p > 0`` and ``seed`` (fused dropout), ``x_lora`` is the undropped x: the kernels
    regenerate the forward's mask for the LoRA share of dX and for dA. Multi-adapter batches as in
    fused_forward: the returned g is then already masked and scaled per row. fp32 adapters on a
    16-bit dy: dA and dB are written in fp32 from the fp32 accumulators."""
    multi = adapter_ids is not None
    fused_dropout = dropout_p > 0.0
    if fused_dropout and seed is None:
        raise ValueError("fused dropout needs the forward's seed tensor")
    M, N = dy.shape
    K = weight.shape[1]
    R = lora_A.shape[0]
    if M == 0 or N == 0 or K == 0:  # nothing to tile: g = dY·B is zero or empty, so is every LoRA term
        return reference.backward(dy, x_lora, weight, lora_A, lora_B, xa, scale, fuse_lora_dx)
    adapter_dtype_A, adapter_dtype_B = lora_A.dtype, lora_B.dtype  # dA, dB are written in these (fp32 from fp32)
    lora_A, lora_B = as_activation_dtype(lora_A, lora_B, dy.dtype)
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    g = torch.empty((M, R), device=dy.device, dtype=dy.dtype)
    flags = kernel_flags(dy.dtype)
    block_r = rank_block(R)
    dx_flags = dict(
        FUSE_LORA_DX=fuse_lora_dx, DROPOUT=fused_dropout and fuse_lora_dx, MULTI=multi, BLOCK_R=block_r, **flags
    )
    cfg = tile_config("dx", M, R, dy.dtype, dropout=dx_flags["DROPOUT"])  # its tiles also shape the dA/dB launch
    if (  # large M on Hopper (opt-in): g once per row, then dX by the warp-specialized TMA kernel (tma_gemm.py)
        0 < tma_gemm.MIN_ROWS <= M and not multi and tma_gemm.dx_reason(dy, weight, lora_A) is None
    ):
        torch.mm(dy, lora_B, out=g)  # into the g allocated above
        masked = dict(dropout_p=dropout_p, seed=seed) if dx_flags["DROPOUT"] else {}
        tma_gemm.dx(dy, weight, g * scale if fuse_lora_dx else None, lora_A, out=dx, **masked)
    else:
        args = (
            dy,
            weight,
            lora_A,
            lora_B,
            dx,
            g,
            seed if fused_dropout else g,
            adapter_ids if multi else g,
            adapter_scales if multi else g,
            M,
            N,
            K,
            R,
            scale,
            dropout_p,
            adapter_scales.shape[0] if multi else 0,
            adapter_rank,
            *dy.stride(),
            *weight.stride(),
            *lora_A.stride(),
            *lora_B.stride(),
            *dx.stride(),
            *g.stride(),
        )

        def launch_dx(cfg):
            grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(K, cfg["BLOCK_K"]),)
            launch(_lora_dx_kernel, grid, *args, **dx_flags, **cfg)

        key = lambda: ("dx", next_power_of_2(M), N, K, R, dy.dtype, tuple(sorted(dx_flags.items())))  # noqa: E731
        cfg = tuned(key, cfg, launch_dx)
        launch_dx(cfg)

    block_m = 32 if INTERPRETING else 64
    tiles = cdiv(K, cfg["BLOCK_K"]) + cdiv(N, cfg["BLOCK_N"])
    splits = _num_splits(M, tiles, block_m, sm_count(dy.device))
    rows_per_split = cdiv(cdiv(M, splits), block_m) * block_m
    splits = cdiv(M, rows_per_split)
    da_scale = (1.0 if multi else scale) / (1.0 - dropout_p)  # g carries the scale in multi-adapter mode
    if splits == 1:  # (always at M ≤ 256) the kernel writes the gradients themselves: no reduction launches
        da_out = torch.empty((R, K), device=dy.device, dtype=adapter_dtype_A)
        db_out = torch.empty((N, R), device=dy.device, dtype=adapter_dtype_B)
    else:  # fp32 partial sums per split, added below in a fixed order (deterministic)
        da_out = torch.empty((splits, R, K), device=dy.device, dtype=torch.float32)
        db_out = torch.empty((splits, N, R), device=dy.device, dtype=torch.float32)
    launch(
        _lora_dadb_kernel,
        (tiles, splits),
        g,
        x_lora,
        dy,
        xa,
        da_out,
        db_out,
        seed if fused_dropout else g,
        M,
        N,
        K,
        R,
        rows_per_split,
        dropout_p,
        da_scale if splits == 1 else 1.0,
        *g.stride(),
        *x_lora.stride(),
        *dy.stride(),
        *xa.stride(),
        DROPOUT=fused_dropout,
        BLOCK_M=block_m,
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_R=block_r,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **flags,
    )
    if splits == 1:
        return dx, da_out, db_out, g
    d_lora_A = da_out.sum(0).mul_(da_scale).to(adapter_dtype_A)
    d_lora_B = db_out.sum(0).to(adapter_dtype_B)
    return dx, d_lora_A, d_lora_B, g
