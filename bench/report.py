"""Results of a bench run: collected in RESULTS, summarised at the end, written as md, json and png.

Statistics. Every timing keeps its median and interquartile range (q1..q3) over the samples, and
its mean ± std (what the LoRA paper reports). A ratio of two timings (× the base layer, or an
overhead over the merged model) is the ratio of their medians, with the interval q1/q3' .. q3/q1';
a ratio whose interval includes 1 (no difference) is marked noise ("~"): the spread exceeds the
difference it shows.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional

import torch

RESULTS = {"layer": [], "table1": [], "features": [], "host": []}

# The paper's Table 1 (Quadro RTX8000, fp32 is not stated; ms, mean±std over 100 trials).
PAPER_TABLE1 = {
    "columns": [(32, 512), (16, 256), (1, 128)],
    "Fine-Tune / LoRA (merged)": [(1449.4, 0.8), (338.0, 0.6), (19.8, 2.7)],
    "AdapterL": [(1482.0, 1.0), (354.8, 0.5), (23.9, 2.1)],
    "AdapterH": [(1492.2, 1.0), (366.3, 0.5), (25.8, 2.2)],
}
MERGED = "Fine-Tune / LoRA (merged)"
REDUCED_NOTE = "REDUCED CPU RUN: smoke test of the benchmark, not kernel performance"


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
    write_line: Optional[Callable[[str], None]] = None  # progress lines, past pytest's capture


# ---- statistics ---------------------------------------------------------------------------------


class Ratio(NamedTuple):
    value: float
    lo: float
    hi: float
    noisy: bool  # the interval includes 1: the spread is larger than the difference

    @classmethod
    def of(cls, num: Optional[dict], den: Optional[dict]) -> Optional["Ratio"]:
        """num / den from their medians; the interval from their interquartile ranges."""
        if not num or not den or not den["median"]:
            return None
        value = num["median"] / den["median"]
        lo, hi = num["q1"] / den["q3"], num["q3"] / max(den["q1"], 1e-12)
        return cls(value, lo, hi, lo <= 1.0 <= hi and num is not den)

    def times(self) -> str:
        return f"{self.value:.2f}×" + ("~" if self.noisy else "")

    def percent(self) -> str:
        return f"{100 * (self.value - 1):+.1f}%" + ("~" if self.noisy else "")


def best(timings: Optional[dict]) -> Optional[dict]:
    """The CUDA-graph timing where there is one (GPU time alone), else the eager one."""
    if not timings:
        return None
    return timings.get("graph") or timings.get("eager")


def _ms(t: Optional[dict]) -> str:
    return "—" if not t else f"{t['median']:.4f} [{t['q1']:.4f}, {t['q3']:.4f}]"


def _ratio_text(r: Optional[Ratio]) -> str:
    return "—" if r is None else r.times()


def cell_text(row: dict, phase: str) -> str:
    """One layer measurement as a progress line shows it: median ms (graph if any)."""
    t = best(row[phase])
    return f"{t['median']:.4f} ms" if t else "—"


def progress(info: RunInfo, suite: str, text: str) -> None:
    """One line per measured cell, as it finishes (a full GPU run takes many minutes)."""
    if info.write_line is not None:
        done = len(RESULTS[suite])
        info.write_line(f"[{suite} {done}] {text}")


# ---- the run's context ---------------------------------------------------------------------------


def _versions(info: RunInfo) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        commit = commit + ("-dirty" if dirty else "") if commit else None
    except OSError:
        commit = None
    gpu = torch.cuda.get_device_name() if info.device == "cuda" else None
    return {
        "device": gpu or f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "mode": REDUCED_NOTE if info.reduced else "full",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
    }


def _header(meta) -> List[str]:
    return [
        f"- device: {meta['device']}",
        f"- mode: {meta['mode']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}",
        f"- date: {meta['date']}, commit: {meta['commit']}",
    ]


def stamp(meta) -> str:
    """What every image carries: device, versions, date, commit."""
    return (
        f"{meta['device']} · torch {meta['torch']} · triton {meta['triton']} · {meta['date']} · commit {meta['commit']}"
    )


# ---- the layer suite -----------------------------------------------------------------------------


def _base_rows(rows):
    return {(r["K"], r["N"], r["M"], r["r"]): r for r in rows if r["impl"] == "base"}


def layer_ratios(row: dict, base: dict) -> dict:
    """{phase: Ratio to the base layer} for "fwd" and "train"."""
    return {phase: Ratio.of(best(row[phase]), best(base.get(phase))) for phase in ("fwd", "train")}


def layer_markdown(rows) -> List[str]:
    out = [
        "| in×out | r | M | implementation | fwd ms [IQR] | fwd ×base | train ms [IQR] | train ×base | "
        "train peak MiB |",
        "|" + "---|" * 9,
    ]
    bases = _base_rows(rows)
    for row in rows:
        ratios = layer_ratios(row, bases.get((row["K"], row["N"], row["M"], row["r"]), {}))
        peak = row.get("train_peak_mb")
        out.append(
            f"| {row['K']}×{row['N']} | {row['r']} | {row['M']} | {row['impl']} | {_ms(best(row['fwd']))} | "
            f"{_ratio_text(ratios['fwd'])} | {_ms(best(row['train']))} | {_ratio_text(ratios['train'])} | "
            f"{'—' if peak is None else f'{peak:.1f}'} |"
        )
    return out


def layer_summary(rows, width: int = 100) -> List[str]:
    """× base per implementation and M, "forward/training step", one block per shape and rank."""
    bases = _base_rows(rows)
    out = []
    for K, N, r in dict.fromkeys((row["K"], row["N"], row["r"]) for row in rows):
        sub = [row for row in rows if (row["K"], row["N"], row["r"]) == (K, N, r)]
        ms = sorted({row["M"] for row in sub})
        name_w = min(28, max(len(row["impl"]) for row in sub))
        out.append(f"{K}×{N}, r={r}: × base layer, forward/training step (~: within noise)")
        out.append(" " * (name_w + 1) + "".join(f"{'M=' + str(m):>13}" for m in ms))
        for impl in dict.fromkeys(row["impl"] for row in sub if row["impl"] != "base"):
            cells = []
            for m in ms:
                row = next((x for x in sub if x["impl"] == impl and x["M"] == m), None)
                ratios = layer_ratios(row, bases.get((K, N, m, r), {})) if row else {}
                cells.append("/".join(_ratio_text(ratios.get(p)).replace("×", "") for p in ("fwd", "train")))
            out.append(f"{impl[:name_w]:<{name_w}} " + "".join(f"{c:>13}" for c in cells))
    return [line[:width] for line in out]


# ---- fused dropout and multi-adapter batches ---------------------------------------------------


def features_markdown(rows) -> List[str]:
    out = ["| case | in×out | M | r | implementation | ms [IQR] | × first row |", "|" + "---|" * 7]
    first = {}
    for row in rows:
        t = row["graph"] or row["eager"]
        first.setdefault(row["case"], t)
        out.append(
            f"| {row['case']} | {row['K']}×{row['N']} | {row['M']} | {row['r']} | {row['impl']} | {_ms(t)} | "
            f"{_ratio_text(Ratio.of(t, first[row['case']]))} |"
        )
    return out


def features_summary(rows, width: int = 100) -> List[str]:
    out, first = [], {}
    for row in rows:
        t = row["graph"] or row["eager"]
        first.setdefault(row["case"], t)
        out.append(
            f"{row['case']:<8} {row['impl'][:50]:<50} {t['median']:>10.4f} ms "
            f"{_ratio_text(Ratio.of(t, first[row['case']])):>8}"
        )
    return [line[:width] for line in out]


# ---- Table 1 ------------------------------------------------------------------------------------


def _host_table(rows):
    """{stage: {M: µs timing}} in the order the stages were measured, and the Ms."""
    table, ms = {}, []
    for row in rows:
        table.setdefault(row["stage"], {})[row["M"]] = row["us"]
        if row["M"] not in ms:
            ms.append(row["M"])
    return table, ms


def host_markdown(rows) -> List[str]:
    table, ms = _host_table(rows)
    lines = ["| stage | " + " | ".join(f"M={m} µs [q1, q3]" for m in ms) + " |", "|---|" + "---:|" * len(ms)]
    for stage, by_m in table.items():
        cells = [f"{by_m[m]['median']:.1f} [{by_m[m]['q1']:.1f}, {by_m[m]['q3']:.1f}]" if m in by_m else "" for m in ms]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return lines


def host_summary(rows, width: int = 100) -> List[str]:
    table, ms = _host_table(rows)
    lines = [
        "host µs per call, median (launches stubbed; '+… launch': Triton's launch path, driver faked)",
        f"{'':<30}" + "".join(f"{f'M={m}':>9}" for m in ms),
    ]
    for stage, by_m in table.items():
        lines.append(
            (f"{stage[:29]:<30}" + "".join(f"{by_m[m]['median']:>9.1f}" if m in by_m else " " * 9 for m in ms))[:width]
        )
    return lines


def _paper_overhead(variant, batch, seq) -> Optional[str]:
    paper = PAPER_TABLE1.get(variant)
    if not paper or (batch, seq) not in PAPER_TABLE1["columns"]:
        return None
    i = PAPER_TABLE1["columns"].index((batch, seq))
    return f"{100 * (paper[i][0] / PAPER_TABLE1[MERGED][i][0] - 1):+.1f}%"


def table1_overhead(rows, row, timing) -> Optional[Ratio]:
    merged = next(
        (
            r
            for r in rows
            if r["variant"] == MERGED and (r["dtype"], r["batch"], r["seq"]) == (row["dtype"], row["batch"], row["seq"])
        ),
        None,
    )
    if merged is None or row is merged:
        return None
    return Ratio.of(row.get(timing), merged.get(timing))


def table1_markdown(rows) -> List[str]:
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sub = [r for r in rows if r["dtype"] == dtype]
        cols = list(dict.fromkeys((r["batch"], r["seq"]) for r in sub))
        cell = {(r["variant"], r["batch"], r["seq"]): r for r in sub}
        for timing in ("eager", "graph"):
            if all(r.get(timing) is None for r in sub):
                continue
            n = next(r[timing]["n"] for r in sub if r.get(timing))
            out += [
                "",
                f"**{dtype}, {timing}**: ms, median [IQR] over {n} trials, then mean±std as the paper; "
                "overhead over the merged model from the medians (~: within noise), the paper's in brackets",
                "",
                "| variant | " + " | ".join(f"batch {b} / seq {s}" for b, s in cols) + " |",
                "|---|" + "---|" * len(cols),
            ]
            for v in dict.fromkeys(r["variant"] for r in sub):
                cells = []
                for b, s in cols:
                    r = cell.get((v, b, s))
                    t = r and r.get(timing)
                    if not t:
                        cells.append("—")
                        continue
                    text = f"{_ms(t)} · {t['mean']:.2f}±{t['std']:.2f}"
                    overhead = table1_overhead(sub, r, timing)
                    if overhead:
                        text += f" {overhead.percent()}"
                        paper = _paper_overhead(v, b, s)
                        if paper and not r.get("reduced"):
                            text += f" [{paper}]"
                    if r["params"]:
                        text += f" · Θ {_count(r['params'])}"
                    cells.append(text)
                out.append(f"| {v} | " + " | ".join(cells) + " |")
    return out


def table1_summary(rows, width: int = 100) -> List[str]:
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sub = [r for r in rows if r["dtype"] == dtype]
        timing = "graph" if any(r.get("graph") for r in sub) else "eager"
        cols = list(dict.fromkeys((r["batch"], r["seq"]) for r in sub))
        paper_note = "" if any(r.get("reduced") for r in sub) else "; paper's in brackets"
        out.append(f"Table 1, {dtype}, {timing}: overhead over the merged model (median{paper_note})")
        out.append(f"{'':<40}" + "".join(f"{f'b{b}/s{s}':>20}" for b, s in cols))
        for v in dict.fromkeys(r["variant"] for r in sub):
            if v == MERGED:
                cells = [
                    f"{r[timing]['median']:.2f} ms" if r.get(timing) else "—"
                    for b, s in cols
                    for r in sub
                    if (r["variant"], r["batch"], r["seq"]) == (v, b, s)
                ]
            else:
                cells = []
                for b, s in cols:
                    r = next((x for x in sub if (x["variant"], x["batch"], x["seq"]) == (v, b, s)), None)
                    overhead = r and table1_overhead(sub, r, timing)
                    paper = _paper_overhead(v, b, s) if r and not r.get("reduced") else None
                    cells.append((overhead.percent() if overhead else "—") + (f" [{paper}]" if paper else ""))
            out.append(f"{v[:39]:<40}" + "".join(f"{c:>20}" for c in cells))
    return [line[:width] for line in out]


def _count(n):
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


# ---- the report -----------------------------------------------------------------------------------


def report_lines(info: RunInfo) -> List[str]:
    meta = info.meta or _versions(info)
    lines = ["# lora_kernels benchmark", ""] + _header(meta)
    if info.reduced:
        lines += [
            "",
            f"**{REDUCED_NOTE}.** Small sizes on the CPU; the numbers say the benchmark runs, "
            "nothing about the kernels.",
        ]
    lines += [
        "",
        "Times: medians with the interquartile range [q1, q3]. Ratios: of medians; `~` marks a "
        "ratio whose interval (q1/q3′ … q3/q1′) includes 1, i.e. a difference the spread does not "
        "resolve.",
    ]
    if RESULTS["layer"]:
        lines += [
            "",
            "## Layer: forward and training step (forward + dX, dA, dB)",
            "",
            "Input sets rotated past L2; graph (CUDA-graph replay, GPU time only) where there is a GPU. "
            "×base = over the frozen base layer `x @ W₀ᵀ` in the same run (= merged LoRA); the "
            "training-step base computes dX only.",
            "",
        ]
        lines += layer_markdown(RESULTS["layer"])
    if RESULTS["features"]:
        lines += [
            "",
            "## Fused dropout and multi-adapter batches",
            "",
            "dropout: training step (forward + dX, dA, dB); multi: forward of one batch. "
            "× = over the first row of the same case.",
            "",
        ]
        lines += features_markdown(RESULTS["features"])
    if RESULTS["host"]:
        lines += [
            "",
            "## Host time per eager call, by stage",
            "",
            "Every Triton kernel launch stubbed, CPU tensors standing in for the GPU's "
            "(bench/test_host.py): the Python and framework time of a call before any launch. The "
            "'+Triton launch' and '+direct launch' rows add the launches' host path: Triton's own "
            "(JITFunction.run, or LORA_KERNELS_DIRECT_LAUNCH=1's direct path), with only the driver "
            "faked (tests/triton/fake_driver.py), so the driver's launch call itself is not in them. "
            "Medians over samples of 200 calls. A real measurement of this host's CPU, in a reduced "
            "run too.",
            "",
        ]
        lines += host_markdown(RESULTS["host"])
    if RESULTS["table1"]:
        lines += ["", "## The LoRA paper's Table 1: GPT-2 medium single forward pass", ""]
        if info.reduced:
            lines += [
                "REDUCED: a small GPT-2 (see bench/gpt2.py REDUCED_CONFIG) at small batch and sequence, "
                "so the run ends in minutes on a CPU. Not comparable with the paper."
            ]
        lines += table1_markdown(RESULTS["table1"])
    return lines


def summary_lines(info: RunInfo, width: int = 100) -> List[str]:
    """The end-of-run summary, one block per suite, at most ``width`` columns."""
    meta = info.meta or _versions(info)
    lines = [
        "",
        "=" * min(width, 100),
        f"lora_kernels benchmark: {meta['device']}"[:width],
        f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}, commit {meta['commit']}"[:width],
    ]
    if info.reduced:
        lines.append(REDUCED_NOTE[:width])
    for suite, summary in (
        ("layer", layer_summary),
        ("features", features_summary),
        ("table1", table1_summary),
        ("host", host_summary),
    ):
        if RESULTS[suite]:
            lines += [""] + summary(RESULTS[suite], width)
    return lines


def print_report(write_line, info: RunInfo, paths=()):
    for line in summary_lines(info):
        write_line(line)
    for p in paths:
        write_line(f"wrote {p}")


def _slug(info: RunInfo) -> str:
    """File name: the device, and the suite when only one ran (so it does not overwrite a full run)."""
    name = torch.cuda.get_device_name() if info.device == "cuda" else "cpu-reduced"
    suites = [k for k in ("layer", "table1", "features", "host") if RESULTS[k]]
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
    from plots import plot_all

    return [stem + ".json", stem + ".md"] + plot_all(RESULTS, info.meta, info.reduced, stem)
