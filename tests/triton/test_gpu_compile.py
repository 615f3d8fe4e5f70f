"""Every Triton launch the wrappers make compiles for sm_90 (H100/H200) and sm_80 (A100), no GPU needed.

Runs tests/triton/gpu_compile.py in a subprocess without TRITON_INTERPRET (the interpreter would
replace the kernels). Its table of registers, spills and shared memory per launch is printed on
failure, or always with ``pytest -s``.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_all_launches_compile_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "gpu_compile.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--arch", "90", "--arch", "80"], env=env,
                          capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-20000:])
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert proc.stdout.count("\nok ") + proc.stdout.startswith("ok ") >= 60
