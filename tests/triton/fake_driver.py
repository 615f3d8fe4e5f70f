"""A stand-in for Triton's CUDA driver, so that Triton's real launch path runs without a GPU.

With it active, ``kernel[grid](*args)`` on CPU tensors goes through ``JITFunction.run`` as on a
GPU: the argument binding and specialisation, the cache key, a real compile for sm_90 (or a hit in
Triton's cache), ``CompiledKernel`` and its runner. Only the device is faked: the binary is never
loaded and the launcher, instead of calling ``cuLaunchKernelEx``, checks its arguments against the
compiled kernel's signature (as the C launcher's argument parsing would) and records them.

Used by tests/triton/direct_launch_check.py (the direct launch path against the JIT's) and by the
host benchmark (bench/test_host.py: what Triton's launch path costs on the host). Works with
triton 3.6, 3.8 and 3.9; must run without TRITON_INTERPRET (the interpreter replaces the kernels).
"""

from __future__ import annotations

import contextlib

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

TARGET = GPUTarget("cuda", 90, 32)  # an H100/H200
SHARED_MEMORY = 232448  # bytes one block may use on sm_90


class FakeLauncher:
    """Takes the place of the C launcher Triton builds per kernel (``driver.active.launcher_cls``)."""

    def __init__(self, src, metadata):
        self.name = src.name
        self.signature = list(src.signature.values())

    def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
        if not _CHECK:
            return
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name}: the launcher takes {len(self.signature)} arguments, got {len(args)}")
        for index, (kind, arg) in enumerate(zip(self.signature, args)):
            if kind.startswith("*") and not isinstance(arg, torch.Tensor):
                raise TypeError(f"{self.name}: argument {index} is a pointer ({kind}), got {type(arg).__name__}")
            if kind[0] in "iu" and not isinstance(arg, int):
                raise TypeError(f"{self.name}: argument {index} is an integer ({kind}), got {type(arg).__name__}")
            if kind[:2] in ("fp", "bf") and not isinstance(arg, (int, float)):
                raise TypeError(f"{self.name}: argument {index} is a float ({kind}), got {type(arg).__name__}")
        if _LOG is not None:
            _LOG.append((self.name, (gx, gy, gz), args))


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, most threads per block

    def get_device_properties(self, device):
        return {"max_shared_mem": SHARED_MEMORY, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}


class FakeDriver:
    """The part of triton.backends.nvidia.driver.CudaDriver that the launch path uses."""

    launcher_cls = FakeLauncher
    utils = _Utils()

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET


_LOG, _CHECK = None, True


@contextlib.contextmanager
def fake_driver(log: list | None = None, check: bool = True):
    """The fake driver active inside the block; each launch appended to ``log`` (a list) if given,
    as (kernel name, (gx, gy, gz), the launcher's arguments). ``check=False``: the launcher does
    nothing at all (for timing what comes before it)."""
    global _LOG, _CHECK
    saved = driver._active, _LOG, _CHECK
    driver.set_active(FakeDriver())
    _LOG, _CHECK = log, check
    try:
        yield log
    finally:
        driver._active, _LOG, _CHECK = saved
