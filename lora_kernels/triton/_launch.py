"""Launching the Triton kernels: through ``JITFunction`` (the default), or directly (opt-in).

``kernel[grid](*args, **constexprs)`` runs Triton's JIT on every call: it binds and specialises the
arguments, builds a cache key and looks it up, then launches. That is most of an eager call's host
time at small M (bench/results/, H100 host: ~150 µs per Triton launch, triton 3.6). With
LORA_KERNELS_DIRECT_LAUNCH=1, the first call of each argument class goes through the JIT as usual
and keeps the compiled kernel it returns; later calls of that class launch the compiled kernel
directly (``CompiledKernel[grid](*all_args)``, the kernel's own launcher), after building the
call's class and one dictionary look-up: ~10 µs per launch on the development CPU where the JIT
takes ~20 (bench/results/host-overhead-cpu.md, driver faked).

The class of a call is exact, so a cached kernel never runs on arguments it was not compiled
for: every integer and float argument by value (the JIT specialises integers on being 1 or a
multiple of 16; equal values of other types, 2 and 2.0, share a class and compute alike), every
tensor by dtype and 16-byte alignment of its address (the JIT's pointer specialisation), the
device, and every constexpr and launch option by value. Triton's global knobs (debug,
instrumentation) are read when a class is first seen. tests/triton/direct_launch_check.py checks
it against Triton's own launch path (3.6, 3.8 and 3.9, driver faked); opt-in until it has run on a GPU.
"""

from __future__ import annotations

import operator
from typing import Callable, NamedTuple

import torch

from .. import _env
from ._common import INTERPRETING

DIRECT_LAUNCH = _env.enabled("LORA_KERNELS_DIRECT_LAUNCH") and not INTERPRETING
# Compile options every launch passes. FMA contraction on: the kernels were measured and their error
# bounds set with it, Triton's default up to 3.9 (which warns that 3.10 turns it off);
# TRITON_FORCE_DISABLE_FP_FUSION=1 still turns it off.
COMPILE_OPTIONS = {"enable_fp_fusion": True}
MAX_CLASSES = 4096  # argument classes kept (distinct M values, mostly); past it the cache starts over
# Keyed by id(kernel): a JITFunction hashes in Python (its cache key), ~1 µs per look-up here;
# the kernels are module globals that live as long as the process, and each entry keeps its own.
_COMPILED = {}  # (id(kernel), argument class, constexprs) -> (kernel, compiled kernel, trailing constexprs)
_LAYOUTS = {}  # id(kernel) -> (kernel, which of its positional arguments are tensors: see Layout)


class Layout(NamedTuple):
    """Where a kernel's tensor arguments are among its positional ones, from its first launch (the
    wrappers pass a tensor for every pointer parameter, a placeholder where one is unused), as
    getters that pick them, and the rest, out of ``args`` in one C call each."""

    positions: tuple
    tensors: Callable[[tuple], tuple]
    others: Callable[[tuple], tuple]

    @classmethod
    def of(cls, args) -> "Layout":
        positions = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        others = tuple(i for i in range(len(args)) if i not in positions)
        return cls(positions, _getter(positions), _getter(others))

    def matches(self, args) -> bool:
        return self.positions == Layout.of(args).positions


def _getter(positions):
    """``args -> tuple(args[i] for i in positions)``, in C (itemgetter returns a bare item for one)."""
    if len(positions) >= 2:
        return operator.itemgetter(*positions)
    return lambda args: tuple(args[i] for i in positions)


def argument_class(args, layout: Layout) -> tuple:
    """What the JIT's specialisation of positional ``args`` depends on, exactly (see the module doc):
    the device, each tensor's dtype and 16-byte alignment, every other argument by value."""
    tensors = layout.tensors(args)
    device = tensors[0].get_device() if tensors else None  # a call's tensors are all on one device
    return device, tuple([(t.dtype, not t.data_ptr() & 15) for t in tensors]), layout.others(args)


def launch(kernel, grid, *args, **constexprs):
    """``kernel[grid](*args, **constexprs)``: the kernel's parameters in order, positional first,
    the constexprs and launch options (num_warps, num_stages) by name; COMPILE_OPTIONS added."""
    if not DIRECT_LAUNCH:
        kernel[grid](*args, **constexprs, **COMPILE_OPTIONS)
        return
    kernel_id = id(kernel)
    kept = _LAYOUTS.get(kernel_id)
    layout = kept[1] if kept is not None and kept[0] is kernel else None
    if layout is not None:
        try:
            entry = _COMPILED.get((kernel_id, argument_class(args, layout), tuple(constexprs.items())))
        except AttributeError:  # no tensor where the first launch had one: a call never kept
            entry = None
        if entry is not None and entry[0] is kernel:
            _, compiled, trailing = entry
            # the compiled kernel's runner reads grid[0..2]; the JIT pads a shorter grid with 1s itself
            compiled[(*grid, 1, 1)[:3]](*args, *trailing)
            return
    compiled = kernel[grid](*args, **constexprs, **COMPILE_OPTIONS)  # the JIT: compiles or finds it, launches
    if compiled is None:
        return
    if layout is None:
        layout = Layout.of(args)
        _LAYOUTS[kernel_id] = (kernel, layout)
    if not layout.matches(args):  # a tensor where the first launch had none, or none where it had one
        return  # not kept: such calls always take the JIT
    if len(_COMPILED) >= MAX_CLASSES:
        _COMPILED.clear()
    # the compiled kernel's launcher takes every parameter in order, constexprs included
    key = (kernel_id, argument_class(args, layout), tuple(constexprs.items()))
    _COMPILED[key] = (kernel, compiled, tuple(constexprs[name] for name in kernel.arg_names[len(args) :]))


def direct_launches() -> int:
    """How many argument classes launch directly now (for tests and explain-style reports)."""
    return len(_COMPILED)
