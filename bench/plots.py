"""The benchmark's images: what a person would rather look at than read.

- ``<stem>-layer.png``: per shape and rank, the ratio to the base layer (x @ W₀ᵀ) against M, forward
  and training step, one line per implementation, the 1.0 line marked, IQR intervals as bars.
- ``<stem>-memory.png``: peak memory of the training step against M (GPU runs only).
- ``<stem>-table1.png``: the LoRA paper's Table 1, latency per variant and setting (median, IQR bars),
  our overhead over the merged model beside the paper's.
Every image carries the device, versions, date and commit, and the reduced-run note where it applies.
"""

from __future__ import annotations

from typing import List

from report import MERGED, REDUCED_NOTE, Ratio, _base_rows, _paper_overhead, layer_ratios, stamp, table1_overhead


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _finish(fig, meta, reduced, title, path) -> str:
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.005, stamp(meta), ha="center", va="bottom", fontsize=7, color="0.35")
    if reduced:
        fig.text(
            0.5,
            0.5,
            REDUCED_NOTE,
            ha="center",
            va="center",
            fontsize=13,
            color="red",
            alpha=0.35,
            rotation=20,
            transform=fig.transFigure,
        )
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_layer_ratios(rows, meta, reduced, path) -> str:
    plt = _pyplot()
    panels = list(dict.fromkeys((r["K"], r["N"], r["r"]) for r in rows))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 7.2), squeeze=False)
    bases = _base_rows(rows)
    timing = "CUDA-graph replay" if any(r["fwd"].get("graph") for r in rows) else "eager"
    for col, (K, N, r) in enumerate(panels):
        sub = [row for row in rows if (row["K"], row["N"], row["r"]) == (K, N, r)]
        for phase_i, phase in enumerate(("fwd", "train")):
            ax = axes[phase_i][col]
            ax.axhline(1.0, color="black", lw=1.2, ls="--", label="base x @ W₀ᵀ (1.0)")
            for impl in dict.fromkeys(row["impl"] for row in sub if row["impl"] != "base"):
                pts = []
                for row in sorted((x for x in sub if x["impl"] == impl), key=lambda x: x["M"]):
                    ratio = layer_ratios(row, bases.get((K, N, row["M"], r), {}))[phase]
                    if ratio is not None:
                        pts.append((row["M"], ratio))
                if not pts:
                    continue
                ms = [m for m, _ in pts]
                values = [q.value for _, q in pts]
                err = [[q.value - q.lo for _, q in pts], [q.hi - q.value for _, q in pts]]
                ax.errorbar(ms, values, yerr=err, marker="o", ms=4, capsize=2, lw=1.3, label=impl)
            ax.set_xscale("log", base=2)
            ms_all = sorted({row["M"] for row in sub})
            ax.set_xticks(ms_all, [str(m) for m in ms_all])
            ax.minorticks_off()
            ax.set_title(f"{'forward' if phase == 'fwd' else 'training step'}: in={K} out={N} r={r}", fontsize=9)
            ax.set_xlabel("M (rows of x)")
            ax.grid(alpha=0.3)
        axes[0][col].set_ylabel(f"× base layer ({timing})")
        axes[1][col].set_ylabel(f"× base layer ({timing})")
    axes[0][-1].legend(fontsize=7)
    return _finish(
        fig, meta, reduced, "lora_kernels: one LoRA layer over the frozen base layer (lower is better)", path
    )


def plot_memory(rows, meta, reduced, path) -> str:
    plt = _pyplot()
    panels = list(dict.fromkeys((r["K"], r["N"], r["r"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (K, N, r) in zip(axes[0], panels):
        sub = [row for row in rows if (row["K"], row["N"], row["r"]) == (K, N, r)]
        for impl in dict.fromkeys(row["impl"] for row in sub):
            pts = sorted(
                (row["M"], row["train_peak_mb"])
                for row in sub
                if row["impl"] == impl and row.get("train_peak_mb") is not None
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=impl)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="M (rows of x)",
            ylabel="training step peak MiB",
            title=f"in={K} out={N} r={r}",
        )
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    return _finish(fig, meta, reduced, "lora_kernels: peak memory of one training step", path)


def plot_table1(rows, meta, reduced, path) -> str:
    plt = _pyplot()
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    cols = list(dict.fromkeys((r["batch"], r["seq"]) for r in rows))
    fig, axes = plt.subplots(len(dtypes), len(cols), figsize=(4.8 * len(cols), 3.9 * len(dtypes)), squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, (b, s) in enumerate(cols):
            ax = axes[i][j]
            sub = [r for r in rows if r["dtype"] == dtype and (r["batch"], r["seq"]) == (b, s)]
            timing = "graph" if any(r.get("graph") for r in sub) else "eager"
            sub = [r for r in sub if r.get(timing)]
            medians = [r[timing]["median"] for r in sub]
            err = [
                [r[timing]["median"] - r[timing]["q1"] for r in sub],
                [r[timing]["q3"] - r[timing]["median"] for r in sub],
            ]
            bars = ax.bar(
                range(len(sub)),
                medians,
                yerr=err,
                capsize=3,
                color=["0.6" if r["variant"] == MERGED else f"C{k}" for k, r in enumerate(sub)],
            )
            for bar, r in zip(bars, sub):
                overhead = table1_overhead(sub, r, timing)
                paper = _paper_overhead(r["variant"], b, s) if not r.get("reduced") else None
                label = (overhead.percent() if isinstance(overhead, Ratio) else "") + (
                    f"\n[paper {paper}]" if paper else ""
                )
                ax.annotate(
                    label,
                    (bar.get_x() + bar.get_width() / 2, r[timing]["q3"]),
                    ha="center",
                    va="bottom",
                    fontsize=6.5,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
            ax.set_xticks(
                range(len(sub)), [r["variant"].replace(": ", ":\n") for r in sub], rotation=35, ha="right", fontsize=6.5
            )
            ax.set_title(f"{dtype}, batch {b} / seq {s} ({timing})", fontsize=9)
            ax.set_ylabel("ms (median, IQR)")
            ax.grid(axis="y", alpha=0.3)
    return _finish(fig, meta, reduced, "The LoRA paper's Table 1: one GPT-2 medium forward pass", path)


def plot_all(results, meta, reduced, stem) -> List[str]:
    """Write every image the results allow; returns their paths (none without matplotlib)."""
    if _pyplot() is None:
        return []
    paths = []
    if results["layer"]:
        paths.append(plot_layer_ratios(results["layer"], meta, reduced, stem + "-layer.png"))
        if any(r.get("train_peak_mb") is not None for r in results["layer"]):
            paths.append(plot_memory(results["layer"], meta, reduced, stem + "-memory.png"))
    if results["table1"]:
        paths.append(plot_table1(results["table1"], meta, reduced, stem + "-table1.png"))
    return paths
