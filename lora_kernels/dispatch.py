"""Which backend runs a call: the backend registry, the ``auto`` policy and its thresholds.

Every entry point (lora_linear, LoRALinear, patched PEFT layers, multi-adapter batches, tensor
parallelism) asks :func:`resolve` and then calls :func:`backend` (the module implementing the
2-D contract of :mod:`lora_kernels.reference`). The decision comes back as a :class:`Dispatch`,
which layers keep for :func:`lora_kernels.explain`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import cuda, reference

BACKENDS = ("auto", "reference", "triton", "cuda")  # what backend= accepts

# Backend modules, imported once here (not per call) so torch.compile can trace the dispatch.
_MODULES = {"reference": reference, "cuda": cuda}
try:
    from . import triton as _triton

    _MODULES["triton"] = _triton
except ImportError as _exc:  # triton is optional on CPU-only installs
    _TRITON_MISSING = f"triton is not importable ({_exc}); pip install triton"


def backend(name: str):
    """The module of a resolved backend name ("reference", "triton" or "cuda")."""
    return _MODULES[name]


def is_resolved(name: str) -> bool:
    """Whether ``name`` is an installed backend (not "auto", not a missing one)."""
    return name in _MODULES


class Limit(NamedTuple):
    rows: int
    measured: str  # where the measurement behind it is written down


# backend="auto" on a GPU: rows of x up to which a kernel path wins; the measurements and the
# reasoning are in bench/results/auto-policy.md.
AUTO_LIMITS = {
    "triton_max_rows": Limit(512, "H100, bf16, r = 16: fused Triton vs three cuBLAS calls"),
    "triton_max_rows_high_rank": Limit(16, "H100, bf16, r = 64: fused Triton vs Unsloth-style addmm"),
    "triton_max_rows_fp32": Limit(16, "H100, Table 1 fp32 at batch 1/128: exact fp32 dots lost at 128 rows"),
    "cuda_max_rows": Limit(4, "H100, bf16 inference at M = 1 and 4: CUDA decode kernel vs Triton"),
}
AUTO_TRITON_MAX_ROWS = AUTO_LIMITS["triton_max_rows"].rows
AUTO_TRITON_MAX_ROWS_HIGH_RANK = AUTO_LIMITS["triton_max_rows_high_rank"].rows
AUTO_TRITON_MAX_ROWS_FP32 = AUTO_LIMITS["triton_max_rows_fp32"].rows
AUTO_CUDA_MAX_ROWS = AUTO_LIMITS["cuda_max_rows"].rows


class Dispatch(NamedTuple):
    """Which backend a call ran and why; layers keep their last one (see :func:`lora_kernels.explain`).
    ``key`` names the kind of reason, so a layer logs each kind once."""

    backend: str
    fused: bool
    why: str
    key: str


# The common decisions, made once (no per-call formatting).
_EXPLICIT = {
    name: Dispatch(name, name != "reference", f"backend={name!r} requested", "explicit")
    for name in ("reference", "triton", "cuda")
}
_AUTO_TRITON = Dispatch(
    "triton",
    True,
    f"auto: fused Triton kernels (up to {AUTO_TRITON_MAX_ROWS} rows at r <= 16, "
    f"{AUTO_TRITON_MAX_ROWS_HIGH_RANK} at r > 16 or fp32)",
    "auto-triton",
)
_AUTO_TRITON_ANY_SIZE = Dispatch(
    "triton", True, "auto: fused Triton kernels (dropout or multi-adapter batch: any size)", "auto-triton"
)
_AUTO_TRITON_EXPORT = Dispatch(
    "triton",
    True,
    "auto under torch.export with a dynamic row count: fused Triton kernels for every size (an exported "
    "program cannot choose by size without fixing its range; pass backend= to choose yourself)",
    "auto-export",
)
_AUTO_CUDA = Dispatch(
    "cuda", True, f"auto: CUDA decode kernel (16-bit inference at <= {AUTO_CUDA_MAX_ROWS} rows)", "auto-cuda"
)
FUNCTORCH = Dispatch(
    "reference",
    False,
    "inside a torch.func transform (grad, vmap, jacrev, ...): the "
    "plain-torch definition, which the transforms see as ordinary ops",
    "functorch",
)


def _cuda_decode_fits(x: torch.Tensor, inference: bool, out_features: int) -> bool:
    """16-bit inference at few rows, in the decode kernel's tensor-core layout (N ≥ 256, K % 8 == 0)."""
    if not inference or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    few_rows = x.numel() <= AUTO_CUDA_MAX_ROWS * x.shape[-1]
    return few_rows and out_features >= 256 and x.shape[-1] % 8 == 0 and cuda.unavailable_reason(x) is None


def _triton_row_limit(dtype: torch.dtype, rank: int) -> int:
    if dtype == torch.float32:
        return AUTO_TRITON_MAX_ROWS_FP32
    if rank > 16:
        return AUTO_TRITON_MAX_ROWS_HIGH_RANK
    return AUTO_TRITON_MAX_ROWS


def _auto(x: torch.Tensor, by_size: bool, inference: bool, out_features: int, rank: int) -> Dispatch:
    """backend="auto" for a CUDA tensor (see AUTO_LIMITS). Under torch.export with a dynamic row
    count, comparing it with a limit would add a guard that fails the export (or fixes its range),
    so the size is not asked: the fused Triton kernels run at any size."""
    exported = by_size and torch.compiler.is_exporting() and not isinstance(x.numel(), int)
    by_size = by_size and not exported
    if by_size and _cuda_decode_fits(x, inference, out_features):
        return _AUTO_CUDA
    if "triton" not in _MODULES:
        return Dispatch("reference", False, f"auto: {_TRITON_MISSING}", "triton-missing")
    reason = _MODULES["triton"].unavailable_reason(x)
    if reason is not None:
        return Dispatch("reference", False, f"auto: {reason}", "triton-unavailable")
    if not by_size:
        return _AUTO_TRITON_EXPORT if exported else _AUTO_TRITON_ANY_SIZE
    limit = _triton_row_limit(x.dtype, rank)
    if x.numel() <= limit * x.shape[-1]:
        return _AUTO_TRITON
    rows = x.numel() // max(x.shape[-1], 1)
    return Dispatch(
        "reference",
        False,
        f"auto: {rows} rows > {limit} ({str(x.dtype).removeprefix('torch.')}, "
        f"r={rank}): three cuBLAS calls measured faster",
        "auto-size",
    )


def resolve(
    name: str, x: torch.Tensor, by_size: bool = True, inference: bool = False, out_features: int = 0, rank: int = 0
) -> Dispatch:
    """Resolve ``name`` ("auto" included) to a backend that can run on tensors like ``x``, or raise
    saying why it cannot. ``by_size=False``: auto means Triton whenever it can run (multi-adapter
    batches, whose reference path is a loop over adapters, and dropout). ``inference``: no backward
    will follow (auto may then pick the CUDA decode kernel)."""
    if name == "auto":
        if x.device.type != "cuda":
            return Dispatch(
                "reference",
                False,
                f"auto: tensors on {x.device.type}; the fused kernels run on CUDA "
                "tensors (backend='triton' with TRITON_INTERPRET=1 runs them on CPU, slowly)",
                "device",
            )
        return _auto(x, by_size, inference, out_features, rank)
    if name != "reference":
        reason = _MODULES[name].unavailable_reason(x) if name in _MODULES else _TRITON_MISSING
        if reason is not None:
            raise RuntimeError(f"backend={name!r} cannot run here: {reason}")
    return _EXPLICIT[name]
