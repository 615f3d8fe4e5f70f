"""What ptxas reports about the CUDA kernels, checked without a GPU.

Two properties that no CPU emulation or correctness test can see, and that cost speed silently:
- no register spills in any kernel;
- no serialized wgmma. ptxas reports "wgmma.mma_async instructions are serialized due to ..."
  (C7515: other instructions define the accumulators while a wgmma may be in flight; C7518: a
  wait it has to insert on a conditional path) and then makes every wgmma wait for the previous
  one. Two earlier versions of csrc/lora_wgmma.cu did that in every kernel instance: their
  accumulators were zeroed before the K loop (C7515), then at its first tile (C7518).

The kernel sources (CUDA headers only) are compiled with nvcc for sm_80 and sm_90a, as setup.py's
default arch list does, and ptxas's --resource-usage report is read.
"""

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNEL_SOURCES = ["lora_wgmma.cu", "lora_tensor_core.cu", "lora_decode.cu", "lora_gemm.cu", "lora_dropout.cu"]


def nvcc():
    # CUDA_HOME's nvcc: /usr/local/bin/nvcc may be a wrapper
    path = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(path) if path.exists() else shutil.which("nvcc")


@pytest.fixture(scope="module")
def ptxas_reports():
    """{source: ptxas's report}, the sources compiled in parallel."""
    compiler = nvcc()
    if compiler is None:
        pytest.skip("needs nvcc (CUDA_HOME)")
    with tempfile.TemporaryDirectory() as out:
        jobs = {}
        for source in KERNEL_SOURCES:
            cmd = [
                compiler,
                "-O3",
                "-std=c++17",
                "-DLORA_KERNELS_HAS_SM90A",
                "--resource-usage",
                "-gencode",
                "arch=compute_80,code=sm_80",
                "-gencode",
                "arch=compute_90a,code=sm_90a",
                "-c",
                str(ROOT / "csrc" / source),
                "-o",
                str(Path(out) / f"{source}.o"),
            ]
            jobs[source] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        reports = {}
        for source, job in jobs.items():
            text, _ = job.communicate()
            assert job.returncode == 0, f"nvcc {source}:\n{text[-3000:]}"
            reports[source] = text
    return reports


def functions_with(report, pattern):
    """Kernels (mangled names) whose properties line in the report matches ``pattern``."""
    found, current = [], None
    for line in report.splitlines():
        name = re.search(r"Function properties for (\S+)", line)
        if name:
            current = name.group(1)
        elif current and re.search(pattern, line):
            found.append(current)
    return found


@pytest.mark.parametrize("source", KERNEL_SOURCES)
def test_no_register_spills(ptxas_reports, source):
    report = ptxas_reports[source]
    assert "Function properties for" in report, report[-2000:]
    spilling = functions_with(report, r"[1-9]\d* bytes spill (stores|loads)")
    assert not spilling, f"{source}: kernels that spill registers: {spilling}"


def test_no_serialized_wgmma(ptxas_reports):
    report = ptxas_reports["lora_wgmma.cu"]
    assert re.search(r"Compiling entry function '\S*wgmma_gemm_producer\S*' for 'sm_90a'", report), report[-2000:]
    serialized = re.findall(r"wgmma\.mma_async instructions are serialized.*in the function '(\S+)'", report)
    assert not serialized, f"ptxas serializes the wgmmas of: {serialized}"
