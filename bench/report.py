"""Results of a bench run: collected in RESULTS, printed at the end, written as md, json and png."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from typing import List, Optional

import torch

RESULTS = {"layer": [], "table1": [], "features": []}

# The paper's Table 1 (Quadro RTX8000, fp32 is not stated; ms, mean±std over 100 trials).
PAPER_TABLE1 = {
    "columns": [(32, 512), (16, 256), (1, 128)],
    "Fine-Tune / LoRA (merged)": [(1449.4, 0.8), (338.0, 0.6), (19.8, 2.7)],
    "AdapterL": [(1482.0, 1.0), (354.8, 0.5), (23.9, 2.1)],
    "AdapterH": [(1492.2, 1.0), (366.3, 0.5), (25.8, 2.2)],
}


@dataclass
class RunInfo:
    device: str
    reduced: bool
    shapes: List[tuple]
    ms: List[int]
    ranks: List[int]
    dtype: torch.dtype
    impls: Optional[List[str]]
    reps: int
    trials: int
    table1_dtypes: List[torch.dtype]
    results_dir: str
    meta: dict = field(default_factory=dict)


def _versions(info: RunInfo) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        commit = commit + ("-dirty" if dirty else "") if commit else None
    except OSError:
        commit = None
    gpu = torch.cuda.get_device_name() if info.device == "cuda" else None
    return {
        "device": gpu or f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "mode": "REDUCED CPU RUN: small sizes, reference path; not kernel performance" if info.reduced else "full",
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
    }


def _fmt(v, digits=4):
    return "—" if v is None else f"{v:.{digits}f}"


def _ratio(v, base):
    return "—" if v is None or not base else f"{v / base:.2f}×"


def layer_markdown(rows) -> List[str]:
    out = ["| in×out | r | M | implementation | fwd eager ms | fwd graph ms | fwd ×base | train eager ms | "
           "train graph ms | train ×base | train peak MiB |", "|" + "---|" * 11]
    base = {}
    for row in rows:
        if row["impl"] == "base":
            base[(row["K"], row["N"], row["M"], row["r"])] = row
    for row in rows:
        b = base.get((row["K"], row["N"], row["M"], row["r"]), {})
        fwd_key = "fwd_graph_ms" if row.get("fwd_graph_ms") is not None else "fwd_eager_ms"
        train_key = "train_graph_ms" if row.get("train_graph_ms") is not None else "train_eager_ms"
        out.append(
            f"| {row['K']}×{row['N']} | {row['r']} | {row['M']} | {row['impl']} | {_fmt(row['fwd_eager_ms'])} | "
            f"{_fmt(row.get('fwd_graph_ms'))} | {_ratio(row.get(fwd_key), b.get(fwd_key))} | "
            f"{_fmt(row['train_eager_ms'])} | {_fmt(row.get('train_graph_ms'))} | "
            f"{_ratio(row.get(train_key), b.get(train_key))} | {_fmt(row.get('train_peak_mb'), 1)} |")
    return out


def table1_markdown(rows) -> List[str]:
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sub = [r for r in rows if r["dtype"] == dtype]
        cols = list(dict.fromkeys((r["batch"], r["seq"]) for r in sub))
        variants = list(dict.fromkeys(r["variant"] for r in sub))
        cell = {(r["variant"], r["batch"], r["seq"]): r for r in sub}
        for timing in ("eager", "graph"):
            if all(r.get(timing) is None for r in sub):
                continue
            out += ["", f"**{dtype}, {timing}** — ms, mean±std over the trials (median); overhead over the merged "
                    "model, the paper's in brackets", "",
                    "| variant | " + " | ".join(f"batch {b} / seq {s}" for b, s in cols) + " |",
                    "|---|" + "---|" * len(cols)]
            for v in variants:
                cells = []
                for col_i, (b, s) in enumerate(cols):
                    r = cell.get((v, b, s))
                    if r is None or r.get(timing) is None:
                        cells.append("—")
                        continue
                    t = r[timing]
                    base = cell.get(("Fine-Tune / LoRA (merged)", b, s), {}).get(timing)
                    text = f"{t['mean']:.2f}±{t['std']:.2f} ({t['median']:.2f})"
                    if base and v != "Fine-Tune / LoRA (merged)":
                        text += f" {100 * (t['mean'] / base['mean'] - 1):+.1f}%"
                        paper = PAPER_TABLE1.get(v)
                        if paper and (b, s) in PAPER_TABLE1["columns"] and not r.get("reduced"):
                            p = paper[PAPER_TABLE1["columns"].index((b, s))][0]
                            pb = PAPER_TABLE1["Fine-Tune / LoRA (merged)"][PAPER_TABLE1["columns"].index((b, s))][0]
                            text += f" [{100 * (p / pb - 1):+.1f}%]"
                    if r["params"]:
                        text += f" · Θ {_count(r['params'])}"
                    cells.append(text)
                out.append(f"| {v} | " + " | ".join(cells) + " |")
    return out


def _count(n):
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _header(meta) -> List[str]:
    return [f"- device: {meta['device']}", f"- mode: {meta['mode']}",
            f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}",
            f"- date: {meta['date']}, commit: {meta['commit']}"]


def report_lines(info: RunInfo) -> List[str]:
    meta = info.meta or _versions(info)
    lines = ["# lora_kernels benchmark", ""] + _header(meta)
    if RESULTS["layer"]:
        lines += ["", "## Layer: forward and training step (forward + dX, dA, dB)", "",
                  "Medians over rotated input sets. `graph` = CUDA-graph replay (GPU time only). ×base = this "
                  "implementation over the frozen base layer `x @ W₀ᵀ` in the same run (= merged LoRA); the "
                  "training-step base computes dX only.", ""]
        lines += layer_markdown(RESULTS["layer"])
    if RESULTS["features"]:
        lines += ["", "## Fused dropout and multi-adapter batches", "",
                  "dropout: training step (forward + dX, dA, dB); multi: forward of one batch. "
                  "× = over the first row of the same case.", "",
                  "| case | in×out | M | r | implementation | eager ms | graph ms | × |", "|" + "---|" * 8]
        first = {}
        for row in RESULTS["features"]:
            t = row["graph_ms"] if row["graph_ms"] is not None else row["eager_ms"]
            first.setdefault(row["case"], t)
            lines.append(f"| {row['case']} | {row['K']}×{row['N']} | {row['M']} | {row['r']} | {row['impl']} | "
                         f"{_fmt(row['eager_ms'])} | {_fmt(row['graph_ms'])} | {_ratio(t, first[row['case']])} |")
    if RESULTS["table1"]:
        lines += ["", "## The LoRA paper's Table 1: GPT-2 medium single forward pass", ""]
        if info.reduced:
            lines += ["REDUCED: a small GPT-2 (see bench/gpt2.py REDUCED_CONFIG) at small batch and sequence, "
                      "so the run ends in minutes on a CPU. Not comparable with the paper."]
        lines += table1_markdown(RESULTS["table1"])
    return lines


def print_report(write_line, info: RunInfo, paths=()):
    write_line("")
    for line in report_lines(info):
        write_line(line)
    for p in paths:
        write_line(f"wrote {p}")


def _slug(info: RunInfo) -> str:
    """File name: the device, and the suite when only one ran (so it does not overwrite a full run)."""
    name = torch.cuda.get_device_name() if info.device == "cuda" else "cpu-reduced"
    suites = [k for k in ("layer", "table1", "features") if RESULTS[k]]
    if len(suites) == 1:
        name += "-" + suites[0]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_report(info: RunInfo) -> List[str]:
    info.meta = info.meta or _versions(info)
    os.makedirs(info.results_dir, exist_ok=True)
    stem = os.path.join(info.results_dir, _slug(info))
    with open(stem + ".json", "w") as f:
        json.dump({"meta": info.meta, **RESULTS}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(report_lines(info)) + "\n")
    paths = [stem + ".json", stem + ".md"]
    if RESULTS["layer"] and _plot(info, stem + ".png"):
        paths.append(stem + ".png")
    return paths


def _plot(info: RunInfo, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = RESULTS["layer"]
    panels = list(dict.fromkeys((r["K"], r["N"], r["r"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (K, N, r) in zip(axes[0], panels):
        sub = [row for row in rows if (row["K"], row["N"], row["r"]) == (K, N, r)]
        for impl in dict.fromkeys(row["impl"] for row in sub):
            pts = sorted((row["M"], row.get("fwd_graph_ms") or row["fwd_eager_ms"]) for row in sub if row["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="M (rows of x)", title=f"in={K} out={N} r={r}")
    axes[0][0].set_ylabel("forward ms (" + ("CUDA-graph replay" if info.device == "cuda" else "CPU, eager") + ")")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"lora_kernels forward latency — {info.meta['device']} — {info.meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
