"""Triton backend: fused forward (lora_forward.py) and fused backward (lora_backward.py)."""
from ._common import unavailable_reason
from .lora_backward import backward
from .lora_forward import forward

__all__ = ["forward", "backward", "unavailable_reason"]
