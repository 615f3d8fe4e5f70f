"""What ptxas reports about the CUDA kernels, checked without a GPU.

Two properties that no CPU emulation or correctness test can see, and that cost speed silently:
- no register spills in any kernel;
- no serialized wgmma. ptxas reports "wgmma.mma_async instructions are serialized due to ..."
  (C7515: other instructions define the accumulators while a wgmma may be in flight; C7518: a
  wait it has to insert on a conditional path) and then makes every wgmma wait for the previous
  one. Two earlier versions of csrc/lora_wgmma.cu did that in every kernel instance: their
  accumulators were zeroed before the K loop (C7515), then at its first tile (C7518).

ptxas's --resource-usage report for each kernel source, compiled for sm_80 and sm_90a (setup.py's
default arch list), is read from the log of the editable build that `make install` keeps
(build/extension-build.log: the extension under test, as built), for every source compiled there
for both archs since the last change to csrc/; the others are compiled here with nvcc.
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


BUILD_LOG = ROOT / "build" / "extension-build.log"
ARCH_FLAGS = ("code=sm_80", "code=sm_90a", "-DLORA_KERNELS_HAS_SM90A", "--resource-usage")


def reports_from_build_log():
    """{source: ptxas's report} from the build log, for the sources its nvcc commands compiled with
    ARCH_FLAGS; {} if the log is missing or older than a file of csrc/ (then it may not describe them).
    ninja prints each command (``[k/n] nvcc ... .../csrc/lora_wgmma.cu ...``) before its output."""
    if not BUILD_LOG.exists():
        return {}
    if BUILD_LOG.stat().st_mtime < max(p.stat().st_mtime for p in (ROOT / "csrc").iterdir()):
        return {}
    reports, current = {}, None
    for line in BUILD_LOG.read_text(errors="replace").splitlines():
        command = re.match(r"\s*\[\d+/\d+\] (.*)", line)
        if command:
            name = next((Path(token).name for token in command.group(1).split() if token.endswith(".cu")), None)
            complete = all(flag in command.group(1) for flag in ARCH_FLAGS)
            current = name if name in KERNEL_SOURCES and complete else None
            if current:
                reports[current] = ""
        elif current:
            reports[current] += line + "\n"
    return {source: text for source, text in reports.items() if "Function properties for" in text}


@pytest.fixture(scope="module")
def ptxas_reports():
    """{source: ptxas's report}: from the build log, the others compiled here, in parallel."""
    reports = reports_from_build_log()
    missing = [source for source in KERNEL_SOURCES if source not in reports]
    if not missing:
        return reports
    compiler = nvcc()
    if compiler is None:
        pytest.skip("needs nvcc (CUDA_HOME)")
    with tempfile.TemporaryDirectory() as out:
        jobs = {}
        for source in missing:
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


def test_build_log_is_read_per_command_and_only_for_both_archs(tmp_path, monkeypatch):
    """The build-log reader: each nvcc command's report goes to its own source, and a command without
    both archs (or without --resource-usage) gives none (that source is compiled here instead)."""
    both = "-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a -DLORA_KERNELS_HAS_SM90A"
    log = tmp_path / "extension-build.log"
    log.write_text(
        f"  [1/3] /usr/local/cuda/bin/nvcc -c -c /src/csrc/lora_gemm.cu -o gemm.o --resource-usage {both}\n"
        "  ptxas info    : Function properties for gemm_kernel\n"
        "      8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        f"  [2/3] /usr/local/cuda/bin/nvcc -c /src/csrc/lora_dropout.cu -o dropout.o --resource-usage "
        "-gencode=arch=compute_80,code=sm_80 -DLORA_KERNELS_HAS_SM90A\n"
        "  ptxas info    : Function properties for dropout_kernel\n"
        "  [3/3] c++ -c /src/csrc/bindings.cpp -o bindings.o\n"
    )
    monkeypatch.setitem(globals(), "BUILD_LOG", log)  # the reader looks it up in this module
    reports = reports_from_build_log()
    assert list(reports) == ["lora_gemm.cu"]
    assert functions_with(reports["lora_gemm.cu"], r"[1-9]\d* bytes spill (stores|loads)") == ["gemm_kernel"]
