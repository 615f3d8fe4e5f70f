"""patch_peft: an existing PEFT model's LoRA layers switched to the fused kernels, in place.

The class of each PEFT ``lora.Linear`` layer is swapped for a subclass whose forward is fused.
Parameters, adapter names, scaling, dropout modules, merge/unmerge and save_pretrained are PEFT's
own, untouched; anything the fused op does not cover falls through to PEFT's forward, recorded
for :func:`lora_kernels.explain`. (PEFT's adapter files for our own layers: peft_format.py.)"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from ._checks import check_backend
from .explain import record, set_layer_name
from .function import Dispatch, prepare_args, run_prepared
from .layers import TP_STYLE, _is_conv1d, _tensor_attr
from .multi import lora_linear_mixed_batch
from .precision import adapters_fit, autocast_args, autocast_dtype, dtype_mix_error

log = logging.getLogger("lora_kernels")


def _dtype_mix_error(x, weight, bias, lora_A, lora_B) -> str:
    """'' or why the tensors' dtypes, cast as autocast would (as the fused op sees them), are not a
    mix the op computes (then PEFT's own forward runs)."""
    amp = autocast_dtype(x.device.type)
    if amp is not None:
        x, weight, bias, lora_A, lora_B = autocast_args(amp, x, weight, bias, lora_A, lora_B)
    return dtype_mix_error(x, weight, bias, lora_A, lora_B)


# The per-call checks read modules, parameters and hooks from the modules' own dicts: through
# nn.Module.__getattr__ (23 look-ups a call) and PEFT's get_base_layer (a failing hasattr) they cost
# more than the rest of the eager call (bench/results/host-overhead-cpu.md).
def _child(module: nn.Module, name: str) -> nn.Module:
    """``module.<name>`` for a registered submodule (``module._modules``; KeyError if absent)."""
    return module._modules[name]


def _base_layer(layer: nn.Module) -> nn.Module:
    """PEFT's ``layer.get_base_layer()``: base_layer followed down while there is one."""
    base = _child(layer, "base_layer")
    while "base_layer" in base._modules or hasattr(type(base), "base_layer") or "base_layer" in base.__dict__:
        base = base.base_layer
    return base


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` (as PEFT does) runs code of someone else's: its forward or backward
    hooks, accelerate's ``_hf_hook``, or a forward replaced on the instance."""
    state = module.__dict__
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "_hf_hook" in state
        or "forward" in state
    )


def _any_global_hooks() -> bool:
    m = nn.modules.module
    return bool(
        m._global_forward_hooks
        or m._global_forward_pre_hooks
        or m._global_backward_hooks
        or m._global_backward_pre_hooks
    )


def _mixed_batch(self, x, adapter_names):
    """PEFT's mixed batch (one adapter name per sample, "__base__" for none) as one fused
    multi-adapter call: (y, Dispatch), y None where it cannot be fused (PEFT's loop then runs)."""
    lora_A, lora_B = _child(self, "lora_A")._modules, _child(self, "lora_B")._modules
    names = [n for n in dict.fromkeys(adapter_names) if n in lora_A]
    if not names or x.dim() < 2 or len(adapter_names) != x.shape[0]:
        return None, _peft("a mixed batch with no adapter of this layer, or not one name per sample", "peft-args")
    if any(n in getattr(self, "lora_variant", {}) for n in names):
        return None, _peft("LoRA variants in a mixed batch are not fused", "peft-variant")
    dropouts = _child(self, "lora_dropout")._modules
    if self.training and any(isinstance(dropouts[n], nn.Dropout) and dropouts[n].p > 0 for n in names):
        return None, _peft("mixed batches with dropout in training are not fused", "peft-dropout")
    base, sharded = _base_layer(self), TP_STYLE in self.__dict__
    reason = _module_reason(base, *(lora_A[n] for n in names), *(lora_B[n] for n in names), sharded=sharded)
    if reason is not None:
        return None, reason
    weight, bias = _tensor_attr(base, "weight"), _tensor_attr(base, "bias")
    weight = weight.t() if self.fan_in_fan_out else weight
    factors = [(_tensor_attr(lora_A[n], "weight"), _tensor_attr(lora_B[n], "weight")) for n in names]
    mesh = None
    if sharded:  # this rank's shards (lora_kernels.parallel), one fused call on them
        from .parallel import local_args, output

        mesh = weight.device_mesh
        (x, weight, bias), factors, _ = local_args(self, x, weight, bias, factors, 0.0)
    adapters = {n: (A, B, self.scaling[n]) for n, (A, B) in zip(names, factors)}
    for A, B, _ in adapters.values():  # a dtype mix the op does not take (judged per adapter, as PEFT computes them)
        mix = _dtype_mix_error(x, weight, bias, A, B)
        if mix:
            return None, _peft(mix, "peft-dtype")
    y, dispatch = lora_linear_mixed_batch(x, weight, bias, adapters, adapter_names, self.lora_kernels_backend)
    return (y if mesh is None else output(self, y, mesh)), dispatch


def _peft(why, key):
    return Dispatch("peft", False, f"PEFT's own forward: {why}", key)


_PEFT_DISABLED = _peft("adapters disabled (the base layer alone)", "peft-disabled")
_PEFT_MERGED = _peft("adapter merged into the base weight", "peft-merged")
_PEFT_ARGS = _peft("extra forward arguments", "peft-args")
_PEFT_HOOKS = _peft(
    "a module PEFT would call has hooks or a replaced forward (accelerate's offloading, or the "
    "user's), which PEFT's calls of base_layer, lora_A and lora_B run",
    "peft-hooks",
)
_FUSED_DROPOUT_TYPES = (nn.Dropout, nn.Identity)


def _module_reason(*modules, sharded=False) -> Dispatch:
    """Why these modules (the base layer, lora_A, lora_B) must be called as modules; None if their
    weights can be read directly. PEFT calls each of them, so their hooks run there (accelerate's
    offloading loads the weights in such a hook). ``sharded``: the layer was parallelized by
    lora_kernels.parallel, so its weights are DTensors (the fused call runs on their shards)."""
    if _any_global_hooks():
        return _PEFT_HOOKS
    for module in modules:
        if _hooked(module):
            return _PEFT_HOOKS
        weight = _tensor_attr(module, "weight")
        if sharded:
            if not _is_dtensor(weight):
                raise RuntimeError(
                    "a LoRA layer sharded by lora_kernels.parallel holds a weight that is not a DTensor "
                    f"(shape {tuple(weight.shape)}): an adapter added or loaded after parallelize_module? "
                    "Add adapters before parallelizing the model"
                )
            continue
        if type(weight) is not nn.Parameter and type(weight) is not torch.Tensor:
            return _peft(
                f"the weight is a {type(weight).__name__} (quantized or sharded), not a plain tensor",
                "peft-weight-type",
            )
        if weight.device.type == "meta":
            return _peft("a weight is on the meta device (offloaded)", "peft-meta")
    return None


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


class _FusedCall(NamedTuple):
    """What one fused call of a PEFT layer reads, as :func:`_call_reason` found it."""

    weight: torch.Tensor  # the base weight as (out, in)
    bias: Optional[torch.Tensor]
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout_p: float  # 0 unless the adapter's nn.Dropout is in training mode


def _call_reason(self, args, kwargs) -> Tuple[Optional[Dispatch], Optional[_FusedCall]]:
    """(why this call goes to PEFT's own forward, None), or (None, what the fused call reads).
    Checked on every call, so adapters added, activated or loaded after patch_peft are judged as
    they are now."""
    if self.disable_adapters:
        return _PEFT_DISABLED, None
    if self.merged:
        return _PEFT_MERGED, None
    if args or kwargs:
        return _PEFT_ARGS, None
    active = self.active_adapters
    if len(active) != 1:
        return _peft(f"{len(active)} active adapters at once are not fused", "peft-active"), None
    adapter = active[0]
    lora_A = _child(self, "lora_A")._modules.get(adapter)
    if lora_A is None:
        return _peft(f"active adapter {adapter!r} is not on this layer", "peft-absent"), None
    if adapter in getattr(self, "lora_variant", {}):
        return _peft(f"LoRA variant {type(self.lora_variant[adapter]).__name__} is not fused", "peft-variant"), None
    if getattr(self, "lora_bias", {}).get(adapter):
        return _peft("lora_bias is not fused", "peft-lora-bias"), None
    dropout = _child(self, "lora_dropout")._modules[adapter]
    if type(dropout) not in _FUSED_DROPOUT_TYPES:
        return _peft(f"lora_dropout {type(dropout).__name__} is not fused", "peft-dropout"), None
    base, lora_B = _base_layer(self), _child(self, "lora_B")._modules[adapter]
    reason = _module_reason(base, lora_A, lora_B, sharded=TP_STYLE in self.__dict__)
    if reason is not None:
        return reason, None
    weight = _tensor_attr(base, "weight")
    return None, _FusedCall(
        weight.t() if self.fan_in_fan_out else weight,
        _tensor_attr(base, "bias"),
        _tensor_attr(lora_A, "weight"),
        _tensor_attr(lora_B, "weight"),
        self.scaling[adapter],
        dropout.p if type(dropout) is nn.Dropout and dropout.training else 0.0,
    )


def _fused_peft_forward(self, x, *args, **kwargs):
    if not args and kwargs.keys() == {"adapter_names"} and not self.disable_adapters and not self.merged:
        out, dispatch = _mixed_batch(self, x, kwargs["adapter_names"])
        record(self, dispatch)
        return super(type(self), self).forward(x, *args, **kwargs) if out is None else out
    dispatch, call = _call_reason(self, args, kwargs)
    if dispatch is not None:
        record(self, dispatch)
        return super(type(self), self).forward(x, *args, **kwargs)
    backend, seed, mesh = self.lora_kernels_backend, None, None
    op_args = (x, *call)
    if TP_STYLE in self.__dict__:  # DTensors: one fused call on this rank's shards (lora_kernels.parallel)
        from .parallel import local_args, output

        mesh = call.weight.device_mesh
        base, [adapter], seed = local_args(
            self, x, call.weight, call.bias, [(call.lora_A, call.lora_B)], call.dropout_p
        )
        op_args = (*base, *adapter, call.scaling, call.dropout_p)
    try:  # a valid PEFT layer our op would refuse (a dtype mix, dropout p = 1, ...) runs PEFT's own code
        prepared = prepare_args(*op_args, backend)
    except (TypeError, ValueError) as exc:
        record(self, _peft(str(exc), "peft-dtype" if "dtype" in str(exc) else "peft-args-refused"))
        return super(type(self), self).forward(x, *args, **kwargs)
    y, dispatch = run_prepared(*prepared, backend, seed)
    record(self, dispatch)
    return y if mesh is None else output(self, y, mesh)


_FUSED_CLASSES: Dict[type, type] = {}  # PEFT's class -> its fused subclass
_FUSED_ORIGINAL: Dict[type, type] = {}  # and back


def _fused_class(cls):
    """The subclass of PEFT's layer class ``cls`` whose forward is fused. It keeps ``cls``'s name, so
    repr() and PEFT's layer status read as PEFT's (explain() shows the fused state), and pickles as
    ``cls`` re-patched on load (torch.save(model), copy.deepcopy)."""
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(
            cls.__name__,
            (cls,),
            {
                "forward": _fused_peft_forward,
                "__reduce_ex__": _reduce_patched,
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
            },
        )
        _FUSED_ORIGINAL[_FUSED_CLASSES[cls]] = cls
    return _FUSED_CLASSES[cls]


def _reduce_patched(self, protocol):
    reduced = list(object.__reduce_ex__(self, max(protocol, 2)))
    reduced[0], reduced[1] = _new_patched, (_FUSED_ORIGINAL[type(self)],)
    return tuple(reduced)


def _new_patched(cls):
    """Unpickling a patched layer: an instance of the fused subclass of PEFT's ``cls``."""
    return object.__new__(_fused_class(cls))


def _unsupported(layer) -> str:
    """Why a PEFT LoRA layer is not switched to the fused path ('' if it is). What can change between
    calls (active adapters, variants, hooks, dtypes) is checked again on every call."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    if not isinstance(layer, PeftLinear):
        return f"{type(layer).__name__} layers (quantized or non-linear bases) are not fused"
    cls = _FUSED_ORIGINAL.get(type(layer), type(layer))
    if cls.forward is not PeftLinear.forward:
        return f"{cls.__name__} overrides lora.Linear.forward: its own forward runs"
    if any(getattr(layer, "use_dora", {}).values()):
        return "DoRA is not fused"
    if any(getattr(layer, "lora_bias", {}).values()):
        return "lora_bias is not fused"
    if getattr(layer, "lora_variant", {}):
        variants = ", ".join(type(v).__name__ for v in layer.lora_variant.values())
        return f"LoRA variants ({variants}) are not fused"
    if len(layer.active_adapters) != 1:
        return f"{len(layer.active_adapters)} active adapters at once are not fused"
    base = layer.get_base_layer()
    if not (type(base) is nn.Linear or _is_conv1d(base)):
        return f"base layer {type(base).__name__} is not fused"
    weight = base.weight
    sharded_by_us = TP_STYLE in layer.__dict__ and _is_dtensor(weight)  # lora_kernels.parallel's shards
    if type(weight) is not nn.Parameter and type(weight) is not torch.Tensor and not sharded_by_us:
        return f"the base weight is a {type(weight).__name__} (quantized or sharded), not a plain tensor"
    return ""


def _dtype_reason(layer) -> str:
    """Why the active adapter's dtype keeps this (patched) layer's calls on PEFT's path outside
    autocast ('' if its calls fuse: the base's dtype, or fp32 adapters on a 16-bit base)."""
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A:
        return ""
    base, lora = layer.get_base_layer().weight.dtype, layer.lora_A[adapter].weight.dtype
    if adapters_fit(base, lora):
        return ""
    return f"{lora} adapters on a {base} base are fused only under torch.autocast"


_UNFUSED = "_lora_kernels_unfused"


def peft_layer_status(module):
    """None if ``module`` is not a PEFT LoRA layer; '' if patch_peft switched it; else why it runs
    PEFT's own forward."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    if not isinstance(module, LoraLayer):
        return None
    if type(module) in _FUSED_ORIGINAL:
        return ""
    return module.__dict__.get(_UNFUSED, "not patched (lora_kernels.patch_peft switches it)")


def patch_peft(model: nn.Module, backend: str = "auto") -> int:
    """Switch the LoRA layers of a PEFT model to the fused kernels, in place. Returns how many
    layers will now run fused with their current dtypes.

    Layers that cannot be fused (DoRA, several active adapters, quantized bases, ...) stay on
    PEFT's path; layers whose adapter dtype fits the base only under autocast (bf16 adapters on
    an fp32 base) are switched but not counted. Each such layer gets one log line, and a summary
    says how many were left and why; :func:`lora_kernels.explain` shows every layer's last call.
    PEFT's mixed batches (``adapter_names=``) run as one fused multi-adapter call. Calls the fused
    ops cannot serve (disabled or merged adapters, dtype mixes outside those above, LoRA variants in
    a mixed batch) go to PEFT's own forward, logged once per layer.
    """
    from peft.tuners.lora import LoraLayer

    check_backend(backend)
    fused, left = 0, Counter()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        set_layer_name(module, name)
        reason = _unsupported(module)  # for layers patched before too: their adapters may have changed
        if reason:
            if type(module) in _FUSED_ORIGINAL:
                module.__class__ = _FUSED_ORIGINAL[type(module)]
            log.warning("lora_kernels.patch_peft: %s stays on PEFT's path: %s", name, reason)
            module.__dict__[_UNFUSED] = reason
            left[reason] += 1
            continue
        if type(module) not in _FUSED_ORIGINAL:
            module.__class__ = _fused_class(type(module))
        module.lora_kernels_backend = backend
        reason = _dtype_reason(module)
        if reason:
            log.warning("lora_kernels.patch_peft: %s runs PEFT's forward outside autocast: %s", name, reason)
            left[reason] += 1
        else:
            fused += 1
    total = fused + sum(left.values())
    summary = "; ".join(f"{why} ({n})" for why, n in left.items())
    log.log(
        logging.WARNING if left else logging.INFO,
        "lora_kernels.patch_peft: %d of %d LoRA layers fused%s",
        fused,
        total,
        f"; on PEFT's path: {summary}" if left else "",
    )
    return fused


def unpatch_peft(model: nn.Module) -> int:
    """Undo :func:`patch_peft`. Returns how many layers were switched back."""
    count = 0
    for module in model.modules():
        if type(module) in _FUSED_ORIGINAL:
            module.__class__ = _FUSED_ORIGINAL[type(module)]
            count += 1
    return count
