"""The large-M kernel for Hopper: one GEMM plus a rank-r term, for the forward and for dX.

    forward  y  = x·W₀ᵀ + xa·Bᵀ + bias      xa = s·x·Aᵀ  (M, r), given
    dX       dX = dY·W₀ + mask ⊙ (s·g)·A   g = dY·B     (M, r), given; mask: fused dropout's, redrawn

Both are ``out = P·op(Q) + U·op(V)`` with Q = W₀ (N, K) and V a LoRA factor; they differ only in
which dimension of Q and V is the output one (``TRANSPOSED``: the forward's W₀ᵀ and Bᵀ). Built
the way Hopper GEMMs reach their peak, unlike the pointer-based kernels of lora_forward.py and
lora_backward.py (which win at small M, where the op is launch- and memory-bound):

- a persistent grid, one program per SM, each walking the output tiles in the grouped order
  (programs running together share W₀'s tiles in L2);
- TMA loads and stores through device-side tensor descriptors (``tl.make_tensor_descriptor``):
  no address arithmetic or masks in the K loop, the tile edges clipped by the hardware;
- warp specialization of the K loop (``tl.range(..., warp_specialize=True)``): a producer warp
  group (40 registers) issues the TMA loads into a ring of shared-memory stages, two consumer
  warp groups (232 registers) run the wgmmas on halves of the tile, so the tensor cores do not
  wait for loads. Triton applies it on sm_90 only to a loop of descriptor loads with num_warps = 4
  (triton 3.6 and 3.8; not to the flattened persistent loop, as on Blackwell). With x·Aᵀ inside
  the loop it triplicates that product, so the rank-r left factor comes in precomputed, once per
  row (by cuBLAS, or the fused-dropout pass): r/N of the main product's FLOPs, one more read of P.

The rank-r term is one more K step on the same accumulator, ``[U | op(V)]`` (BLOCK_R ≤ 128 wide),
so the output is written once, by a TMA store; under fused dropout (dX) it is a separate product,
masked elementwise by the forward's mask redrawn from its seed before it is added. The tile loop
is not pipelined (num_stages=1): pipelined, it multi-buffers the U and V tiles and the r = 128
launch no longer fits in shared memory.

Opt-in (LORA_KERNELS_TMA_ROWS) until it has been timed on a GPU: the compile for sm_90a is
checked (tests/triton/gpu_compile.py: TMA, warp specialization, no serialized wgmma, no spills),
the arithmetic under the interpreter.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _env
from ._common import (
    INTERPRETING,
    cast_to,
    cdiv,
    dropout_uniform,
    grouped_tile,
    kernel_flags,
    rank_block,
    sm_count,
)
from ._launch import launch


@triton.jit
def _gemm_low_rank_tma_kernel(
    # Pointers: the tensors, in global memory (the last dimension of each is dense)
    p_ptr,
    q_ptr,
    u_ptr,
    v_ptr,
    bias_ptr,
    out_ptr,
    seed_ptr,
    # Sizes: out is (M, N), the main product reduces over K, the low-rank one over R
    M,
    N,
    K,
    R,
    dropout_p,
    # Row strides, in elements
    stride_pm,
    stride_q,
    stride_um,
    stride_v,
    stride_om,
    # Meta-parameters (compile time): code paths, then tile sizes and the grid
    HAS_BIAS: tl.constexpr,
    LOW_RANK: tl.constexpr,
    DROPOUT: tl.constexpr,
    TRANSPOSED: tl.constexpr,
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
    p_desc = tl.make_tensor_descriptor(p_ptr, shape=[M, K], strides=[stride_pm, 1], block_shape=[BLOCK_M, BLOCK_K])
    u_desc = tl.make_tensor_descriptor(u_ptr, shape=[M, R], strides=[stride_um, 1], block_shape=[BLOCK_M, BLOCK_R])
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[stride_om, 1], block_shape=[BLOCK_M, BLOCK_N])
    if TRANSPOSED:  # Q (N, K) and V (N, R): the forward's W₀ and B
        q_desc = tl.make_tensor_descriptor(q_ptr, shape=[N, K], strides=[stride_q, 1], block_shape=[BLOCK_N, BLOCK_K])
        v_desc = tl.make_tensor_descriptor(v_ptr, shape=[N, R], strides=[stride_v, 1], block_shape=[BLOCK_N, BLOCK_R])
    else:  # Q (K, N) and V (R, N): dX's W₀ and A
        q_desc = tl.make_tensor_descriptor(q_ptr, shape=[K, N], strides=[stride_q, 1], block_shape=[BLOCK_K, BLOCK_N])
        v_desc = tl.make_tensor_descriptor(v_ptr, shape=[R, N], strides=[stride_v, 1], block_shape=[BLOCK_R, BLOCK_N])

    seed = tl.load(seed_ptr) if DROPOUT else 0
    k_steps = tl.cdiv(K, BLOCK_K)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, num_stages=1):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(k_steps, warp_specialize=WARP_SPECIALIZE):
            p = p_desc.load([off_m, k * BLOCK_K])
            q = q_desc.load([off_n, k * BLOCK_K]).T if TRANSPOSED else q_desc.load([k * BLOCK_K, off_n])
            if UPCAST:
                p, q = p.to(tl.float32), q.to(tl.float32)
            acc = tl.dot(p, q, acc, input_precision=DOT_PRECISION)
        if LOW_RANK:  # one more K step, [U | op(V)] (columns R..BLOCK_R read as zeros)
            u = u_desc.load([off_m, 0])
            v = v_desc.load([off_n, 0]).T if TRANSPOSED else v_desc.load([0, off_n])
            if UPCAST:
                u, v = u.to(tl.float32), v.to(tl.float32)
            if DROPOUT:  # dX: the LoRA branch saw dropout(x), so its share goes through the same mask
                rows = off_m + tl.arange(0, BLOCK_M)
                keep = dropout_uniform(seed, rows, off_n, BLOCK_N) >= dropout_p
                low_rank = tl.dot(u, v, input_precision=DOT_PRECISION)
                acc += tl.where(keep, low_rank * (1.0 / (1.0 - dropout_p)), 0.0)
            else:
                acc = tl.dot(u, v, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            offs_n = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out_desc.store([off_m, off_n], cast_to(acc, out_desc.dtype, UPCAST))


# triton 3.6's warp-specialization pass rejects the dropout mask's interleave (tl.join: "Unexpected
# op"); there the masked dX runs on the same TMA pipeline without warp specialization.
_WS_WITH_DROPOUT = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 8)

# The forward and dX use this kernel from this many rows of x up (0: never).
MIN_ROWS = int(_env.value("LORA_KERNELS_TMA_ROWS"))

# Tiles: 128×128 output tiles with 64-wide K steps, 4 stages (the producer keeps 3 K steps in
# flight), the shape Triton's persistent-matmul tutorial uses on Hopper. num_warps = 4: with more,
# Triton does not warp-specialize on sm_90.
TILES = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
LAUNCH = dict(num_warps=4, num_stages=4)


def tma_reason(rank: int, out_features: int, *operands: torch.Tensor) -> Optional[str]:
    """None if the kernel can read ``operands`` (2-D, one 16-bit dtype) and write an output with
    ``out_features`` columns beside a rank-``rank`` left factor (both of the wrapper's own
    allocation, dense), else why not: then the pointer-based kernels run."""
    dtype = operands[0].dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{dtype} (the TMA kernel is for 16-bit activations)"
    if any(t.dtype is not dtype for t in operands):
        return "the weights must be in the activations' dtype"
    device = operands[0].device
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return "TMA needs compute capability 9.0 (Hopper) or newer"
    if rank > 128:
        return f"rank {rank} > 128"
    if (out_features * dtype.itemsize) % 16 or (rank * dtype.itemsize) % 16:
        return f"{out_features} output columns or rank {rank}: rows would not be 16-byte aligned"
    for t in operands:  # TMA: a dense last dimension, rows 16-byte aligned, a 16-byte aligned start
        if t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return "an operand is not 16-byte aligned with a dense last dimension"
    return None


def _allocate_descriptor_scratch(size: int, alignment: int, stream):
    """The global memory Triton keeps device-side tensor descriptors in (set by triton.set_allocator)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def gemm_low_rank(
    p, q, u, v, bias, out, transposed: bool, dropout_p=0.0, seed=None, warp_specialize: bool = True
) -> torch.Tensor:
    """``out = p·op(q) + u·op(v) + bias`` (op: transposed or not; ``u`` None: no rank-r term), for
    tensors :func:`tma_reason` accepts, ``out`` dense and bias (if any) contiguous. With
    ``dropout_p`` > 0 the rank-r term is masked elementwise by the fused-dropout mask of ``seed``
    (out's element (m, n) as x's (m, k): dX)."""
    M, N = out.shape
    K = p.shape[1]
    R = u.shape[1] if u is not None else 16
    if not INTERPRETING:
        triton.set_allocator(_allocate_descriptor_scratch)
    tiles = cdiv(M, TILES["BLOCK_M"]) * cdiv(N, TILES["BLOCK_N"])
    programs = max(1, min(tiles, sm_count(p.device)))
    specialize = warp_specialize and (dropout_p == 0.0 or _WS_WITH_DROPOUT)
    # unspecialized, one warp group would hold the whole 128×128 accumulator (and spill): two do
    options = LAUNCH if specialize else dict(LAUNCH, num_warps=8)
    launch(
        _gemm_low_rank_tma_kernel,
        (programs,),
        p,
        q,
        u if u is not None else out,
        v if v is not None else out,
        bias if bias is not None else out,
        out,
        seed if seed is not None else out,
        M,
        N,
        K,
        R,
        dropout_p,
        p.stride(0),
        q.stride(0),
        u.stride(0) if u is not None else out.stride(0),
        v.stride(0) if v is not None else out.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        LOW_RANK=u is not None,
        DROPOUT=dropout_p > 0.0,
        TRANSPOSED=transposed,
        WARP_SPECIALIZE=specialize,
        BLOCK_R=rank_block(R),
        NUM_PROGRAMS=programs,
        **kernel_flags(p.dtype),
        **TILES,
        **options,
    )
    return out


def forward_reason(x, weight, lora_B) -> Optional[str]:
    """Why the forward cannot take this kernel (None if it can)."""
    return tma_reason(lora_B.shape[1], weight.shape[0], x, weight, lora_B)


def forward(x, weight, bias, xa, lora_B, out):
    """y = x·W₀ᵀ + xa·Bᵀ + bias into ``out`` (M, N)."""
    return gemm_low_rank(x, weight, xa, lora_B, bias, out, transposed=True)


def dx_reason(dy, weight, lora_A) -> Optional[str]:
    """Why dX cannot take this kernel (None if it can)."""
    return tma_reason(lora_A.shape[0], weight.shape[1], dy, weight, lora_A)


def dx(dy, weight, g_scaled, lora_A, out, dropout_p=0.0, seed=None):
    """dX = dY·W₀ + mask ⊙ (s·g)·A into ``out`` (M, K), the mask the fused-dropout forward drew from
    ``seed`` (none at ``dropout_p`` = 0); ``g_scaled`` None: dY·W₀ alone."""
    return gemm_low_rank(dy, weight, g_scaled, lora_A, None, out, transposed=False, dropout_p=dropout_p, seed=seed)
