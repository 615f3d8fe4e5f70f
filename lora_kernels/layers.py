"""LoRALinear, a drop-in ``nn.Linear`` with a LoRA adapter (and LoRAConv1D for Hugging Face's
Conv1D), and model surgery around them."""

from __future__ import annotations

import functools
import math
import re
import warnings
from typing import Iterable, List, NamedTuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_alpha, check_backend, check_dropout, check_rank
from .explain import record, set_layer_name
from .function import Dispatch, _lora_linear
from .multi import BASE_ONLY_NAME, lora_linear_mixed_batch
from .reference import lora_scale


def _tensor_attr(module: nn.Module, name: str):
    """``module.<name>`` for a parameter, without nn.Module.__getattr__ when it is one; anything
    else (a parametrization's property, a buffer, a plain attribute) by ordinary attribute look-up."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def _init_adapter(lora_A: nn.Linear, lora_B: nn.Linear):
    """PEFT's default: Kaiming-uniform A, zero B, so a fresh adapter changes nothing."""
    nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(lora_B.weight)


MERGED_KEY = "lora_merged"
# Set on a layer (ours or a patched PEFT one) that lora_kernels.parallel sharded: its style's name.
TP_STYLE = "_lora_kernels_tp"
_MERGED = Dispatch("merged", True, "adapter merged into weight: a plain F.linear", "merged")


