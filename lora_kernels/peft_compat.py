"""Fit the PEFT ecosystem: accelerate an existing PEFT model in place, and read/write PEFT's
adapter format (``adapter_config.json`` + ``adapter_model.safetensors``) for our own layers."""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from typing import Dict, List

import torch
import torch.nn as nn

from .explain import record, set_layer_name
from .function import Dispatch, _lora_linear
from .layers import LoRAMixin, replace_module, wrap_with_lora
from .multi import _lora_linear_multi, sample_adapter_ids, stack_adapters
from .precision import adapters_fit, autocast_args, autocast_dtype, dtype_mix_error
from .reference import lora_scale

log = logging.getLogger("lora_kernels")

PEFT_PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


# ---------------------------------------------------------------------------------------------
# patch_peft: swap the class of PEFT's lora.Linear layers for a subclass whose forward is fused.
# Parameters, adapter names, scaling, dropout modules, merge/unmerge and save_pretrained are
# PEFT's own, untouched; anything the fused op does not cover falls through to PEFT's forward.
# ---------------------------------------------------------------------------------------------

def _activation_args(x, weight, bias, lora_A, lora_B):
    """The tensors as the fused op will see them (cast as autocast would), and '' or why their
    dtypes are not a mix the op computes (then PEFT's own forward runs)."""
    amp = autocast_dtype(x.device.type)
    if amp is not None:
        x, weight, bias, lora_A, lora_B = autocast_args(amp, x, weight, bias, lora_A, lora_B)
    return (x, weight, bias, lora_A, lora_B), dtype_mix_error(x, weight, bias, lora_A, lora_B)


def _mixed_batch(self, x, adapter_names):
    """PEFT's mixed batch (one adapter name per sample, "__base__" for none) as one fused
    lora_linear_multi call: (y, Dispatch), y None where it cannot be fused (PEFT's loop then runs)."""
    names = [n for n in dict.fromkeys(adapter_names) if n in self.lora_A]
    if not names or x.dim() < 2 or len(adapter_names) != x.shape[0]:
        return None, _peft("a mixed batch with no adapter of this layer, or not one name per sample", "peft-args")
    if any(n in getattr(self, "lora_variant", {}) for n in names):
        return None, _peft("LoRA variants in a mixed batch are not fused", "peft-variant")
    if self.training and any(isinstance(self.lora_dropout[n], nn.Dropout) and self.lora_dropout[n].p > 0 for n in names):
        return None, _peft("mixed batches with dropout in training are not fused", "peft-dropout")
    base = self.get_base_layer()
    weight = base.weight.t() if self.fan_in_fan_out else base.weight
    lora_A, lora_B = stack_adapters([self.lora_A[n].weight for n in names], [self.lora_B[n].weight for n in names])
    (x, weight, bias, lora_A, lora_B), mix = _activation_args(x, weight, base.bias, lora_A, lora_B)
    if mix:
        return None, _peft(mix, "peft-dtype")
    ids = sample_adapter_ids(adapter_names, {n: i for i, n in enumerate(names)}, x)
    return _lora_linear_multi(x, weight, bias, lora_A, lora_B, [self.scaling[n] for n in names], ids,
                              self.lora_kernels_backend)


def _peft(why, key):
    return Dispatch("peft", False, f"PEFT's own forward: {why}", key)


_PEFT_DISABLED = _peft("adapters disabled (the base layer alone)", "peft-disabled")
_PEFT_MERGED = _peft("adapter merged into the base weight", "peft-merged")
_PEFT_ARGS = _peft("extra forward arguments", "peft-args")


def _fused_peft_forward(self, x, *args, **kwargs):
    peft_forward = super(type(self), self).forward
    if not args and set(kwargs) == {"adapter_names"} and not self.disable_adapters and not self.merged:
        out, dispatch = _mixed_batch(self, x, kwargs["adapter_names"])
        record(self, dispatch)
        return peft_forward(x, *args, **kwargs) if out is None else out
    dispatch = (_PEFT_DISABLED if self.disable_adapters else _PEFT_MERGED if self.merged
                else _PEFT_ARGS if args or kwargs else None)
    if dispatch is None and len(self.active_adapters) != 1:
        dispatch = _peft(f"{len(self.active_adapters)} active adapters at once are not fused", "peft-active")
    if dispatch is None:
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A:
            dispatch = _peft(f"active adapter {adapter!r} is not on this layer", "peft-absent")
        elif adapter in getattr(self, "lora_variant", {}):
            dispatch = _peft(f"LoRA variant {type(self.lora_variant[adapter]).__name__} is not fused", "peft-variant")
    if dispatch is not None:
        record(self, dispatch)
        return peft_forward(x, *args, **kwargs)
    base = self.get_base_layer()
    weight = base.weight.t() if self.fan_in_fan_out else base.weight
    (xc, weight, bias, lora_A, lora_B), mix = _activation_args(x, weight, base.bias, self.lora_A[adapter].weight,
                                                               self.lora_B[adapter].weight)
    if mix:  # PEFT casts between dtypes where we would raise: its own forward gives its own result
        record(self, _peft(mix, "peft-dtype"))
        return peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    y, dispatch = _lora_linear(xc, weight, bias, lora_A, lora_B, self.scaling[adapter], p, self.lora_kernels_backend)
    record(self, dispatch)
    return y


_FUSED_CLASSES: Dict[type, type] = {}


