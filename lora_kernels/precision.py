"""The dtype a LoRA call computes in, written once for every entry point.

Two set-ups cover almost all LoRA training today, and both run the fused kernels:

* **fp32 adapters on a 16-bit base** (PEFT's default, ``autocast_adapter_dtype=True``): x, W₀ and
  bias in bf16 or fp16, ``lora_A`` / ``lora_B`` in fp32. Each backend rounds A and B to the
  activation dtype once per call (r·(in + out) elements; never a pass over x or W₀), so the tensor
  cores multiply in the activation dtype with fp32 accumulation, as autocast would. y and dX come
  back in x's dtype, dA and dB in fp32.
* **torch.autocast** over an fp32 (or mixed) model: x, W₀ and bias are cast to the autocast dtype,
  as autocast casts ``nn.Linear``'s arguments; fp32 adapters are handled as above, adapters of
  the other 16-bit dtype are cast too. float64 tensors are left alone, as autocast leaves them.

Anything else (say bf16 x with an fp32 W₀ outside autocast, which ``F.linear`` rejects too) is a
``TypeError`` naming the arguments and their dtypes; :func:`dtype_mix_error` says why.
"""

from __future__ import annotations

from typing import Optional

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton and CUDA kernels take
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)  # autocast never casts float64


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``device_type``, or None (also for devices without autocast,
    such as "meta")."""
    if device_type not in ("cuda", "cpu") and not torch.amp.is_autocast_available(device_type):
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def to_autocast_dtype(t, dtype):
    if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_ELIGIBLE and t.dtype is not dtype:
        return t.to(dtype)
    return t


def autocast_args(dtype: torch.dtype, x, weight, bias, lora_A, lora_B):
    """The arguments as autocast would hand them to ``nn.Linear``: x, W₀, bias in ``dtype``; adapters
    kept in fp32 (the backends round them once per call) or cast from the other 16-bit dtype."""
    x, weight, bias = to_autocast_dtype(x, dtype), to_autocast_dtype(weight, dtype), to_autocast_dtype(bias, dtype)
    if isinstance(lora_A, torch.Tensor) and lora_A.dtype in HALF_DTYPES:
        lora_A = to_autocast_dtype(lora_A, dtype)
    if isinstance(lora_B, torch.Tensor) and lora_B.dtype in HALF_DTYPES:
        lora_B = to_autocast_dtype(lora_B, dtype)
    return x, weight, bias, lora_A, lora_B


def adapters_fit(activation: torch.dtype, adapter: torch.dtype) -> bool:
    """Whether adapters stored in ``adapter`` run with activations in ``activation``: the same
    dtype, or fp32 adapters on a 16-bit base."""
    return adapter is activation or (adapter is torch.float32 and activation in HALF_DTYPES)


def dtype_mix_error(x, weight, bias, lora_A, lora_B) -> str:
    """'' if these tensors' dtypes are a combination the op computes (see the module docstring),
    else a sentence naming the arguments and their dtypes."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype is not x.dtype:
            return (
                f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; x, weight and bias must share one "
                "dtype (under torch.autocast they are cast to the autocast dtype)"
            )
    if lora_A.dtype is not lora_B.dtype:
        return f"lora_A has dtype {lora_A.dtype} but lora_B has dtype {lora_B.dtype}; the adapters must share one dtype"
    if not adapters_fit(x.dtype, lora_A.dtype):
        return (
            f"lora_A and lora_B have dtype {lora_A.dtype} but x has dtype {x.dtype}; the adapters must have "
            "x's dtype, or be float32 on a float16/bfloat16 base"
        )
    return ""
