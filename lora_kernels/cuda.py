"""CUDA backend: a thin wrapper over the ``torch.ops.lora_kernels.cuda_*`` ops built from csrc/."""

from __future__ import annotations

import torch

from .ops import backward_fake, forward_fake, register_autocast
from .precision import KERNEL_DTYPES

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    _LOAD_ERROR = None
    for _op, _fake in (("lora_kernels::cuda_forward", forward_fake), ("lora_kernels::cuda_backward", backward_fake)):
        torch.library.register_fake(_op)(_fake)
        register_autocast(_op)
except ImportError as exc:  # a CPU-only install, or built with LORA_KERNELS_SKIP_CUDA_BUILD=1
    _LOAD_ERROR = exc

SUPPORTED_DTYPES = KERNEL_DTYPES
# Dropout from a seed: the kernels redraw the Triton kernels' mask (reference.dropout_keep) inside
# each op, so no mask or dropped copy of x is kept between forward and backward.
FUSED_DROPOUT = True


def extension_loaded() -> bool:
    return _LOAD_ERROR is None


def wgmma_supported() -> bool:
    """Whether the sm_90a wgmma GEMM can run on the current GPU (an H100/H200 and a build for 9.0a).
    It is used for the large products only when ``LORA_KERNELS_WGMMA=1``: until it has been checked
    and timed on a GPU it is opt-in."""
    return _LOAD_ERROR is None and torch.cuda.is_available() and _C.wgmma_supported()


def unavailable_reason(x: torch.Tensor):
    """None if the CUDA ops can run on tensors like ``x``, else a sentence saying why not."""
    if _LOAD_ERROR is not None:
        return (
            f"the CUDA extension lora_kernels._C is not built ({_LOAD_ERROR}); install with a CUDA "
            "build of torch and nvcc present: pip install --no-build-isolation ."
        )
    if x.device.type != "cuda":
        return f"tensors are on {x.device}; the CUDA kernels need CUDA tensors"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"the CUDA kernels take float16, bfloat16 or float32, got {x.dtype}"
    return None


def forward(
    x,
    weight,
    bias,
    lora_A,
    lora_B,
    scale,
    x_lora=None,
    dropout_p=0.0,
    seed=None,
    adapter_ids=None,
    adapter_scales=None,
    adapter_rank=0,
):
    """Backend contract (see :mod:`lora_kernels.reference`): 2-D x → ``(y, xa)``; fused dropout and
    multi-adapter batches as in :mod:`lora_kernels.ops`."""
    bias = None if bias is None else bias.contiguous()  # the kernel reads bias with unit stride
    return torch.ops.lora_kernels.cuda_forward(
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        scale,
        x_lora,
        dropout_p,
        seed,
        adapter_ids=adapter_ids,
        adapter_scales=adapter_scales,
        adapter_rank=adapter_rank,
    )


def backward(
    dy,
    x_lora,
    weight,
    lora_A,
    lora_B,
    xa,
    scale,
    fuse_lora_dx=True,
    dropout_p=0.0,
    seed=None,
    adapter_ids=None,
    adapter_scales=None,
    adapter_rank=0,
):
    """Backend contract: returns ``(dx, dA, dB, g)``. With ``dropout_p`` and the forward's ``seed``,
    ``x_lora`` is the undropped x."""
    return torch.ops.lora_kernels.cuda_backward(
        dy,
        x_lora,
        weight,
        lora_A,
        lora_B,
        xa,
        scale,
        fuse_lora_dx,
        dropout_p,
        seed,
        adapter_ids=adapter_ids,
        adapter_scales=adapter_scales,
        adapter_rank=adapter_rank,
    )