def _fused_class(cls):
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_peft_forward,
                                                                   "__module__": __name__})
    return _FUSED_CLASSES[cls]


def _unsupported(layer) -> str:
    """Why a PEFT LoRA layer cannot take the fused path ('' if it can)."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    from .layers import _is_conv1d

    if not isinstance(layer, PeftLinear):
        return f"{type(layer).__name__} layers (quantized or non-linear bases) are not fused"
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
    if type(module) in _FUSED_CLASSES.values():
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

    fused, left = 0, Counter()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        set_layer_name(module, name)
        if type(module) not in _FUSED_CLASSES.values():
            reason = _unsupported(module)
            if reason:
                log.warning("lora_kernels.patch_peft: %s stays on PEFT's path: %s", name, reason)
                module.__dict__[_UNFUSED] = reason
                left[reason] += 1
                continue
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
    log.log(logging.WARNING if left else logging.INFO, "lora_kernels.patch_peft: %d of %d LoRA layers fused%s",
            fused, total, f"; on PEFT's path: {summary}" if left else "")
    return fused


def unpatch_peft(model: nn.Module) -> int:
    """Undo :func:`patch_peft`. Returns how many layers were switched back."""
    originals = {fused: cls for cls, fused in _FUSED_CLASSES.items()}
    count = 0
    for module in model.modules():
        if type(module) in originals:
            module.__class__ = originals[type(module)]
            count += 1
    return count


# ---------------------------------------------------------------------------------------------
# PEFT's adapter format for models built with LoRALinear / inject_lora.
# ---------------------------------------------------------------------------------------------

def save_peft_adapter(model: nn.Module, path: str, base_model_name_or_path: str = None,
                      adapter_name: str = "default") -> List[str]:
    """Write adapter ``adapter_name`` of the model's LoRA layers as a PEFT adapter that
    ``PeftModel.from_pretrained`` (or ``load_adapter``) loads. Returns the module names saved."""
    from safetensors.torch import save_file

    layers = {name: m.adapter(adapter_name) for name, m in model.named_modules()
              if isinstance(m, LoRAMixin) and (adapter_name == "default" or adapter_name in m.extra_adapters)}
    if not layers:
        raise ValueError(f"model has no LoRA layers with adapter {adapter_name!r} to save (use inject_lora first)")
    dropouts = {m.lora_dropout for m in model.modules() if isinstance(m, LoRAMixin)}
    first = next(iter(layers.values()))
    if len({a.use_rslora for a in layers.values()}) > 1 or len(dropouts) > 1:
        raise ValueError("PEFT's format has one use_rslora and one dropout per adapter; the layers differ")
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropouts.pop(),
        "use_rslora": first.use_rslora, "target_modules": sorted(layers), "bias": "none",
        "fan_in_fan_out": all(model.get_submodule(n).fan_in_fan_out for n in layers), "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_dora": False,
        "rank_pattern": {n: a.r for n, a in layers.items() if a.r != first.r},
        "alpha_pattern": {n: a.alpha for n, a in layers.items() if a.alpha != first.alpha},
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {}
    for name, a in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.lora_A.weight.detach().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = a.lora_B.weight.detach().contiguous()
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    return sorted(layers)


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches a module name ending in it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def load_peft_adapter(model: nn.Module, path: str, backend: str = "auto", adapter_name: str = "default") -> List[str]:
    """Load a PEFT LoRA adapter (saved by PEFT or by :func:`save_peft_adapter`) into a plain model or
    one with LoRA layers already: adapted ``nn.Linear`` / ``Conv1D`` modules become LoRA layers, and
    the weights go into adapter ``adapter_name`` ("default", or a named adapter for mixed batches,
    added where missing). Returns the module names loaded."""
    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path} holds a {config['peft_type']} adapter, not LoRA")
    for key in ("use_dora", "lora_bias"):
        if config.get(key):
            raise NotImplementedError(f"{path}: {key}=True adapters are not supported by lora_kernels")
    weights_file = os.path.join(path, WEIGHTS_NAME)
    if os.path.exists(weights_file):
        from safetensors.torch import load_file

        state = load_file(weights_file)
    else:
        state = torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu", weights_only=True)
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    names = sorted({k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")})
    if not names:
        raise ValueError(f"{weights_file} holds no lora_A weights")
    use_rslora = config.get("use_rslora", False)
    for name in names:
        module = model.get_submodule(name)
        lora_A, lora_B = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        r = lora_A.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", r))
        if not isinstance(module, LoRAMixin):  # the default adapter gets this rank (zero B if not loaded into)
            module = wrap_with_lora(module, r, alpha, config.get("lora_dropout", 0.0), use_rslora, backend)
            replace_module(model, name, module)
        if adapter_name == "default":
            if module.r != r:
                raise ValueError(f"{name} has a rank-{module.r} adapter; {path} holds rank {r}")
            module.lora_alpha, module.use_rslora = alpha, use_rslora
            module.scaling = lora_scale(r, alpha, use_rslora)
        elif adapter_name not in module.extra_adapters:
            module.add_adapter(adapter_name, r, alpha, use_rslora)
        target = module.adapter(adapter_name)
        if target.r != r:
            raise ValueError(f"{name}: adapter {adapter_name!r} has rank {target.r}; {path} holds rank {r}")
        with torch.no_grad():
            target.lora_A.weight.copy_(lora_A)
            target.lora_B.weight.copy_(lora_B)
    return names
