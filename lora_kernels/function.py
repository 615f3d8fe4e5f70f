"""The autograd Function and the functional entry point :func:`lora_linear`.

Backends all implement the 2-D contract of :mod:`lora_kernels.reference` (``forward`` and
``backward``); this file only flattens leading dimensions, picks a backend, handles dropout (a seed
for backends that fuse it, a materialised mask for the others) and routes gradients. W₀ is frozen:
its gradient is computed only if a caller explicitly asks for it with ``weight.requires_grad=True``
(plain ``dYᵀ·x``, never inside the fused kernels).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import cuda, reference
from ._checks import check_lora_linear_args
from .precision import autocast_args, autocast_dtype

# Backend modules, imported once here (not per call) so torch.compile can trace the dispatch.
_BACKENDS = {"reference": reference, "cuda": cuda}
try:
    from . import triton as _triton

    _BACKENDS["triton"] = _triton
except ImportError as _exc:  # triton is optional on CPU-only installs
    _TRITON_MISSING = f"triton is not importable ({_exc}); pip install triton"


# backend="auto" on a GPU, from H100 measurements (torch 2.11, triton 3.6, CUDA 13.0, 2026-11-22;
# bench/results/README.md):
# - fp16/bf16: the fused Triton kernels up to AUTO_TRITON_MAX_ROWS rows of x, above it the
#   cuBLAS-composed reference path. At M ≤ 128 the fused kernels beat every unfused form on
#   4096×4096 and come within 0.1× of Unsloth-style addmm on the 11008-wide shapes, while at
#   M ≥ 1024 cuBLAS's GEMM outruns Triton's (triton 3.6 reaches ~550 of cuBLAS's ~780 TFLOP/s), so
#   three cuBLAS calls beat one fused pass. At r > 16 the fused kernels only up to
#   AUTO_TRITON_MAX_ROWS_HIGH_RANK rows: at r = 64 and M = 128 they were 1.48–2.09× cuBLAS x·W₀ᵀ
#   against 1.26–1.63× for the composed path (Unsloth-style addmm), while at M ≤ 16 they still
#   won or tied (forward 1.14–1.48× vs 1.25–1.58×; training 1.36–1.55× vs 1.48–2.15×).
# - fp16/bf16 inference (no autograd) at M ≤ AUTO_CUDA_MAX_ROWS: the CUDA extension's decode kernel
#   on the tensor cores, which needs N ≥ 256 and K % 8 == 0. Measured at M = 1 and 4 (bf16, r = 16
#   and 64): 0.99–1.24× cuBLAS x·W₀ᵀ in graph replay against Triton's 1.14–1.29×, and ~60–95 µs
#   eager against Triton's ~135–200 µs. Not in training: its backward is 2–3.3× Triton's.
# - fp32: Triton only up to AUTO_TRITON_MAX_ROWS_FP32 rows. Its exact fp32 dot (no TF32) lost to
#   cuBLAS at 128 rows (Table 1, batch 1/128: +39.9% over the merged model against PEFT-style
#   code's +5.8%); 16 rows and fewer were not measured and keep the fused kernels.
AUTO_TRITON_MAX_ROWS = 512
AUTO_TRITON_MAX_ROWS_HIGH_RANK = 16
AUTO_TRITON_MAX_ROWS_FP32 = 16
AUTO_CUDA_MAX_ROWS = 4


class Dispatch(NamedTuple):
    """Which backend a call ran and why; layers keep their last one (see :func:`lora_kernels.explain`).
    ``key`` names the kind of reason, so a layer logs each kind once."""

    backend: str
    fused: bool
    why: str
    key: str


def _fused(backend, why, key):
    return Dispatch(backend, True, why, key)


# The common decisions, made once (no per-call formatting).
_EXPLICIT = {
    name: Dispatch(name, name != "reference", f"backend={name!r} requested", "explicit")
    for name in ("reference", "triton", "cuda")
}
_AUTO_TRITON = _fused(
    "triton",
    f"auto: fused Triton kernels (up to {AUTO_TRITON_MAX_ROWS} rows at r <= 16, "
    f"{AUTO_TRITON_MAX_ROWS_HIGH_RANK} at r > 16 or fp32)",
    "auto-triton",
)
_AUTO_TRITON_ANY_SIZE = _fused(
    "triton", "auto: fused Triton kernels (dropout or multi-adapter batch: any size)", "auto-triton"
)
_AUTO_CUDA = _fused("cuda", f"auto: CUDA decode kernel (16-bit inference at <= {AUTO_CUDA_MAX_ROWS} rows)", "auto-cuda")


def _auto(x: torch.Tensor, by_size: bool, inference: bool, out_features: int, rank: int) -> Dispatch:
    if (
        by_size
        and inference
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.numel() <= AUTO_CUDA_MAX_ROWS * x.shape[-1]
        and out_features >= 256
        and x.shape[-1] % 8 == 0
        and cuda.unavailable_reason(x) is None
    ):
        return _AUTO_CUDA
    if "triton" not in _BACKENDS:
        return Dispatch("reference", False, f"auto: {_TRITON_MISSING}", "triton-missing")
    reason = _BACKENDS["triton"].unavailable_reason(x)
    if reason is not None:
        return Dispatch("reference", False, f"auto: {reason}", "triton-unavailable")
    if not by_size:
        return _AUTO_TRITON_ANY_SIZE
    limit = (
        AUTO_TRITON_MAX_ROWS_FP32
        if x.dtype == torch.float32
        else AUTO_TRITON_MAX_ROWS_HIGH_RANK
        if rank > 16
        else AUTO_TRITON_MAX_ROWS
    )
    if x.numel() <= limit * x.shape[-1]:
        return _AUTO_TRITON
    return Dispatch(
        "reference",
        False,
        f"auto: {x.numel() // max(x.shape[-1], 1)} rows > {limit} "
        f"({str(x.dtype).removeprefix('torch.')}, r={rank}): three cuBLAS calls measured faster",
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
        reason = _BACKENDS[name].unavailable_reason(x) if name in _BACKENDS else _TRITON_MISSING
        if reason is not None:
            raise RuntimeError(f"backend={name!r} cannot run here: {reason}")
    return _EXPLICIT[name]


def _backend(
    name: str, x: torch.Tensor, by_size: bool = True, inference: bool = False, out_features: int = 0, rank: int = 0
) -> str:
    """The backend name :func:`resolve` picks."""
    return resolve(name, x, by_size, inference, out_features, rank).backend


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as 2-D (rows, features); an explicit row count, since reshape(-1, 0) is ambiguous."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend, seed=None):
    """The forward pass shared by the autograd Function and the inference path, on a resolved
    ``backend``. ``seed``: the dropout mask's seed where the caller fixes it (tensor parallelism:
    the same mask on every rank), else drawn from torch's generator. Returns y and what backward
    needs: (x2d, x_lora, xa, mask, seed, fused_dropout_p)."""
    ops = _BACKENDS[backend]
    x2d = x if x.dim() == 2 else rows(x)
    mask = None
    fused_dropout = dropout_p > 0.0 and getattr(ops, "FUSED_DROPOUT", False)
    if fused_dropout:  # the kernels draw the mask from this seed (on the device: no sync, graph-safe)
        if seed is None:
            seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
        y2d, xa = ops.forward(x2d, weight, bias, lora_A, lora_B, scale, None, dropout_p, seed)
        x_lora = x2d
    else:
        if dropout_p > 0.0 and seed is not None:  # the fused kernels' mask for this seed, materialised
            mask = reference.dropout_keep(int(seed.item()), *x2d.shape, dropout_p, device=x.device)
            mask = mask.to(x.dtype).div_(1.0 - dropout_p)
        elif dropout_p > 0.0:  # materialised; rescaled like nn.Dropout; contiguous: same mask for any layout
            mask = torch.empty(x2d.shape, dtype=x.dtype, device=x.device)
            mask = mask.bernoulli_(1.0 - dropout_p).div_(1.0 - dropout_p)
        seed = None
        x_lora = x2d if mask is None else x2d * mask
        y2d, xa = ops.forward(x2d, weight, bias, lora_A, lora_B, scale, x_lora=None if mask is None else x_lora)
    y = y2d if x.dim() == 2 else y2d.reshape(*x.shape[:-1], weight.shape[0])
    return y, (x2d, x_lora, xa, mask, seed, dropout_p if fused_dropout else 0.0)


class LoRALinearFunction(torch.autograd.Function):
    """``backend`` is a resolved name ("reference", "triton" or "cuda"; see :func:`resolve`).

    Saved for backward: x, W₀, A, B (the inputs, by reference), xa (M×r) and, with dropout, the
    fused kernels' seed or the reference backend's mask. With ``create_graph=True`` the backward is
    the reference math differentiated by autograd (see :func:`_backward_with_graph`), so second
    derivatives (gradient penalties, ``gradgradcheck``) are exact on every backend."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout_p, backend, seed=None):
        if backend not in _BACKENDS:  # "auto", or a backend that is not installed (raises, saying why)
            backend = resolve(
                backend, x, by_size=dropout_p == 0.0, out_features=weight.shape[0], rank=lora_A.shape[0]
            ).backend
        y, (x2d, x_lora, xa, mask, seed, fused_p) = _forward(
            x, weight, bias, lora_A, lora_B, scale, dropout_p, backend, seed
        )
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, mask, seed)
        ctx.backend, ctx.scale, ctx.dropout_p, ctx.fused_dropout_p = backend, scale, dropout_p, fused_p
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa, mask, seed = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return _backward_with_graph(ctx, dy, x, weight, lora_A, lora_B, mask, seed)
        x2d, dy2d = rows(x), rows(dy)
        fused = {} if seed is None else {"dropout_p": ctx.fused_dropout_p, "seed": seed}
        x_lora = x2d if mask is None else x2d * mask  # the reference backend's dropout(x), rebuilt here
        dx, d_lora_A, d_lora_B, g = _BACKENDS[ctx.backend].backward(
            dy2d, x_lora, weight, lora_A, lora_B, xa, ctx.scale, mask is None, **fused
        )
        if mask is not None:  # the LoRA branch saw dropout(x): its share of dX goes through the mask
            dx = dx + (g @ lora_A.to(g.dtype)).mul_(ctx.scale).mul_(mask)
        d_weight = dy2d.t() @ x2d if ctx.needs_input_grad[1] else None
        d_bias = dy2d.sum(0) if ctx.needs_input_grad[2] else None
        return dx.reshape(x.shape), d_weight, d_bias, d_lora_A, d_lora_B, None, None, None, None


