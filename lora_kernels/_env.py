"""Every environment switch of lora_kernels, in one table (the README's is this one).

Pure Python with no imports of the package, so setup.py can read the build-time switches from
here before torch or the package is importable. The CUDA kernels' run-time switches are read in
C++ (csrc/switches.h), per call, so a benchmark can compare both settings in one process.
"""

from __future__ import annotations

import os
from typing import NamedTuple


class Switch(NamedTuple):
    name: str
    when: str  # "build" (setup.py) or "run" (import time or per call)
    default: str
    effect: str


SWITCHES = (
    Switch(
        "LORA_KERNELS_SKIP_CUDA_BUILD",
        "build",
        "0",
        "1: install without the CUDA extension (Triton and reference backends only)",
    ),
    Switch(
        "TORCH_CUDA_ARCH_LIST",
        "build",
        "8.0;9.0a",
        "GPUs the CUDA extension is compiled for; the wgmma kernel needs 9.0a (and not plain 9.0)",
    ),
    Switch("MAX_JOBS", "build", "all cores (make: 2)", "parallel compile jobs (torch's ninja build)"),
    Switch("CUDA_HOME", "build", "/usr/local/cuda (found by torch)", "the CUDA toolkit holding nvcc"),
    Switch(
        "LORA_KERNELS_AUTOTUNE",
        "run",
        "0",
        "1: time the tile table's config against its neighbours once per shape and keep the fastest",
    ),
    Switch(
        "LORA_KERNELS_DIRECT_LAUNCH",
        "run",
        "0",
        "1: later Triton launches of a seen argument class skip the JIT's per-call work (not yet run on a GPU)",
    ),
    Switch(
        "LORA_KERNELS_TMA_ROWS",
        "run",
        "0",
        "N > 0: the Triton forward and dX use the warp-specialized TMA kernel (sm_90+, 16-bit) from N rows of x "
        "up (not yet run on a GPU)",
    ),
    Switch(
        "TRITON_INTERPRET",
        "run",
        "0",
        "Triton's own: 1 runs the Triton kernels on CPU tensors with numpy (tests); read at import",
    ),
    Switch(
        "LORA_KERNELS_WGMMA",
        "run",
        "0",
        "1: the CUDA backend uses its sm_90a wgmma GEMM for the large products (not yet run on a GPU)",
    ),
    Switch(
        "LORA_KERNELS_WGMMA_LOADS",
        "run",
        "producer",
        "how the wgmma kernel stages operands: producer (warp-specialized TMA), tma or cp.async",
    ),
    Switch(
        "LORA_KERNELS_PDL",
        "run",
        "1",
        "0: the CUDA forward's y kernel waits for the xa kernel instead of overlapping it (sm_90+)",
    ),
)
_BY_NAME = {s.name: s for s in SWITCHES}


def value(name: str) -> str:
    """The switch's value in this environment, or its default."""
    return os.environ.get(name, _BY_NAME[name].default)


def enabled(name: str) -> bool:
    """Whether a 0/1 switch is on."""
    return os.environ.get(name, _BY_NAME[name].default) == "1"


def with_default(name: str) -> str:
    """The switch's value, after putting its default into the environment where it is unset (for
    tools that read it themselves: torch's extension build reads TORCH_CUDA_ARCH_LIST)."""
    return os.environ.setdefault(name, _BY_NAME[name].default)


def markdown_table() -> str:
    rows = ["| variable | when | default | what it does |", "|---|---|---|---|"]
    rows += [f"| `{s.name}` | {s.when} | `{s.default}` | {s.effect} |" for s in SWITCHES]
    return "\n".join(rows)
