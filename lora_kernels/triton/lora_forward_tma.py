"""The large-M fused forward for Hopper:  y = x·W₀ᵀ + bias + xa·Bᵀ, with xa = s·x·Aᵀ given.

Built the way Hopper GEMMs reach their peak, unlike the pointer-based kernel of lora_forward.py
(which wins at small M, where the op is launch- and memory-bound):

- a persistent grid, one program per SM, each walking the output tiles in the grouped order
  (programs running together share W₀'s column tiles in L2);
- TMA loads and stores through device-side tensor descriptors (``tl.make_tensor_descriptor``):
  no address arithmetic or masks in the K loop, the tile edges clipped by the hardware;
- warp specialization of the K loop (``tl.range(..., warp_specialize=True)``): a producer warp
  group (40 registers) issues the TMA loads into a ring of shared-memory stages, two consumer
  warp groups (232 registers) run the wgmmas on halves of the tile, so the tensor cores do not
  wait for loads. Triton applies it on sm_90 only to a loop of descriptor loads with num_warps = 4
  (triton 3.6 and 3.8; not to the flattened persistent loop, as on Blackwell). With x·Aᵀ inside
  the loop it triplicates that product, so xa comes in precomputed, once per row (by cuBLAS, or
  the fused-dropout pass): r/N of the main product's FLOPs, and one more read of x.

The rank-r term is one more K step on the same accumulator, ``[xa | Bᵀ]`` (BLOCK_R ≤ 128 wide),
so y is written once, by a TMA store. The tile loop is not pipelined (num_stages=1): pipelined, it
multi-buffers the xa and B tiles and the r = 128 launch no longer fits in shared memory.

Opt-in (LORA_KERNELS_TMA_FORWARD_ROWS) until it has been timed on a GPU: the compile for sm_90a is
checked (tests/triton/gpu_compile.py: TMA, warp specialization, no serialized wgmma, no spills),
the arithmetic under the interpreter.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _env
from ._common import INTERPRETING, cast_to, cdiv, grouped_tile, kernel_flags, rank_block, sm_count
from ._launch import launch


@triton.jit
def _lora_forward_tma_kernel(
    # Pointers: the tensors, in global memory (row-major, unit stride in the last dimension)
    x_ptr,
    w_ptr,
    bias_ptr,
    xa_ptr,
    b_ptr,
    y_ptr,
    # Sizes, and the row strides in elements (the last dimension of each tensor is dense)
    M,
    N,
    K,
    R,
    stride_xm,
    stride_wn,
    stride_sm,
    stride_bn,
    stride_ym,
    # Meta-parameters (compile time): code paths, then tile sizes and the grid
    HAS_BIAS: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
):
    # Tensor descriptors: shape and strides of each operand, and the tile one TMA copy moves.
    # Loads past an edge read zeros; stores past an edge are dropped.
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    xa_desc = tl.make_tensor_descriptor(xa_ptr, shape=[M, R], strides=[stride_sm, 1], block_shape=[BLOCK_M, BLOCK_R])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, R], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_R])
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[stride_ym, 1], block_shape=[BLOCK_M, BLOCK_N])

    k_steps = tl.cdiv(K, BLOCK_K)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    # One loop over (tile, K step) pairs (flatten): the producer runs ahead across tile boundaries.
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, num_stages=1):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(k_steps, warp_specialize=WARP_SPECIALIZE):
            x = x_desc.load([off_m, k * BLOCK_K])
            w = w_desc.load([off_n, k * BLOCK_K])
            if UPCAST:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, w.T, acc, input_precision=DOT_PRECISION)
        # the rank-r term: one more K step, [xa | Bᵀ] (columns R..BLOCK_R read as zeros)
        xa = xa_desc.load([off_m, 0])
        b = b_desc.load([off_n, 0])
        if UPCAST:
            xa, b = xa.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(xa, b.T, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            offs_n = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y_desc.store([off_m, off_n], cast_to(acc, y_desc.dtype, UPCAST))


# The forward uses this kernel from this many rows of x up (0: never).
MIN_ROWS = int(_env.value("LORA_KERNELS_TMA_FORWARD_ROWS"))

# Tiles: 128×128 output tiles with 64-wide K steps, 4 stages (the producer keeps 3 K steps in
# flight), the shape Triton's persistent-matmul tutorial uses on Hopper. num_warps = 4: with more,
# Triton does not warp-specialize on sm_90.
TILES = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
LAUNCH = dict(num_warps=4, num_stages=4)


def tma_forward_reason(x, weight, lora_B) -> Optional[str]:
    """None if the TMA kernel can run on these tensors (with xa and y of the forward's own
    allocation, dense (M, r) and (M, N)), else why not: then the pointer-based kernel runs."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"{x.dtype} (the TMA kernel is for 16-bit activations)"
    if weight.dtype is not x.dtype or lora_B.dtype is not x.dtype:
        return "the weight and lora_B must be in x's dtype"
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] < 9:
        return "TMA needs compute capability 9.0 (Hopper) or newer"
    N, R = lora_B.shape
    if R > 128:
        return f"rank {R} > 128"
    if (N * x.element_size()) % 16 or (R * x.element_size()) % 16:
        return f"out_features {N} or rank {R}: rows of y or xa would not be 16-byte aligned"
    for name, t in (("x", x), ("weight", weight), ("lora_B", lora_B)):
        # TMA: a dense last dimension, rows 16-byte aligned, a 16-byte aligned start
        if t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return f"{name} is not 16-byte aligned with a dense last dimension"
    return None


def _allocate_descriptor_scratch(size: int, alignment: int, stream):
    """The global memory Triton keeps device-side tensor descriptors in (set by triton.set_allocator)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def tma_forward(x, weight, bias, xa, lora_B, out=None, warp_specialize: bool = True) -> torch.Tensor:
    """``x·weightᵀ + bias + xa·lora_Bᵀ`` for 2-D tensors that :func:`tma_forward_reason` accepts,
    xa dense (M, r) in x's dtype and bias (if any) contiguous; written into ``out`` if given (dense (M, N))."""
    M, K = x.shape
    N, R = lora_B.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype) if out is None else out
    if not INTERPRETING:
        triton.set_allocator(_allocate_descriptor_scratch)
    tiles = cdiv(M, TILES["BLOCK_M"]) * cdiv(N, TILES["BLOCK_N"])
    programs = max(1, min(tiles, sm_count(x.device)))
    launch(
        _lora_forward_tma_kernel,
        (programs,),
        x,
        weight,
        bias if bias is not None else y,
        xa,
        lora_B,
        y,
        M,
        N,
        K,
        R,
        x.stride(0),
        weight.stride(0),
        xa.stride(0),
        lora_B.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        WARP_SPECIALIZE=warp_specialize,
        BLOCK_R=rank_block(R),
        NUM_PROGRAMS=programs,
        **kernel_flags(x.dtype),
        **TILES,
        **LAUNCH,
    )
    return y
