"""Tensor parallelism for LoRA layers: plan styles named like torch's, for ``parallelize_module``.

    from lora_kernels.parallel import ColwiseParallel, RowwiseParallel   # in place of torch's
    parallelize_module(model, tp_mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})

How the factors are sharded, so that each rank's local problem is again one LoRA layer that the
fused kernels compute in one call:

* **Colwise** (y sharded by output columns): W₀, bias and ``lora_B`` by output rows (Shard(0)),
  ``lora_A`` replicated. Rank k computes y_k = x·W₀ₖᵀ + b_k + s·(x·Aᵀ)·B_kᵀ. Backward: dX = Σ_k
  (dY_k·W₀ₖ + s·g_k·A) and dA = Σ_k s·g_kᵀ·x with g_k = dY_k·B_k: one all-reduce of dX (as torch's
  style issues) and one of dA (r×in, the replicated factor), dB_k local.
* **Rowwise** (x sharded by input columns): W₀ and ``lora_A`` by input columns (Shard(1)),
  ``lora_B`` and bias replicated. Rank k computes the partial sum x_k·W₀ₖᵀ + s·(x_k·A_kᵀ)·Bᵀ (the
  LoRA term is linear in x·Aᵀ = Σ_k x_k·A_kᵀ, so partial sums add up exactly); the style's output
  redistribution adds them (all-reduce, or reduce-scatter for a sharded output) as torch's does, and
  the bias is added by the first rank's kernel only. Backward: dX_k, dA_k local (dY is replicated),
  dB = Σ_k dYᵀ·xa_k: one all-reduce of dB (out×r, the replicated factor).

The styles take our ``LoRALinear`` and PEFT's LoRA layers once ``patch_peft`` has switched them
(every adapter of a PEFT layer is sharded alike; a mixed batch is one fused multi-adapter call per
rank on its shards).

With dropout, the colwise input is replicated and every rank must drop the same elements: the
kernels' seed is broadcast from the first rank of the mesh (8 bytes; only when dropout is on). The
rowwise input is sharded: rank k draws its columns' mask from its own seed plus k, so that ranks
whose generators were seeded alike (the usual set-up) do not drop the same pattern in every shard.
Parameters are DTensors (as torch's styles make them), so optimizers, ``fully_shard`` on a 2-D mesh
(TP inside, FSDP2 outside) and ``torch.distributed.checkpoint`` see the usual objects;
``lora_state_dict`` and ``save_peft_adapter`` write the full, unsharded adapter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel as _TorchColwise
from torch.distributed.tensor.parallel import RowwiseParallel as _TorchRowwise

from .function import draw_dropout_seed
from .layers import TP_STYLE as _TP  # the layer's style, "colwise" or "rowwise"; set when it is parallelized
from .layers import LoRAMixin


def _distribute(module: nn.Module, name: str, mesh, placement, src_data_rank):
    param = getattr(module, name)
    if param is None or isinstance(param, DTensor):
        return
    kwargs = {} if src_data_rank is None else {"src_data_rank": src_data_rank}
    module.register_parameter(
        name, nn.Parameter(distribute_tensor(param, mesh, [placement], **kwargs), requires_grad=param.requires_grad)
    )


def _peft_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    return LoraLayer


def _check_layer(module):
    """Refuse, with the reason, a layer the styles cannot shard (before anything is distributed)."""
    peft_layer = _peft_layer_class()
    if peft_layer is not None and isinstance(module, peft_layer):
        from .peft_patch import peft_layer_status

        status = peft_layer_status(module)
        if status:
            raise NotImplementedError(
                f"this PEFT LoRA layer runs PEFT's own forward ({status}); lora_kernels.parallel shards the "
                "layers lora_kernels.patch_peft switches: call patch_peft(model) before parallelize_module"
            )
        if module.fan_in_fan_out:
            raise NotImplementedError("tensor parallelism of Conv1D-style (in, out) weights is not supported")
        return
    if not isinstance(module, LoRAMixin):
        raise NotImplementedError(
            f"lora_kernels.parallel styles take LoRALinear layers and PEFT LoRA layers switched by "
            f"patch_peft, got {type(module).__name__} (use torch's styles for plain layers)"
        )
    if module.extra_adapters:
        raise NotImplementedError("tensor parallelism of layers with several adapters (mixed batches) is not supported")
    if module.fan_in_fan_out:
        raise NotImplementedError("tensor parallelism of Conv1D-style (in, out) weights is not supported")


def _factors(module):
    """(the module holding W₀ and bias, [(module holding lora_A, module holding lora_B), ...]) of a
    LoRA layer: ours (one adapter) or PEFT's (every adapter it holds, active or not)."""
    if isinstance(module, LoRAMixin):
        return module, [(module.lora_A, module.lora_B)]
    return module.get_base_layer(), [(module.lora_A[n], module.lora_B[n]) for n in module.lora_A]


def _partition(module, mesh, src, weight, bias, lora_A, lora_B, style):
    """Place a LoRA layer's parameters: W₀ as ``weight``, the bias as ``bias``, every adapter's A and
    B as ``lora_A`` / ``lora_B``; mark the layer with its style."""
    base, adapters = _factors(module)
    _distribute(base, "weight", mesh, weight, src)
    _distribute(base, "bias", mesh, bias, src)
    for a, b in adapters:
        _distribute(a, "weight", mesh, lora_A, src)
        _distribute(b, "weight", mesh, lora_B, src)
    module.__dict__[_TP] = style


