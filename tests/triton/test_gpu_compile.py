"""Every Triton launch the wrappers make compiles for sm_90 (H100/H200) and sm_80 (A100), no GPU needed.

Runs tests/triton/gpu_compile.py in a subprocess without TRITON_INTERPRET (the interpreter would
replace the kernels). Its table of registers, spills and shared memory per launch is printed on
failure, or always with ``pytest -s``; on sm_90 a launch whose wgmmas ptxas serializes fails.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_all_launches_compile_for_sm90_and_sm80(tmp_path):
    """One process per arch, side by side (the compiles are single-threaded): ptxas's log is
    checked for serialized wgmma on sm_90, shared memory and spills on both. sm_90 also writes
    every launch's SASS and compiler input (--sass-dir, what scripts/sass_diff.py compares)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "gpu_compile.py")
    jobs = {
        arch: subprocess.Popen(
            [
                sys.executable,
                script,
                "--quick",
                "--arch",
                arch,
                *(["--sass-dir", str(tmp_path)] if arch == "90" else []),
            ],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for arch in ("90", "80")
    }
    compiled = {}
    for arch, job in jobs.items():
        out, err = job.communicate(timeout=1800)
        print(out[-20000:])
        assert job.returncode == 0, f"sm_{arch}:\n" + out[-5000:] + err[-5000:]
        compiled[arch] = out.count("\nok ") + out.startswith("ok ")
        assert compiled[arch] >= 60, f"sm_{arch}:\n" + out[-5000:]
    index = json.loads((tmp_path / "index.json").read_text())
    launches = index["launches"]
    assert len(launches) == compiled["90"] and index["inputs"].keys() == launches.keys()
    for name in index["inputs"].values():  # Triton IR without source locations, then the options
        text = (tmp_path / name).read_text()
        assert "tt.func public" in text and "loc(" not in text and '"num_warps"' in text, text[:300]
    for name in launches.values():  # instructions, one a line, without addresses or encodings
        sass = (tmp_path / name).read_text().splitlines()
        assert len(sass) > 100 and "EXIT" in sass and not any("/*" in line for line in sass), sass[:5]
