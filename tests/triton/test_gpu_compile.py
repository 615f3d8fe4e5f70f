"""Every Triton launch the wrappers make compiles for sm_90 (H100/H200) and sm_80 (A100), no GPU needed.

Runs tests/triton/gpu_compile.py in a subprocess without TRITON_INTERPRET (the interpreter would
replace the kernels). Its table of registers, spills and shared memory per launch is printed on
failure, or always with ``pytest -s``; on sm_90 a launch whose wgmmas ptxas serializes fails.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_all_launches_compile_for_sm90_and_sm80():
    """One process per arch, side by side (the compiles are single-threaded): ptxas's log is
    checked for serialized wgmma on sm_90, shared memory and spills on both."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "gpu_compile.py")
    jobs = {
        arch: subprocess.Popen(
            [sys.executable, script, "--quick", "--arch", arch],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for arch in ("90", "80")
    }
    for arch, job in jobs.items():
        out, err = job.communicate(timeout=1800)
        print(out[-20000:])
        assert job.returncode == 0, f"sm_{arch}:\n" + out[-5000:] + err[-5000:]
        assert out.count("\nok ") + out.startswith("ok ") >= 60, f"sm_{arch}:\n" + out[-5000:]
