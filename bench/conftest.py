"""`pytest bench`: options, the run's context (GPU or reduced CPU run), and the report at the end.

pytest bench                                   # everything, sizes from the issue (reduced on CPU)
pytest bench --suite table1 --trials 20        # only the paper's Table 1, fewer trials
pytest bench --suite layer --shapes 4096x4096 --m 1,1024 --ranks 16 --impls base,peft-style,lora_kernels[auto]
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from report import RESULTS, RunInfo, print_report, write_report

FULL = dict(
    shapes="4096x4096,4096x11008,11008x4096",
    m="1,16,128,1024,8192",
    ranks="16,64",
    dtype="bf16",
    reps=100,
    trials=100,
    table1_dtypes="fp16,fp32",
)
REDUCED = dict(
    shapes="256x256,256x704,704x256", m="1,16,128", ranks="16", dtype="fp32", reps=20, trials=10, table1_dtypes="fp32"
)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RESULTS_DIR = Path(__file__).resolve().parent / "results"  # in the checkout, wherever pytest runs from


def pytest_addoption(parser):
    g = parser.getgroup("lora_kernels bench")
    g.addoption("--suite", default="all", choices=["all", *RESULTS], help="which suites to run")
    g.addoption("--shapes", default=None, help="layer shapes IN x OUT, comma-separated (e.g. 4096x4096,4096x11008)")
    g.addoption("--m", default=None, help="rows of x for the layer suite, comma-separated")
    g.addoption("--ranks", default=None, help="LoRA ranks for the layer suite, comma-separated")
    g.addoption("--dtype", default=None, choices=sorted(DTYPES), help="layer-suite dtype")
    g.addoption("--impls", default=None, help="layer-suite implementations to run, comma-separated (default: all)")
    g.addoption("--reps", type=int, default=None, help="timed calls per layer measurement")
    g.addoption("--trials", type=int, default=None, help="forward passes per Table 1 cell (the paper: 100)")
    g.addoption("--table1-dtypes", default=None, help="Table 1 dtypes, comma-separated (fp16,fp32)")
    g.addoption("--results-dir", default=str(RESULTS_DIR), help="where the md/json/png go (default: bench/results/)")
    g.addoption(
        "--benchmark-table",
        action="store_true",
        help="also print pytest-benchmark's own table (its numbers are always in its JSON)",
    )


def _csv(text, cast=str):
    return [cast(t.strip()) for t in text.split(",") if t.strip()]


def _write_line(config):
    """A function that writes one line to the terminal now, past pytest's output capture."""
    capture = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")

    def write(line):
        if reporter is None:
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)

    return write


@pytest.hookimpl(trylast=True)  # after pytest-benchmark made its session
def pytest_configure(config):
    """pytest-benchmark's own table goes to its JSON in the results folder, printed only with
    --benchmark-table: the run ends with the package's summary instead."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or config.getoption("benchmark_table"):
        return
    if session.json is None and config.getoption("suite") in ("all", "layer"):  # the suite that feeds it
        os.makedirs(config.getoption("results_dir"), exist_ok=True)
        session.json = Path(config.getoption("results_dir")) / "pytest-benchmark.json"
    session.display = lambda terminalreporter: None


def run_info(config) -> RunInfo:
    if not hasattr(config, "_lora_bench_info"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        base = FULL if device == "cuda" else REDUCED
        opt = lambda name: config.getoption(name) if config.getoption(name) is not None else base[name]  # noqa: E731
        config._lora_bench_info = RunInfo(
            device=device,
            reduced=device != "cuda",
            shapes=[tuple(int(v) for v in s.lower().split("x")) for s in _csv(opt("shapes"))],
            ms=_csv(opt("m"), int),
            ranks=_csv(opt("ranks"), int),
            dtype=DTYPES[opt("dtype")],
            impls=_csv(config.getoption("impls")) if config.getoption("impls") else None,
            reps=opt("reps"),
            trials=opt("trials"),
            table1_dtypes=[DTYPES[d] for d in _csv(opt("table1_dtypes"))],
            results_dir=config.getoption("results_dir"),
            write_line=_write_line(config),
        )
    return config._lora_bench_info


@pytest.fixture(scope="session")
def info(request):
    return run_info(request.config)


def pytest_collection_modifyitems(config, items):
    suite = config.getoption("suite")
    if suite != "all":
        keep = [it for it in items if f"test_{suite}" in it.nodeid]
        config.hook.pytest_deselected(items=[it for it in items if it not in keep])
        items[:] = keep


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table, so ours ends the output
def pytest_terminal_summary(terminalreporter, config):
    if any(RESULTS.values()):
        print_report(terminalreporter.write_line, run_info(config), getattr(config, "_lora_bench_written", []))


def pytest_sessionfinish(session):
    if any(RESULTS.values()):
        paths = write_report(run_info(session.config))
        session.config._lora_bench_written = paths
