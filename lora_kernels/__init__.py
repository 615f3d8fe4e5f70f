"""lora_kernels: fused LoRA forward and backward kernels behind a drop-in nn.Linear replacement.

y = x·W₀ᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ      (W₀ frozen; gradients for x, A, B, bias)
"""

from .explain import explain
from .function import Dispatch, LoRALinearFunction, lora_linear
from .layers import (
    LoRALinear,
    LoRAMixin,
    inject_lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    unmerge_lora,
    wrap_with_lora,
)
from .multi import lora_linear_multi
from .peft_format import load_peft_adapter, save_peft_adapter
from .peft_patch import patch_peft, unpatch_peft
from .reference import lora_linear_multi_reference, lora_linear_reference, lora_scale

__version__ = "0.1.0"


def available_backends(device="cuda"):
    """Backends that can run on ``device`` here, e.g. ``['reference', 'triton', 'cuda']``."""
    import importlib

    import torch

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return ["reference"]
    probe = torch.empty(0, device=device)
    names = ["reference"]
    for name in ("triton", "cuda"):
        try:
            module = importlib.import_module(f"lora_kernels.{name}")
        except ImportError:  # triton not installed
            continue
        if module.unavailable_reason(probe) is None:
            names.append(name)
    return names


__all__ = [
    "Dispatch",
    "LoRALinear",
    "LoRALinearFunction",
    "LoRAMixin",
    "available_backends",
    "explain",
    "inject_lora",
    "load_peft_adapter",
    "lora_linear",
    "lora_linear_multi",
    "lora_linear_multi_reference",
    "lora_linear_reference",
    "lora_scale",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "patch_peft",
    "save_peft_adapter",
    "unmerge_lora",
    "unpatch_peft",
    "wrap_with_lora",
]
