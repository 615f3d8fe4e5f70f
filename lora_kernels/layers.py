"""LoRALinear, a drop-in ``nn.Linear`` with a LoRA adapter, and model surgery around it."""
from __future__ import annotations

import math
import re
from typing import Iterable, List, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import BACKENDS
from .function import lora_linear
from .reference import lora_scale


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a LoRA adapter: ``y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ``.

    It *is* an ``nn.Linear`` (isinstance holds; ``weight``, ``bias``, ``in_features``,
    ``out_features`` are kept), the base ``weight`` is frozen, and the adapter lives in
    ``lora_A`` / ``lora_B`` submodules so state-dict keys end in PEFT's ``lora_A.weight`` /
    ``lora_B.weight``. A is Kaiming-uniform and B zero, so a fresh layer computes exactly what the
    base layer does. ``merge()`` folds ``s·B·A`` into ``weight`` (forward is then a plain
    ``F.linear``: zero extra latency); ``unmerge()`` takes it out again.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 r=8, alpha=16, dropout=0.0, use_rslora=False, backend="auto"):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_lora(r, alpha, dropout, use_rslora, backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r=8, alpha=16, dropout=0.0, use_rslora=False, backend="auto"):
        """Wrap ``linear`` without copying it: the new layer holds the same weight and bias Parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.register_parameter("bias", linear.bias)
        layer._init_lora(r, alpha, dropout, use_rslora, backend)
        layer.train(linear.training)
        return layer

    def _init_lora(self, r, alpha, dropout, use_rslora, backend):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.backend = r, alpha, dropout, use_rslora, backend
        self.scaling = lora_scale(r, alpha, use_rslora)
        self.merged = False
        self.weight.requires_grad_(False)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        p = self.lora_dropout if self.training else 0.0
        tensors = (x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight)
        if torch.is_autocast_enabled(x.device.type):  # do what autocast does for nn.Linear: run in its dtype
            dtype = torch.get_autocast_dtype(x.device.type)
            tensors = [t if t is None else t.to(dtype) for t in tensors]
            with torch.autocast(x.device.type, enabled=False):
                return lora_linear(*tensors, self.scaling, p, self.backend)
        return lora_linear(*tensors, self.scaling, p, self.backend)

    @torch.no_grad()
    def _delta_weight(self):
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        """Fold the adapter into ``weight`` (computed in fp32). Idempotent."""
        if not self.merged:
            self.weight.copy_(self.weight.float() + self._delta_weight())
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self):
        """Take the adapter back out of ``weight``. Idempotent."""
        if self.merged:
            self.weight.copy_(self.weight.float() - self._delta_weight())
            self.merged = False
        return self

    def extra_repr(self):
        return (f"{super().extra_repr()}, r={self.r}, alpha={self.lora_alpha}, dropout={self.lora_dropout}, "
                f"merged={self.merged}, backend={self.backend!r}")


def _matcher(target_modules: Union[str, Iterable[str]]):
    """PEFT's rule: a string is a regex that must match the whole module name; a list matches a
    module whose name equals an entry or ends with ``"." + entry``."""
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name: pattern.fullmatch(name) is not None
    targets = list(target_modules)
    if not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"target_modules must be a regex string or a non-empty list of names, got {target_modules!r}")
    return lambda name: any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(model: nn.Module, target_modules, r=8, alpha=16, dropout=0.0, use_rslora=False,
                backend="auto") -> List[str]:
    """Replace the ``nn.Linear`` modules of ``model`` whose names match ``target_modules`` with
    :class:`LoRALinear` wrappers (in place, sharing the original weights). Returns the names replaced."""
    match = _matcher(target_modules)
    replaced = []
    for name, module in list(model.named_modules()):
        if name and match(name) and isinstance(module, nn.Linear) and not isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear.from_linear(module, r, alpha, dropout, use_rslora, backend))
            replaced.append(name)
    if not replaced:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear module of the model")
    return replaced


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter except the LoRA adapters' (``lora_A`` / ``lora_B``)."""
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in f".{name}" or ".lora_B." in f".{name}")
    return model


def lora_state_dict(model: nn.Module) -> dict:
    """The adapter weights only, with PEFT-style key endings ``lora_A.weight`` / ``lora_B.weight``."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in f".{k}" or ".lora_B." in f".{k}"}


def merge_lora(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.unmerge()
    return model
