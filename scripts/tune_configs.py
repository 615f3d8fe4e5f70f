"""Autotune the Triton tile configs on this GPU for the benchmark's shapes and print, per shape,
the table's config and the fastest one found, to update the tables in lora_kernels/triton/_common.py.

    LORA_KERNELS_AUTOTUNE=1 python3 scripts/tune_configs.py
"""

import os

import torch

assert os.environ.get("LORA_KERNELS_AUTOTUNE") == "1", "run with LORA_KERNELS_AUTOTUNE=1"
import lora_kernels  # noqa: E402
from lora_kernels import triton as tk  # noqa: E402
from lora_kernels.triton._common import tile_config  # noqa: E402

KNOBS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
for K, N in [(4096, 4096), (4096, 11008), (11008, 4096)]:
    for M in [1, 16, 128, 1024, 8192]:
        for r in [16, 64]:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
            a = torch.randn(r, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            b = torch.randn(N, r, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            lora_kernels.lora_linear(x, w, None, a, b, 2.0, backend="triton").sum().backward()
chosen = tk.tuned_configs()
print(f"{'kernel':<8} {'M≤':>5} {'N':>6} {'K':>6} {'r':>4}  table -> tuned ({', '.join(KNOBS)})")
for key, cfg in sorted(chosen.items(), key=lambda kv: kv[0][:5]):
    kind, m_bucket, N, K, R = key[:5]
    table = tile_config(kind, m_bucket, R, torch.bfloat16)
    mark = "" if table == cfg else "   <- differs"
    print(
        f"{kind:<8} {m_bucket:>5} {N:>6} {K:>6} {R:>4}  {tuple(table[k] for k in KNOBS)} -> "
        f"{tuple(cfg[k] for k in KNOBS)}{mark}"
    )
