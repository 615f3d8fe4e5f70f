"""Launching the Triton kernels: through ``JITFunction`` (the default), or directly (opt-in).

``kernel[grid](*args, **constexprs)`` runs Triton's JIT on every call: it binds and specialises the
arguments, builds a cache key and looks it up, then launches. That is most of an eager call's host
time at small M (bench/results/, H100 host: ~150 µs per Triton launch, triton 3.6). With
LORA_KERNELS_DIRECT_LAUNCH=1, the first call of each argument class goes through the JIT as usual
and keeps the compiled kernel it returns; later calls of that class launch the compiled kernel
directly (``CompiledKernel[grid](*all_args)``, the kernel's own launcher), after one dictionary
look-up.

The class of a call is exact, so a cached kernel never runs on arguments it was not compiled
for: every integer and float argument by value (the JIT specialises integers on being 1 or a
multiple of 16), every tensor by dtype, device and 16-byte alignment of its address (the JIT's
pointer specialisation), and every constexpr and launch option by value. Triton's global knobs
(debug, instrumentation) are read when a class is first seen. Opt-in until it has run on a GPU.
"""

from __future__ import annotations

import torch

from .. import _env
from ._common import INTERPRETING

DIRECT_LAUNCH = _env.enabled("LORA_KERNELS_DIRECT_LAUNCH") and not INTERPRETING
MAX_CLASSES = 4096  # argument classes kept (distinct M values, mostly); past it the cache starts over
_COMPILED = {}


def argument_class(args) -> tuple:
    """What the JIT's specialisation of positional ``args`` depends on, exactly (see the module doc)."""
    return tuple((a.dtype, a.device.index, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args)


def launch(kernel, grid, *args, **constexprs):
    """``kernel[grid](*args, **constexprs)``: the kernel's parameters in order, positional first,
    the constexprs and launch options (num_warps, num_stages) by name."""
    if not DIRECT_LAUNCH:
        kernel[grid](*args, **constexprs)
        return
    key = (kernel, argument_class(args), tuple(constexprs.items()))
    entry = _COMPILED.get(key)
    if entry is not None:
        compiled, trailing = entry
        # the compiled kernel's runner reads grid[0..2]; the JIT pads a shorter grid with 1s itself
        compiled[(*grid, 1, 1)[:3]](*args, *trailing)
        return
    compiled = kernel[grid](*args, **constexprs)  # the JIT: compiles or finds the kernel, and launches
    if compiled is None:
        return
    if len(_COMPILED) >= MAX_CLASSES:
        _COMPILED.clear()
    # the compiled kernel's launcher takes every parameter in order, constexprs included
    _COMPILED[key] = (compiled, tuple(constexprs[name] for name in kernel.arg_names[len(args) :]))


def direct_launches() -> int:
    """How many argument classes launch directly now (for tests and explain-style reports)."""
    return len(_COMPILED)
