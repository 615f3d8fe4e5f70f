"""The backend contract as ``torch.library`` ops, so torch.compile sees each kernel call as one
opaque op (no graph break) and ``torch.library.opcheck`` can test it.

Every kernel backend provides the two functions of :mod:`lora_kernels.reference`:
    forward(x, weight, bias, lora_A, lora_B, scale, x_lora=None)             -> (y, xa)
    backward(dy, x_lora, weight, lora_A, lora_B, xa, scale, fuse_lora_dx=True) -> (dx, dA, dB, g)
A backend with ``FUSED_DROPOUT = True`` (Triton, CUDA) also takes ``dropout_p`` and a ``seed``
tensor (int64, one element, on the device) in both and drops elements of x inside its kernels, the
mask drawn from the seed as :func:`lora_kernels.reference.dropout_keep` draws it. The kernel
backends (Triton, CUDA) take the
keywords ``adapter_ids`` / ``adapter_scales`` / ``adapter_rank`` for multi-adapter batches (n
adapters stacked as one rank-n·r LoRA; xa and g keep each row's own adapter's columns, times its
scale). The shapes of the outputs are written once here (the fake implementations).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .precision import HALF_DTYPES, to_autocast_dtype


def forward_fake(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    x_lora: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
    adapter_ids: Optional[Tensor] = None,
    adapter_scales: Optional[Tensor] = None,
    adapter_rank: int = 0,
) -> Tuple[Tensor, Tensor]:
    M = x.shape[0]
    return x.new_empty((M, weight.shape[0])), x.new_empty((M, lora_A.shape[0]))


def backward_fake(
    dy: Tensor,
    x_lora: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    scale: float,
    fuse_lora_dx: bool = True,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
    adapter_ids: Optional[Tensor] = None,
    adapter_scales: Optional[Tensor] = None,
    adapter_rank: int = 0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    M = dy.shape[0]
    return (
        dy.new_empty((M, weight.shape[1])),
        lora_A.new_empty(lora_A.shape),
        lora_B.new_empty(lora_B.shape),
        dy.new_empty((M, lora_A.shape[0])),
    )


def define_ops(backend: str, forward_impl, backward_impl):
    """Register ``lora_kernels::{backend}_forward`` / ``_backward`` from plain implementations
    (whose signatures must match the fakes above) and return two functions that call them: the
    ops while torch.compile traces (one opaque node each), the implementations directly in eager
    mode, which skips the op's Python dispatch (7 µs a call on the 2-core development CPU,
    torch 2.14.1, 2026-11-22; eager decoding is bound by such host time)."""
    forward_op = torch.library.custom_op(f"lora_kernels::{backend}_forward", forward_impl, mutates_args=())
    forward_op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(f"lora_kernels::{backend}_backward", backward_impl, mutates_args=())
    backward_op.register_fake(backward_fake)

    def forward(*args, **kwargs):
        return (forward_op if torch.compiler.is_compiling() else forward_impl)(*args, **kwargs)

    def backward(*args, **kwargs):
        return (backward_op if torch.compiler.is_compiling() else backward_impl)(*args, **kwargs)

    register_autocast(f"lora_kernels::{backend}_forward")
    register_autocast(f"lora_kernels::{backend}_backward")
    return forward, backward


# Under torch.autocast the ops compute as lora_linear does (lora_kernels.precision): activations and
# W₀ in the autocast dtype, adapters read in fp32 or cast from the other 16-bit dtype. lora_linear
# casts before it calls them, so this rule only acts on direct calls; registering it also lets
# torch.compile trace the ops under autocast as ordinary ops.
_ACTIVATIONS = ("x", "weight", "bias", "x_lora", "dy", "xa")
_ADAPTERS = ("lora_A", "lora_B")
_LIB = torch.library.Library("lora_kernels", "FRAGMENT")


def register_autocast(qualname: str):
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    names = [a.name for a in op._schema.arguments if not a.kwarg_only]
    for device_type in ("cpu", "cuda"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def autocast_impl(*args, _device_type=device_type, _key=key, **kwargs):
            dtype = torch.get_autocast_dtype(_device_type)
            args = list(args)
            for i, arg_name in enumerate(names[: len(args)]):
                half_adapter = arg_name in _ADAPTERS and getattr(args[i], "dtype", None) in HALF_DTYPES
                if arg_name in _ACTIVATIONS or half_adapter:
                    args[i] = to_autocast_dtype(args[i], dtype)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*args, **kwargs)

        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(autocast_impl)  # what torch.compile's tracing runs
        _LIB.impl(
            name,
            lambda _keyset, *args, _impl=autocast_impl, **kwargs: _impl(*args, **kwargs),
            key_name,
            with_keyset=True,
        )