class Adapter(NamedTuple):
    """One adapter of a LoRA layer, as :meth:`LoRAMixin.adapter` returns it for any of its names."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    r: int
    alpha: float
    use_rslora: bool
    scaling: float


class NamedAdapter(nn.ModuleDict):
    """An adapter added with :meth:`LoRAMixin.add_adapter`: its ``lora_A`` / ``lora_B`` (also as
    ``adapter["lora_A"]``) and the numbers that scale it, under the attribute names the layer uses
    for its default adapter."""

    def __init__(self, lora_A: nn.Linear, lora_B: nn.Linear, r, alpha, use_rslora):
        super().__init__({"lora_A": lora_A, "lora_B": lora_B})
        self.r, self.lora_alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scale(r, alpha, use_rslora)


class LoRAMixin:
    """The adapter part shared by LoRALinear and LoRAConv1D: ``lora_A`` / ``lora_B`` submodules
    (PEFT's key names), frozen base weight, fused forward, merge/unmerge.

    ``fan_in_fan_out`` layers (Hugging Face's Conv1D) store the base weight as (in, out); the
    kernels take it through a transposed view, never a copy.
    """

    fan_in_fan_out = False

    def _init_lora(self, r, alpha, dropout, use_rslora, backend):
        r, alpha, dropout, backend = check_rank(r), check_alpha(alpha), check_dropout(dropout), check_backend(backend)
        self.lora_A, self.lora_B = self._new_adapter(r)
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.backend = (
            r,
            alpha,
            dropout,
            use_rslora,
            backend,
        )
        self.scaling = lora_scale(r, alpha, use_rslora)
        self.merged = False
        self.weight.requires_grad_(False)
        # The default adapter is the layer's own lora_A / lora_B (PEFT's key names); more named
        # adapters for mixed batches are NamedAdapter modules here (empty: no state).
        self.extra_adapters = nn.ModuleDict()

    def _new_adapter(self, r):
        """(lora_A, lora_B) Linear modules of rank r, initialised so the adapter adds exactly zero."""
        r = check_rank(r)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        _init_adapter(lora_A, lora_B)
        return lora_A, lora_B

    def reset_lora_parameters(self):
        _init_adapter(self.lora_A, self.lora_B)

    def base_weight(self):
        """W₀ as (out, in), a view of ``weight`` (read without nn.Module.__getattr__: every call needs it)."""
        weight = _tensor_attr(self, "weight")
        return weight.t() if self.fan_in_fan_out else weight

    def adapter_names(self) -> List[str]:
        """The names :meth:`adapter` and mixed batches accept: "default" first, then those added."""
        return ["default", *self.extra_adapters]

    def _holder(self, name):
        """What holds adapter ``name``: the layer itself ("default") or its NamedAdapter."""
        if name == "default":
            return self
        if name in self.extra_adapters:
            return self.extra_adapters[name]
        raise KeyError(f"no adapter {name!r}; this layer has {self.adapter_names()}")

    def adapter(self, name="default") -> Adapter:
        """The :class:`Adapter` (lora_A, lora_B, r, alpha, use_rslora, scaling) called ``name``."""
        h = self._holder(name)
        return Adapter(h.lora_A, h.lora_B, h.r, h.lora_alpha, h.use_rslora, h.scaling)

    def set_adapter_alpha(self, name, alpha, use_rslora):
        """Give adapter ``name`` a new alpha (and rsLoRA choice); its scaling follows."""
        h = self._holder(name)
        h.lora_alpha, h.use_rslora = check_alpha(alpha), use_rslora
        h.scaling = lora_scale(h.r, h.lora_alpha, use_rslora)

    def add_adapter(self, name: str, r=8, alpha=16, use_rslora=False) -> NamedAdapter:
        """Another adapter, selectable per sample with ``forward(x, adapter_names=[...])``; the
        first adapter is named "default". Fresh adapters are Kaiming/zero initialised."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"the adapter name must be a non-empty string, got {name!r}")
        if name == BASE_ONLY_NAME or name in self.adapter_names():
            raise ValueError(f"adapter name {name!r} is taken")
        r, alpha = check_rank(r), check_alpha(alpha)
        self.extra_adapters[name] = NamedAdapter(*self._new_adapter(r), r, alpha, use_rslora)
        return self.extra_adapters[name]

    def _mixed_batch(self, x, adapter_names):
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names, one per sample, got {adapter_names!r}")
        if self.merged:
            raise RuntimeError("unmerge() before running a mixed-adapter batch")
        if self.training and self.lora_dropout > 0:
            raise RuntimeError("mixed-adapter batches run without dropout: call eval() first")
        known = self.adapter_names()
        unknown = set(adapter_names) - set(known) - {BASE_ONLY_NAME}
        if unknown:
            raise ValueError(
                f"unknown adapter names {sorted(unknown)}; this layer has {known} (and {BASE_ONLY_NAME!r} for none)"
            )
        adapters = {}
        for name in dict.fromkeys(adapter_names):
            if name != BASE_ONLY_NAME:
                a = self.adapter(name)
                adapters[name] = (a.lora_A.weight, a.lora_B.weight, a.scaling)
        y, dispatch = lora_linear_mixed_batch(x, self.base_weight(), self.bias, adapters, adapter_names, self.backend)
        record(self, dispatch)
        return y

    def forward(self, x, adapter_names=None):
        """``adapter_names``: one adapter name per sample (x.shape[0]), "__base__" for none, as
        PEFT's mixed batch; all rows run in one fused multi-adapter pass."""
        if adapter_names is not None:
            return self._mixed_batch(x, adapter_names)
        if self.merged:
            if (
                self.training
                and torch.is_grad_enabled()
                and (self.lora_A.weight.requires_grad or self.lora_B.weight.requires_grad)
            ):
                warnings.warn(
                    "a merged LoRA layer runs as a plain F.linear: its adapters get no gradient; "
                    "unmerge() before training",
                    stacklevel=2,
                )
            record(self, _MERGED)
            return F.linear(x, self.base_weight(), self.bias)
        p = self.lora_dropout if self.training else 0.0
        # the tensors without nn.Module.__getattr__ (a few µs of an eager call's host time)
        bias = _tensor_attr(self, "bias")
        lora_A = _tensor_attr(self._modules["lora_A"], "weight")
        lora_B = _tensor_attr(self._modules["lora_B"], "weight")
        if TP_STYLE in self.__dict__:  # parallelized by lora_kernels.parallel: DTensors in and out
            from .parallel import tp_forward

            weight = _tensor_attr(self, "weight")
            y, dispatch = tp_forward(self, x, weight, bias, lora_A, lora_B, self.scaling, p, self.backend)
        else:  # under torch.autocast, lora_linear computes in the autocast dtype as nn.Linear does
            y, dispatch = _lora_linear(x, self.base_weight(), bias, lora_A, lora_B, self.scaling, p, self.backend)
        record(self, dispatch)
        return y

    @torch.no_grad()
    def _delta_weight(self):
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return delta.t() if self.fan_in_fan_out else delta

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

    # The merged state travels with the weight it describes: a merged layer's state dict has a
    # "lora_merged" entry, and loading a weight sets ``merged`` from it, so a merged checkpoint
    # loaded into a fresh layer does not add the adapter a second time.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + MERGED_KEY] = torch.tensor(True)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        merged = bool(state_dict.pop(prefix + MERGED_KEY, False))
        loads_weight = prefix + "weight" in state_dict
        if (
            self.merged
            and not loads_weight
            and any(k.startswith((prefix + "lora_A.", prefix + "lora_B.")) for k in state_dict)
        ):
            error_msgs.append(
                f"{prefix or 'the layer'}: adapter weights loaded into a merged layer would not match "
                "its merged weight; unmerge() first"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if loads_weight:
            self.merged = merged

    def extra_repr(self):
        return (
            f"{super().extra_repr()}, r={self.r}, alpha={self.lora_alpha}, dropout={self.lora_dropout}, "
            f"merged={self.merged}, backend={self.backend!r}"
        )

    @classmethod
    def _wrap(cls, base: nn.Module, r, alpha, dropout, use_rslora, backend):
        """A layer of this class around ``base`` that holds the same Parameters (no copy)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        for key, value in vars(base).items():  # plain attributes: in/out features, nf/nx, training
            if not key.startswith("_"):
                setattr(layer, key, value)
        layer.weight = base.weight
        layer.register_parameter("bias", base.bias)
        layer._init_lora(r, alpha, dropout, use_rslora, backend)
        return layer


class LoRALinear(LoRAMixin, nn.Linear):
    """``nn.Linear`` plus a LoRA adapter: ``y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ``.

    It *is* an ``nn.Linear`` (isinstance holds; ``weight``, ``bias``, ``in_features``,
    ``out_features`` are kept), the base ``weight`` is frozen, and the adapter lives in
    ``lora_A`` / ``lora_B`` submodules so state-dict keys end in PEFT's ``lora_A.weight`` /
    ``lora_B.weight``. A is Kaiming-uniform and B zero, so a fresh layer computes exactly what the
    base layer does. ``merge()`` folds ``s·B·A`` into ``weight`` (forward is then a plain
    ``F.linear``: zero extra latency); ``unmerge()`` takes it out again.
    """

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        device=None,
        dtype=None,
        *,
        r=8,
        alpha=16,
        dropout=0.0,
        use_rslora=False,
        backend="auto",
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_lora(r, alpha, dropout, use_rslora, backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r=8, alpha=16, dropout=0.0, use_rslora=False, backend="auto"):
        """Wrap ``linear`` without copying it: the new layer holds the same weight and bias Parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls._wrap(linear, r, alpha, dropout, use_rslora, backend)


@functools.lru_cache(maxsize=None)
def lora_conv1d_class():
    """LoRAConv1D: Hugging Face's ``Conv1D`` (GPT-2's projections, weight stored (in, out)) plus
    a LoRA adapter; made on first use so transformers stays an optional dependency."""
    from transformers.pytorch_utils import Conv1D

    class LoRAConv1D(LoRAMixin, Conv1D):
        fan_in_fan_out = True

        @property
        def in_features(self):
            return self.weight.shape[0]

        @property
        def out_features(self):
            return self.weight.shape[1]

        @classmethod
        def from_conv1d(cls, conv, r=8, alpha=16, dropout=0.0, use_rslora=False, backend="auto"):
            return cls._wrap(conv, r, alpha, dropout, use_rslora, backend)

    return LoRAConv1D


def _is_conv1d(module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)


def wrap_with_lora(module: nn.Module, r=8, alpha=16, dropout=0.0, use_rslora=False, backend="auto"):
    """LoRALinear or LoRAConv1D around ``module`` (an nn.Linear or a Hugging Face Conv1D)."""
    if isinstance(module, nn.Linear):
        return LoRALinear.from_linear(module, r, alpha, dropout, use_rslora, backend)
    if _is_conv1d(module):
        return lora_conv1d_class().from_conv1d(module, r, alpha, dropout, use_rslora, backend)
    raise TypeError(f"LoRA wraps nn.Linear or transformers' Conv1D, got {type(module).__name__}")


def _matcher(target_modules: Union[str, Iterable[str]]):
    """PEFT's rule: a string is a regex that must match the whole module name; a list matches a
    module whose name equals an entry or ends with ``"." + entry``."""
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name: pattern.fullmatch(name) is not None
    if not isinstance(target_modules, Iterable):
        raise TypeError(f"target_modules must be a regex string or a list of module names, got {target_modules!r}")
    targets = list(target_modules)
    if not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"target_modules must be a regex string or a non-empty list of names, got {target_modules!r}")
    return lambda name: any(name == t or name.endswith("." + t) for t in targets)


def replace_module(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject_lora(
    model: nn.Module, target_modules, r=8, alpha=16, dropout=0.0, use_rslora=False, backend="auto"
) -> List[str]:
    """Replace the ``nn.Linear`` (and Hugging Face ``Conv1D``) modules of ``model`` whose names match
    ``target_modules`` with LoRA wrappers, in place, sharing the original weights. Returns the
    names replaced."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    match = _matcher(target_modules)
    r, alpha, dropout, backend = check_rank(r), check_alpha(alpha), check_dropout(dropout), check_backend(backend)
    replaced, already = [], []
    lora_layers = [name for name, m in model.named_modules() if isinstance(m, LoRAMixin)]
    for name, module in list(model.named_modules()):
        if not name or not match(name):
            continue
        if isinstance(module, LoRAMixin):
            already.append(name)
            continue
        if any(name.startswith(layer + ".") for layer in lora_layers):  # a LoRA layer's own lora_A, lora_B, ...
            continue
        if isinstance(module, nn.Linear) or _is_conv1d(module):
            layer = wrap_with_lora(module, r, alpha, dropout, use_rslora, backend)
            set_layer_name(layer, name)
            replace_module(model, name, layer)
            replaced.append(name)
    if not replaced:
        if already:
            raise ValueError(
                f"target_modules={target_modules!r} matched only modules that are LoRA layers already "
                f"({', '.join(already[:4])}{', ...' if len(already) > 4 else ''}): nothing to inject; "
                "add_adapter() gives a layer a second adapter"
            )
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear or Conv1D module of the model")
    return replaced


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter except the LoRA adapters' (``lora_A`` / ``lora_B``)."""
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in f".{name}" or ".lora_B." in f".{name}")
    return model


def lora_state_dict(model: nn.Module) -> dict:
    """The adapter weights only, with PEFT-style key endings ``lora_A.weight`` / ``lora_B.weight``.
    Sharded (DTensor) factors are gathered into full tensors: call it on every rank."""
    return {k: full_tensor(v) for k, v in model.state_dict().items() if ".lora_A." in f".{k}" or ".lora_B." in f".{k}"}


def full_tensor(t):
    """``t`` itself, or the whole tensor of a DTensor (a collective over its mesh)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def merge_lora(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, LoRAMixin):
            module.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, LoRAMixin):
            module.unmerge()
    return model
