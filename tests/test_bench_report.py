"""The benchmark's report on synthetic results: its statistics (ratios of medians with an interval,
noise flagged), the summary's width, and the images it writes."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import report  # noqa: E402
from report import Ratio, RunInfo  # noqa: E402


def timing(median, spread):
    return dict(median=median, q1=median - spread, q3=median + spread, mean=median, std=spread, n=50)


def test_ratio_of_medians_with_its_interval_and_noise():
    clear = Ratio.of(timing(1.5, 0.01), timing(1.0, 0.01))
    assert clear.value == pytest.approx(1.5) and clear.lo < 1.5 < clear.hi and not clear.noisy
    assert clear.times() == "1.50×" and clear.percent() == "+50.0%"
    noisy = Ratio.of(timing(1.02, 0.1), timing(1.0, 0.1))  # the spread exceeds the 2% it shows
    assert noisy.noisy and noisy.times() == "1.02×~" and noisy.percent().endswith("~")
    assert Ratio.of(None, timing(1.0, 0.1)) is None


def layer_rows():
    rows = []
    for M in (1, 16, 128):
        for impl, f in (("base", 1.0), ("peft", 1.8), ("lora_kernels[triton]", 1.1)):
            rows.append(
                dict(
                    K=64,
                    N=64,
                    M=M,
                    r=16,
                    impl=impl,
                    dtype="bfloat16",
                    n_input_sets=2,
                    fwd=dict(eager=timing(f * M, 0.01 * M), graph=timing(f * M * 0.5, 0.002 * M)),
                    train=dict(eager=timing(2 * f * M, 0.02 * M), graph=None),
                    train_peak_mb=10.0 * M,
                )
            )
    return rows


def table1_rows():
    rows = []
    for variant, f in ((report.MERGED, 1.0), ("AdapterL", 1.3), ("LoRA r=4 Wq,Wv: lora_kernels (auto)", 1.01)):
        for batch, seq in ((32, 512), (1, 128)):
            rows.append(
                dict(
                    dtype="float16",
                    variant=variant,
                    batch=batch,
                    seq=seq,
                    params=0 if f == 1 else 5e5,
                    eager=timing(10 * f, 0.5),
                    graph=None,
                    reduced=False,
                )
            )
    return rows


@pytest.fixture
def results(monkeypatch, tmp_path):
    results = {
        "layer": layer_rows(),
        "table1": table1_rows(),
        "features": [
            dict(case="dropout", impl="p=0", K=64, N=64, M=16, r=16, eager=timing(1.0, 0.01), graph=None),
            dict(case="dropout", impl="p=0.1", K=64, N=64, M=16, r=16, eager=timing(1.2, 0.01), graph=None),
        ],
        "host": [
            dict(stage=stage, M=M, K=64, N=64, r=16, us=timing(us * M, 0.1))
            for M in (1, 32)
            for stage, us in (("prepare_args", 4.0), ("training: lora_linear with a long name", 300.0))
        ],
    }
    monkeypatch.setattr(report, "RESULTS", results)
    info = RunInfo(
        device="cpu",
        reduced=True,
        shapes=[(64, 64)],
        ms=[1, 16, 128],
        ranks=[16],
        dtype=torch.bfloat16,
        impls=None,
        reps=5,
        trials=5,
        table1_dtypes=[torch.float16],
        results_dir=str(tmp_path),
    )
    info.meta = dict(device="synthetic", mode="test", torch="x", triton="y", cuda=None, date="today", commit="c0ffee")
    return results, info


def test_tables_use_graph_timings_and_flag_noise(results):
    _, info = results
    md = "\n".join(report.report_lines(info))
    assert "| 64×64 | 16 | 16 | peft | 14.4000 [14.3680, 14.4320] | 1.80× |" in md  # graph medians, ×base
    assert report.REDUCED_NOTE in md
    table1 = "\n".join(report.table1_markdown(report.RESULTS["table1"]))
    assert "+30.0%" in table1 and "+1.0%~" in table1  # AdapterL resolved, LoRA's 1% within the spread
    assert "[+2.2%]" in table1  # the paper's AdapterL overhead at batch 32 / seq 512


def test_summary_fits_100_columns(results):
    _, info = results
    lines = report.summary_lines(info)
    assert max(len(line) for line in lines) <= 100
    text = "\n".join(lines)
    assert "1.80/1.80" in text and "1.10/1.10" in text and "Table 1, float16" in text
    assert "prepare_args                        4.0    128.0" in text  # host µs per call at M = 1 and 32, aligned


def test_images_are_written_with_their_stamp(results):
    pytest.importorskip("matplotlib")
    _, info = results
    paths = report.write_report(info)
    names = sorted(Path(p).name for p in paths)
    assert names == [
        "cpu-reduced-layer.png",
        "cpu-reduced-memory.png",
        "cpu-reduced-table1.png",
        "cpu-reduced.json",
        "cpu-reduced.md",
    ]
    assert all(Path(p).stat().st_size > 10_000 for p in paths if p.endswith(".png"))


def test_ratios_plotted_are_the_tables(results, monkeypatch):
    """The layer image draws, per implementation, the same ratios the table prints."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes
    import plots

    drawn = []
    real = matplotlib.axes.Axes.errorbar

    def record(self, x, y, *args, label=None, **kwargs):
        drawn.append((label, list(x), list(y)))
        return real(self, x, y, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", record)
    rows, info = results[0]["layer"], results[1]
    plots.plot_layer_ratios(rows, info.meta, True, str(Path(info.results_dir) / "layer.png"))
    # one panel: the forward's lines, then the training step's
    assert [label for label, _, _ in drawn] == ["peft", "lora_kernels[triton]"] * 2
    assert all(x == [1, 16, 128] for _, x, _ in drawn)
    assert drawn[0][2] == pytest.approx([1.8] * 3) and drawn[3][2] == pytest.approx([1.1] * 3)
