"""What the Triton forward and backward share: interpreter detection, dtype flags, block sizes."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors with numpy; it computes bf16
# tl.dot and bf16 arithmetic wrongly, so kernels upcast dot operands to fp32 only when interpreting.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unavailable_reason(x: torch.Tensor):
    """None if the Triton kernels can run on tensors like ``x``, else a sentence saying why not."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32, got {x.dtype}"
    if x.device.type == "cuda" or (INTERPRETING and x.device.type == "cpu"):
        return None
    return f"tensors are on {x.device}; the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors)"


def kernel_flags(dtype: torch.dtype) -> dict:
    """Constexpr flags every kernel takes: upcasting in the interpreter, and fp32 dot precision.

    fp32 follows torch's own matmul setting: IEEE fp32 unless the user allowed TF32.
    """
    upcast = INTERPRETING and dtype != torch.float32
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST": upcast, "DOT_PRECISION": "tf32" if tf32 or dtype != torch.float32 else "ieee"}


def rank_block(r: int) -> int:
    """The rank dimension padded to a power of two of at least 16 (tl.dot's smallest GPU tile)."""
    return max(16, triton.next_power_of_2(r))


@triton.jit
def grouped_tile(pid, num_rows, num_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                 GROUP: tl.constexpr):
    """Map a flat program id to (row tile, col tile) in groups of GROUP row tiles, so programs
    running together share column tiles of the (large) weight in L2."""
    tiles_r = tl.cdiv(num_rows, BLOCK_ROWS)
    tiles_c = tl.cdiv(num_cols, BLOCK_COLS)
    per_group = GROUP * tiles_c
    first = (pid // per_group) * GROUP
    size = tl.minimum(tiles_r - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size