class ColwiseParallel(_TorchColwise):
    """torch's ``ColwiseParallel`` for LoRA layers (same arguments): W₀, bias, ``lora_B`` sharded by
    output rows, ``lora_A`` replicated (see the module docstring)."""

    def _partition_lora(self, name, module, mesh):
        if name:
            return  # the layer's submodules: their parameters are placed with the layer's ("")
        src = getattr(self, "src_data_rank", None)
        _partition(module, mesh, src, Shard(0), Shard(0), Replicate(), Shard(0), "colwise")

    def _apply(self, module, device_mesh):
        _check_layer(module)
        return _distribute_layer(self, module, device_mesh)


def _distribute_layer(style, module, device_mesh):
    """distribute_module with the style's LoRA partition and torch's input and output preparation
    for that style (its layouts read at call time, as torch's own styles do)."""
    return distribute_module(
        module,
        device_mesh,
        style._partition_lora,
        lambda mod, inputs, mesh: style._prepare_input_fn(
            style.input_layouts, style.desired_input_layouts, mod, inputs, mesh
        ),
        lambda mod, outputs, mesh: style._prepare_output_fn(
            style.output_layouts, style.use_local_output, mod, outputs, mesh
        ),
    )


class RowwiseParallel(_TorchRowwise):
    """torch's ``RowwiseParallel`` for LoRA layers (same arguments): W₀ and ``lora_A`` sharded by
    input columns, ``lora_B`` and bias replicated (see the module docstring)."""

    def _partition_lora(self, name, module, mesh):
        if name:
            return
        src = getattr(self, "src_data_rank", None)
        _partition(module, mesh, src, Shard(1), Replicate(), Shard(1), Replicate(), "rowwise")

    def _apply(self, module, device_mesh):
        _check_layer(module)
        self.desired_input_layouts = (Shard(-1),)
        return _distribute_layer(self, module, device_mesh)


# ---- the local computation --------------------------------------------------------------------


class _SumGradient(torch.autograd.Function):
    """Identity forward; the gradient summed over the mesh's group (all-reduce) in backward."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ZeroWithGradient(torch.autograd.Function):
    """Zeros in forward, the gradient passed through in backward: the rowwise bias on ranks other
    than the first, so it is added once but every rank gets its (replicated) gradient."""

    @staticmethod
    def forward(ctx, t):
        return torch.zeros_like(t)

    @staticmethod
    def backward(ctx, grad):
        return grad


def local_args(layer, x, weight, bias, factors, dropout_p):
    """What one rank's fused call computes with: ((x, W₀, bias), [(lora_A, lora_B) per adapter in
    ``factors``], seed) as local shards, tied into autograd so that the gradients of replicated
    tensors are reduced as the module docstring says; the seed of the dropout mask (None without)."""
    mesh = weight.device_mesh
    group = mesh.get_group()
    colwise = layer.__dict__[_TP] == "colwise"
    seed = None
    if dropout_p > 0.0:
        seed = draw_dropout_seed(x.to_local().device)
        if colwise:  # the replicated x: the same mask on every rank
            dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
        else:  # each rank drops its own columns of x: a mask of its own, even where the ranks' generators agree
            seed.add_(mesh.get_local_rank())
    if colwise:
        # dX is a partial sum per rank: torch's input redistribution adds them up (all-reduce, or
        # reduce-scatter for a sharded input), as for a plain Linear
        x_local = x.to_local(grad_placements=[Partial()])
        bias_local = None if bias is None else bias.to_local()
        # dA: the replicated factor's gradient summed over the ranks
        adapters = [(_SumGradient.apply(a.to_local(), group), b.to_local()) for a, b in factors]
    else:
        x_local = x.to_local()
        bias_local = None
        if bias is not None:
            bias_local = bias.to_local() if mesh.get_local_rank() == 0 else _ZeroWithGradient.apply(bias.to_local())
        adapters = [(a.to_local(), _SumGradient.apply(b.to_local(), group)) for a, b in factors]  # dB summed
    return (x_local, weight.to_local(), bias_local), adapters, seed


def output(layer, y_local, mesh):
    """One rank's result as the DTensor the style's output function redistributes: y's columns
    (colwise) or a partial sum (rowwise)."""
    placement = Shard(-1) if layer.__dict__[_TP] == "colwise" else Partial()
    return DTensor.from_local(y_local, mesh, [placement], run_check=False)


def tp_forward(layer, x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend):
    """One tensor-parallel LoRA layer: DTensor x and parameters in, DTensor out (the style's
    output function then redistributes it); one fused call on the local shards."""
    from .function import _lora_linear

    base, [adapter], seed = local_args(layer, x, weight, bias, [(lora_A, lora_B)], dropout_p)
    y_local, dispatch = _lora_linear(*base, *adapter, scaling, dropout_p, backend, seed=seed)
    return output(layer, y_local, weight.device_mesh), dispatch