def _backward_with_graph(ctx, dy, x, weight, lora_A, lora_B, mask, seed):
    """The backward for ``create_graph=True``: y recomputed in plain torch from the saved inputs (which
    keep their autograd history) with the forward's dropout mask, and differentiated by autograd, so
    the gradients are themselves differentiable. Costs one unfused forward more; only then."""
    x2d = rows(x)
    if seed is not None:  # the fused kernels' mask, redrawn in torch from their seed
        keep = reference.dropout_keep(int(seed.item()), *x2d.shape, ctx.fused_dropout_p, device=x.device)
        mask = keep.to(x.dtype) / (1.0 - ctx.fused_dropout_p)
    y = reference.lora_linear_reference(x2d, weight, None, lora_A.to(x.dtype), lora_B.to(x.dtype), ctx.scale, mask)
    dx, d_weight, d_lora_A, d_lora_B = differentiate(
        y, rows(dy), (x, weight, lora_A, lora_B), [ctx.needs_input_grad[i] for i in (0, 1, 3, 4)]
    )
    d_bias = rows(dy).sum(0) if ctx.needs_input_grad[2] else None
    return dx, d_weight, d_bias, d_lora_A, d_lora_B, None, None, None, None


def differentiate(y, dy, inputs, needs):
    """The gradients of y (given dy) for the inputs whose ``needs`` is set, None for the others,
    themselves differentiable (create_graph)."""
    wrt = [t for t, n in zip(inputs, needs) if n]
    grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True) if wrt else ())
    return [next(grads) if n else None for n in needs]


