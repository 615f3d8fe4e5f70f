"""The LoRA paper's Table 1: latency of one GPT-2 medium forward pass, adapters vs LoRA.

Per cell: `--trials` forward passes (the paper: 100) after warm-up, each timed with CUDA events
(mean ± std like the paper, and the median), plus the same pass replayed from a CUDA graph (GPU
time without launch overhead). A run without a GPU uses REDUCED_CONFIG and small batches.
"""

from __future__ import annotations

import pytest
import torch
from gpt2 import GPT2, MEDIUM_CONFIG, REDUCED_CONFIG, adapter_params, add_lora_q_v
from report import RESULTS, progress
from timing import time_eager, time_graph

# (batch, sequence, AdapterL bottleneck, AdapterH bottleneck): |Θ| 0.5M, 11M, 11M as in TABLE1.md
COLUMNS = [(32, 512, 8, 5), (16, 256, 224, 112), (1, 128, 224, 112)]
REDUCED_COLUMNS = [(4, 64, 1, 1), (2, 32, 28, 14), (1, 16, 28, 14)]
VARIANTS = [
    "Fine-Tune / LoRA (merged)",
    "AdapterL",
    "AdapterH",
    "LoRA r=4 Wq,Wv: lora_kernels (auto)",
    "LoRA r=4 Wq,Wv: PEFT-style (unfused)",
    "LoRA r=8 c_attn: PEFT's lora.Linear",
]


def pytest_generate_tests(metafunc):
    if "cell" in metafunc.fixturenames:
        from conftest import run_info

        info = run_info(metafunc.config)
        columns = REDUCED_COLUMNS if info.reduced else COLUMNS
        cells = [(dtype, v, col) for dtype in info.table1_dtypes for col in columns for v in VARIANTS]
        ids = [
            f"{str(d).replace('torch.', '')}-{v.split(':')[-1].strip().replace(' ', '_')}-b{c[0]}s{c[1]}"
            for d, v, c in cells
        ]
        metafunc.parametrize("cell", cells, ids=ids)


def build(variant, cfg, bottleneck_l, bottleneck_h, device, dtype):
    factory = dict(device=device, dtype=dtype)
    if variant == "AdapterL":
        return GPT2(cfg, "L", bottleneck_l, **factory)
    if variant == "AdapterH":
        return GPT2(cfg, "H", bottleneck_h, **factory)
    model = GPT2(cfg, **factory)
    if variant.endswith("PEFT's lora.Linear"):  # same FLOPs as rank 4 on Wq and Wv of the fused c_attn
        peft = pytest.importorskip("peft")
        peft.inject_adapter_in_model(peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]), model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    elif variant.startswith("LoRA"):
        add_lora_q_v(model, r=4, alpha=8, fused="lora_kernels" in variant)
    return model


def test_table1(cell, info):
    dtype, variant, (batch, seq, b_l, b_h) = cell
    cfg = REDUCED_CONFIG if info.reduced else MEDIUM_CONFIG
    torch.manual_seed(0)
    model = build(variant, cfg, b_l, b_h, info.device, dtype).eval()
    idx = torch.randint(0, cfg.vocab, (batch, seq), device=info.device)

    def forward(_):
        with torch.no_grad():
            return model(idx)

    warmup = 10 if info.device == "cuda" else 2
    eager = time_eager(forward, 1, info.trials, warmup, info.device)
    graph = time_graph(forward, 1, info.trials, info.device)
    RESULTS["table1"].append(
        dict(
            dtype=str(dtype).replace("torch.", ""),
            variant=variant,
            batch=batch,
            seq=seq,
            params=adapter_params(model),
            eager=eager.as_dict(),
            graph=graph and graph.as_dict(),
            reduced=info.reduced,
        )
    )
    t = graph or eager
    progress(info, "table1", f"{str(dtype).replace('torch.', '')} b{batch}/s{seq} {variant}: {t.median_ms:.3f} ms")
    model = idx = None  # free the model (not del: the closures above refer to it)
    if info.device == "cuda":
        torch.cuda.empty_cache()
