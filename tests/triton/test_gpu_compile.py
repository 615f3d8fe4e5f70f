"""Every Triton launch the wrappers make compiles for sm_90 (H100/H200) and sm_80 (A100), no GPU needed.

Runs tests/triton/gpu_compile.py in a subprocess without TRITON_INTERPRET (the interpreter would
replace the kernels). Its table of registers, spills and shared memory per launch is printed on
failure, or always with ``pytest -s``; on sm_90 a launch whose wgmmas ptxas serializes fails.
"""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

_compiles = {}


def start_compiles() -> dict:
    """Start the compiles, once per session: one process per arch, side by side (each compile is
    single-threaded), with their output in files. tests/conftest.py calls this as soon as the test
    is collected, so that these minutes of compiling overlap the tests that run before it."""
    if not _compiles:
        work = Path(tempfile.mkdtemp(prefix="gpu_compile-"))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        script = os.path.join(os.path.dirname(__file__), "gpu_compile.py")
        jobs = {}
        for arch in ("90", "80"):
            sass = ["--sass-dir", str(work / "sass")] if arch == "90" else []
            with open(work / f"sm_{arch}.out", "w") as out, open(work / f"sm_{arch}.err", "w") as err:
                cmd = [sys.executable, script, "--quick", "--arch", arch, *sass]
                jobs[arch] = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        _compiles.update(work=work, jobs=jobs)
        atexit.register(stop_compiles)  # the session may end without running the test (-x, ^C)
    return _compiles


def stop_compiles():
    for job in _compiles.get("jobs", {}).values():
        job.kill()
        job.wait()
    shutil.rmtree(_compiles.get("work", ""), ignore_errors=True)


def test_all_launches_compile_for_sm90_and_sm80():
    """ptxas's log is checked for serialized wgmma on sm_90, shared memory and spills on both.
    sm_90 also writes every launch's SASS and compiler input (--sass-dir, what
    scripts/sass_diff.py compares)."""
    compiles = start_compiles()
    work, compiled = compiles["work"], {}
    for arch, job in compiles["jobs"].items():
        job.wait(timeout=1800)
        out, err = (work / f"sm_{arch}.out").read_text(), (work / f"sm_{arch}.err").read_text()
        print(out[-20000:])
        assert job.returncode == 0, f"sm_{arch}:\n" + out[-5000:] + err[-5000:]
        compiled[arch] = out.count("\nok ") + out.startswith("ok ")
        assert compiled[arch] >= 60, f"sm_{arch}:\n" + out[-5000:]
    sass_dir = work / "sass"
    index = json.loads((sass_dir / "index.json").read_text())
    launches = index["launches"]
    assert len(launches) == compiled["90"] and index["inputs"].keys() == launches.keys()
    for name in index["inputs"].values():  # Triton IR without source locations, then the options
        text = (sass_dir / name).read_text()
        assert "tt.func public" in text and "loc(" not in text and '"num_warps"' in text, text[:300]
    for name in launches.values():  # instructions, one a line, without addresses or encodings
        sass = (sass_dir / name).read_text().splitlines()
        assert len(sass) > 100 and "EXIT" in sass and not any("/*" in line for line in sass), sass[:5]