_FUNCTORCH = Dispatch(
    "reference",
    False,
    "inside a torch.func transform (grad, vmap, jacrev, ...): the "
    "plain-torch definition, which the transforms see as ordinary ops",
    "functorch",
)


def in_functorch_transform() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running this call."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def prepare_args(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend):
    """The arguments as the op computes with them: cast as autocast would (lora_kernels.precision),
    checked (bad input raises, naming the argument), scale and dropout_p as floats."""
    if isinstance(x, torch.Tensor):
        amp = autocast_dtype(x.device.type)
        if amp is not None:  # what autocast does for nn.Linear
            x, weight, bias, lora_A, lora_B = autocast_args(amp, x, weight, bias, lora_A, lora_B)
    scale, dropout_p = check_lora_linear_args(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend)
    return x, weight, bias, lora_A, lora_B, scale, dropout_p


def _lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend, seed=None):
    """:func:`lora_linear`, also returning the :class:`Dispatch` it made (layers record it).
    ``seed``: see :func:`_forward`."""
    return run_prepared(*prepare_args(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend), backend, seed)


def run_prepared(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend, seed=None):
    """:func:`lora_linear` on arguments :func:`prepare_args` returned: (y, Dispatch)."""
    if in_functorch_transform():
        mask = None
        if dropout_p > 0.0:  # nn.Dropout's draw, so vmap's randomness= rules apply as to any dropout
            mask = torch.nn.functional.dropout(torch.ones_like(x), dropout_p)
        return reference.lora_linear_reference(
            x, weight, bias, lora_A.to(x.dtype), lora_B.to(x.dtype), scale, mask
        ), _FUNCTORCH
    # Inference (no gradient wanted) skips the autograd Function and its few microseconds.
    grad = torch.is_grad_enabled() and (
        x.requires_grad
        or weight.requires_grad
        or lora_A.requires_grad
        or lora_B.requires_grad
        or (bias is not None and bias.requires_grad)
    )
    # with dropout, auto stays on Triton at any size: its fused dropout stores no M×K mask
    dispatch = resolve(
        backend, x, by_size=dropout_p == 0.0, inference=not grad, out_features=weight.shape[0], rank=lora_A.shape[0]
    )
    if grad:
        y = LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scale, dropout_p, dispatch.backend, seed)
    else:
        y = _forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, dispatch.backend, seed)[0]
    return y, dispatch


def lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p=0.0, backend="auto"):
    """``x·weightᵀ + bias + scale·(dropout(x)·lora_Aᵀ)·lora_Bᵀ`` with a fused backward.

    Args:
        x: ``(..., in_features)``.
        weight: ``(out_features, in_features)``, the frozen base W₀ (no gradient unless it requires one).
        bias: ``(out_features,)`` or ``None``.
        lora_A: ``(r, in_features)``; lora_B: ``(out_features, r)`` (PEFT's layout). In x's dtype,
            or float32 on a float16/bfloat16 x (their gradients then come back in float32).
        scale: the LoRA scaling ``alpha / r`` (see :func:`lora_kernels.lora_scale`).
        dropout_p: dropout on the LoRA branch's input; applied whenever it is > 0.
        backend: ``"auto"`` (on a GPU: the fused Triton kernels up to 512 rows of x (fp32 or
            r > 16: 16 rows) or with dropout, else the cuBLAS-composed reference path; for
            fp16/bf16 inference at up to 4 rows the CUDA decode kernel; on CPU the reference
            path), ``"reference"``, ``"triton"`` or ``"cuda"``.

    Under ``torch.autocast`` it computes in the autocast dtype, as ``nn.Linear`` does (see
    :mod:`lora_kernels.precision`).
    """
    return _lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend)[0]
