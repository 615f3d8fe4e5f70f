"""Triton backend: fused forward (lora_forward.py) and fused backward (lora_backward.py),
registered as the torch.library ops ``lora_kernels::triton_forward`` / ``triton_backward``."""

from ..ops import define_ops
from ._common import dropout_mask, tuned_configs, unavailable_reason
from .lora_backward import fused_backward
from .lora_forward import fused_forward

forward, backward = define_ops("triton", fused_forward, fused_backward)
FUSED_DROPOUT = True  # drops elements of x in-kernel from a seed: no mask or dropped copy of x is stored

__all__ = ["FUSED_DROPOUT", "backward", "dropout_mask", "forward", "tuned_configs", "unavailable_reason"]
