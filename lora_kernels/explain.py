"""Which backend each LoRA layer's last call ran, and why: nothing falls back silently.

Every LoRA layer (``LoRALinear``, ``LoRAConv1D``, PEFT layers switched by ``patch_peft``) keeps
the :class:`~lora_kernels.dispatch.Dispatch` of its last eager call. A call that does not take a
fused kernel is logged on the ``lora_kernels`` logger once per layer and kind of reason: at INFO
where that is the documented choice (``auto`` on CPU tensors, ``auto``'s measured size policy, an
explicit ``backend="reference"``, a merged or disabled adapter), at WARNING otherwise (a dtype mix
or feature the kernels do not cover, a missing backend). :func:`explain` prints the table.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

log = logging.getLogger("lora_kernels")

# Kinds of reason (Dispatch.key) that are a documented choice rather than a surprise: logged at INFO.
_EXPECTED = {"device", "auto-size", "explicit", "merged", "peft-disabled", "peft-merged"}
_DISPATCH, _LOGGED, _NAME = "_lora_kernels_dispatch", "_lora_kernels_logged", "_lora_kernels_name"


def set_layer_name(layer: nn.Module, name: str):
    """The name log lines use for ``layer`` (its name in the model, set by inject_lora / patch_peft)."""
    layer.__dict__[_NAME] = name


def _layer_name(layer) -> str:
    return layer.__dict__.get(_NAME) or type(layer).__name__


def record(layer: nn.Module, dispatch) -> None:
    """Keep ``dispatch`` as ``layer``'s last call, and log it once per kind of reason if it was not
    fused. A few hundred nanoseconds; nothing is recorded while torch.compile traces."""
    if torch.compiler.is_compiling():
        return
    state = layer.__dict__
    state[_DISPATCH] = dispatch
    if not dispatch.fused:
        logged = state.setdefault(_LOGGED, set())
        if dispatch.key not in logged:
            logged.add(dispatch.key)
            log.log(
                logging.INFO if dispatch.key in _EXPECTED else logging.WARNING,
                "lora_kernels: %s runs %s, not a fused kernel: %s",
                _layer_name(layer),
                dispatch.backend,
                dispatch.why,
            )


def last_dispatch(layer: nn.Module):
    """The Dispatch of ``layer``'s last eager call, or None before its first."""
    return layer.__dict__.get(_DISPATCH)


class LayerReport(NamedTuple):
    name: str
    layer: str  # the layer's class
    backend: str  # what its last call ran: triton, cuda, reference, peft (PEFT's own forward), merged, -
    fused: Optional[bool]  # None: not called yet
    why: str


class Explanation(list):
    """A list of :class:`LayerReport`, shown as a table."""

    def __str__(self):
        if not self:
            return "no LoRA layers"
        header = ("layer", "type", "last call", "fused", "why")
        rows = [(r.name, r.layer, r.backend, {True: "yes", False: "no", None: "-"}[r.fused], r.why) for r in self]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in [header, *rows]]
        fused = sum(r.fused is True for r in self)
        return "\n".join(lines + [f"{fused} of {len(self)} LoRA layers fused on their last call"])

    __repr__ = __str__


def explain(model: nn.Module) -> Explanation:
    """Per LoRA layer of ``model``: which backend its last call ran and why (``print`` it, or read
    the rows). Covers our layers and PEFT's LoRA layers, patched or not."""
    from .layers import LoRAMixin
    from .peft_patch import peft_layer_status

    out = Explanation()
    for name, module in model.named_modules():
        if isinstance(module, LoRAMixin):
            status = None
        else:
            status = peft_layer_status(module)  # None: not a PEFT LoRA layer
            if status is None:
                continue
        dispatch = last_dispatch(module)
        if dispatch is not None:
            out.append(LayerReport(name, type(module).__name__, dispatch.backend, dispatch.fused, dispatch.why))
        elif status:  # a PEFT layer patch_peft left on PEFT's path (or that was never patched)
            out.append(LayerReport(name, type(module).__name__, "peft", False, status))
        else:
            out.append(LayerReport(name, type(module).__name__, "-", None, "not called yet"))
    return out
