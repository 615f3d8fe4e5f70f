"""PEFT's adapter format (``adapter_config.json`` + ``adapter_model.safetensors``) for models
built with LoRALinear / inject_lora: saved so that ``PeftModel.from_pretrained`` loads it, and
PEFT's own adapters loaded into plain or LoRA models. (Patching a PEFT model: peft_patch.py.)"""

from __future__ import annotations

import json
import os
import re
from typing import List

import torch
import torch.nn as nn

from ._checks import check_backend
from .layers import LoRAMixin, full_tensor, replace_module, wrap_with_lora

PEFT_PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


def save_peft_adapter(
    model: nn.Module, path: str, *, adapter_name: str = "default", base_model_name_or_path: str = None
) -> List[str]:
    """Write adapter ``adapter_name`` of the model's LoRA layers as a PEFT adapter that
    ``PeftModel.from_pretrained`` (or ``load_adapter``) loads. Returns the module names saved.
    Under torch.distributed the first rank writes; with tensor-parallel layers call it on every rank
    (their factors are gathered whole)."""
    from safetensors.torch import save_file

    layers = {
        name: m.adapter(adapter_name)
        for name, m in model.named_modules()
        if isinstance(m, LoRAMixin) and adapter_name in m.adapter_names()
    }
    if not layers:
        raise ValueError(f"model has no LoRA layers with adapter {adapter_name!r} to save (use inject_lora first)")
    dropouts = {m.lora_dropout for m in model.modules() if isinstance(m, LoRAMixin)}
    first = next(iter(layers.values()))
    if len({a.use_rslora for a in layers.values()}) > 1 or len(dropouts) > 1:
        raise ValueError("PEFT's format has one use_rslora and one dropout per adapter; the layers differ")
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": dropouts.pop(),
        "use_rslora": first.use_rslora,
        "target_modules": sorted(layers),
        "bias": "none",
        "fan_in_fan_out": all(model.get_submodule(n).fan_in_fan_out for n in layers),
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "rank_pattern": {n: a.r for n, a in layers.items() if a.r != first.r},
        "alpha_pattern": {n: a.alpha for n, a in layers.items() if a.alpha != first.alpha},
    }
    tensors = {}
    for name, a in layers.items():  # sharded (tensor-parallel) factors are gathered whole: a collective
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = full_tensor(a.lora_A.weight.detach()).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = full_tensor(a.lora_B.weight.detach()).contiguous()
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:  # one writer
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2)
        save_file({k: v.cpu() for k, v in tensors.items()}, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    return sorted(layers)


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches a module name ending in it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def load_peft_adapter(
    model: nn.Module, path: str, *, adapter_name: str = "default", backend: str = "auto"
) -> List[str]:
    """Load a PEFT LoRA adapter (saved by PEFT or by :func:`save_peft_adapter`) into a plain model or
    one with LoRA layers already: adapted ``nn.Linear`` / ``Conv1D`` modules become LoRA layers, and
    the weights go into adapter ``adapter_name`` ("default", or a named adapter for mixed batches,
    added where missing). Returns the module names loaded.

    Full tensors PEFT saves beside the adapters (biases with ``bias="all"`` or ``"lora_only"``,
    ``modules_to_save`` such as ``lm_head``) are copied into the model's own parameters, in place,
    as PEFT's model would use them; only for the default adapter (they are not per adapter). Any
    tensor of the file that names no parameter of the model is an error, never skipped."""
    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path} holds a {config['peft_type']} adapter, not LoRA")
    for key in ("use_dora", "lora_bias"):
        if config.get(key):
            raise NotImplementedError(f"{path}: {key}=True adapters are not supported by lora_kernels")
    check_backend(backend)
    weights_file = os.path.join(path, WEIGHTS_NAME)
    if os.path.exists(weights_file):
        from safetensors.torch import load_file

        state = load_file(weights_file)
    else:
        state = torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu", weights_only=True)
    state = {k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    names = sorted({k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")})
    if not names:
        raise ValueError(f"{weights_file} holds no lora_A weights")
    full = _full_tensors(model, state, path, adapter_name)  # checked before the model changes
    use_rslora = config.get("use_rslora", False)
    for name in names:
        module = model.get_submodule(name)
        lora_A, lora_B = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        r = lora_A.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", r))
        if not isinstance(module, LoRAMixin):  # the default adapter gets this rank (zero B if not loaded into)
            module = wrap_with_lora(module, r, alpha, config.get("lora_dropout", 0.0), use_rslora, backend)
            replace_module(model, name, module)
        if adapter_name not in module.adapter_names():
            module.add_adapter(adapter_name, r, alpha, use_rslora)
        target = module.adapter(adapter_name)
        if target.r != r:
            raise ValueError(f"{name}: adapter {adapter_name!r} has rank {target.r}; {path} holds rank {r}")
        module.set_adapter_alpha(adapter_name, alpha, use_rslora)  # the file's alpha, for any adapter loaded into
        with torch.no_grad():
            target.lora_A.weight.copy_(lora_A)
            target.lora_B.weight.copy_(lora_B)
    with torch.no_grad():
        for param, value in full:
            param.copy_(value)
    return names


def _full_tensors(model, state, path, adapter_name):
    """[(the model's parameter, the file's tensor)] for the entries that are not LoRA factors: biases
    (``q_proj.base_layer.bias`` in PEFT's naming is our ``q_proj.bias``) and modules_to_save."""
    rest = {k: v for k, v in state.items() if not k.endswith((".lora_A.weight", ".lora_B.weight"))}
    if not rest:
        return []
    if adapter_name != "default":
        raise NotImplementedError(
            f"{path} also holds full tensors ({', '.join(sorted(rest)[:3])}, ...): biases or "
            "modules_to_save are not per adapter; load it as the default adapter"
        )
    params = dict(model.named_parameters())
    out, unknown = [], []
    for key, value in rest.items():
        name = key.replace(".base_layer.", ".")
        param = params.get(name)
        if param is None or param.shape != value.shape:
            unknown.append(
                key if param is None else f"{key} (shape {tuple(value.shape)}, the model's {tuple(param.shape)})"
            )
        else:
            out.append((param, value))
    if unknown:
        raise ValueError(
            f"{path} holds tensors that match no parameter of the model: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}"
        )
    return out
