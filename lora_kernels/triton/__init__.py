"""Triton backend: fused forward (forward.py) and fused backward (backward.py)."""
from ._common import unavailable_reason
from .backward import backward
from .forward import forward

__all__ = ["forward", "backward", "unavailable_reason"]
