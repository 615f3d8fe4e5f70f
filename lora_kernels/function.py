"""The autograd Function and the functional entry point :func:`lora_linear`.

Backends all implement the 2-D contract of :mod:`lora_kernels.reference` (``forward`` and
``backward``); this file only flattens leading dimensions, asks :mod:`lora_kernels.dispatch` for a
backend, handles dropout (a seed for backends that fuse it, a materialised mask for the others)
and routes gradients. W₀ is frozen:
its gradient is computed only if a caller explicitly asks for it with ``weight.requires_grad=True``
(plain ``dYᵀ·x``, never inside the fused kernels).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import dispatch, reference
from ._checks import check_lora_linear_args
from .dispatch import FUNCTORCH, Dispatch, resolve
from .precision import autocast_args, autocast_dtype

__all__ = ["Dispatch", "LoRALinearFunction", "lora_linear", "prepare_args", "resolve", "rows", "run_prepared"]


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as 2-D (rows, features); an explicit row count, since reshape(-1, 0) is ambiguous.
    A 2-D ``t`` is returned as it is (no reshape call: eager calls pay for each op)."""
    if t.dim() == 2:
        return t
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


class ForwardState(NamedTuple):
    """What the forward keeps for backward, besides its inputs."""

    xa: torch.Tensor  # s·dropout(x)·Aᵀ (M, r)
    mask: Optional[torch.Tensor]  # the materialised dropout mask (0 or 1/(1−p)), non-fusing backends
    seed: Optional[torch.Tensor]  # the fused kernels' dropout seed (int64, one element)
    fused_dropout_p: float  # p where the kernels drop in-kernel from ``seed``, else 0


def draw_dropout_seed(device) -> torch.Tensor:
    """A fresh seed for the fused kernels' dropout mask from torch's generator on ``device`` (int64,
    one element, left on the device: no sync, graph-safe)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def _forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend, seed=None):
    """The forward pass shared by the autograd Function and the inference path, on a resolved
    ``backend``. ``seed``: the dropout mask's seed where the caller fixes it (tensor parallelism:
    the same mask on every rank), else drawn from torch's generator. Returns y and a
    :class:`ForwardState`."""
    ops = dispatch.backend(backend)
    x2d = rows(x)
    mask = None
    fused_dropout = dropout_p > 0.0 and getattr(ops, "FUSED_DROPOUT", False)
    if fused_dropout:  # the kernels draw the mask from this seed (on the device: no sync, graph-safe)
        if seed is None:
            seed = draw_dropout_seed(x.device)
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
    return y, ForwardState(xa, mask, seed, dropout_p if fused_dropout else 0.0)


class LoRALinearFunction(torch.autograd.Function):
    """``backend`` is a resolved name ("reference", "triton" or "cuda"; see :func:`resolve`).

    Saved for backward: x, W₀, A, B (the inputs, by reference), xa (M×r) and, with dropout, the
    fused kernels' seed or the reference backend's mask. With ``create_graph=True`` the backward is
    the reference math differentiated by autograd (see :func:`_backward_with_graph`), so second
    derivatives (gradient penalties, ``gradgradcheck``) are exact on every backend."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout_p, backend, seed=None):
        if not dispatch.is_resolved(backend):  # "auto", or a backend that is not installed (raises, saying why)
            backend = resolve(
                backend, x, by_size=dropout_p == 0.0, out_features=weight.shape[0], rank=lora_A.shape[0]
            ).backend
        y, state = _forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, backend, seed)
        ctx.save_for_backward(x, weight, lora_A, lora_B, state.xa, state.mask, state.seed)
        ctx.backend, ctx.scale, ctx.dropout_p, ctx.fused_dropout_p = backend, scale, dropout_p, state.fused_dropout_p
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa, mask, seed = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return _backward_with_graph(ctx, dy, x, weight, lora_A, lora_B, mask, seed)
        x2d, dy2d = rows(x), rows(dy)
        fused = {} if seed is None else {"dropout_p": ctx.fused_dropout_p, "seed": seed}
        x_lora = x2d if mask is None else x2d * mask  # the reference backend's dropout(x), rebuilt here
        dx, d_lora_A, d_lora_B, g = dispatch.backend(ctx.backend).backward(
            dy2d, x_lora, weight, lora_A, lora_B, xa, ctx.scale, fuse_lora_dx=mask is None, **fused
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
        ), FUNCTORCH
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
