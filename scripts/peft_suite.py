"""PEFT's own LoRA tests, run unpatched and with every PEFT model switched by lora_kernels.patch_peft:
every test that passes unpatched must pass patched (`make test-peft`; CI runs it).

The test suite comes from PEFT's source archive on the package registry, for the installed PEFT
version (cached in .peft-suite/). Tests that need the hub fail at once in both runs
(tests/peft_suite/no_network.py). The unpatched run's outcome depends only on PEFT, transformers
and torch; it is read from tests/peft_suite/baseline-*.json when one exists for these versions
(write one with --write-baseline), else run here. The patched runs check every fused forward call
against PEFT's own forward (tests/peft_suite/lora_kernels_patch.py):

    python scripts/peft_suite.py                       # reference backend on all files, Triton on one
    python scripts/peft_suite.py --triton-full         # Triton on test_custom_models.py too
    python scripts/peft_suite.py --write-baseline      # run unpatched and store the baseline
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "tests" / "peft_suite"
CACHE = ROOT / ".peft-suite"

# PEFT's test files on LoRA, its mixed batches, merging, save/load, low-level API and target
# parameters, with the -k selection that keeps their LoRA tests ("" for the whole file).
FILES = {
    "test_custom_models.py": "lora or LoRA",
    "test_tuners_utils.py": "",
    "test_low_level_api.py": "",
    "test_target_parameters.py": "",
    "test_mixed.py": "",
    "test_other.py": "",
    "test_lora_variants.py": "",
    "test_lorafa.py": "",
    "test_loraplus.py": "",
    "test_lora_conversion.py": "",
    "test_config.py": "lora or LoRA",
    "test_initialization.py": "lora or LoRA",
}
# The Triton kernels under the interpreter: the mixed-batch file (~15 s; what CI runs), and with
# --triton-full also the file with the most fused calls (~3.5 min more on the 2-core CI machine).
TRITON_FILES = {"test_mixed.py": ""}
TRITON_FILES_FULL = {"test_custom_models.py": "lora or LoRA", "test_mixed.py": ""}


def versions() -> dict:
    import peft
    import torch
    import transformers

    return {"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__}


def suite_dir(peft_version: str) -> Path:
    """PEFT's source tree of this version, with its tests importable as a package."""
    target = CACHE / f"peft-{peft_version}"
    if not (target / "tests").is_dir():
        CACHE.mkdir(exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-binary",
                ":all:",
                "--no-deps",
                f"peft=={peft_version}",
                "-d",
                str(CACHE),
            ],
            check=True,
        )
        with tarfile.open(CACHE / f"peft-{peft_version}.tar.gz") as archive:
            archive.extractall(CACHE, filter="data")
    (target / "tests" / "__init__.py").touch()  # PEFT's tests import each other relatively
    return target


def test_id(classname: str, name: str, files: list) -> str:
    """A JUnit test case's id as the baselines store it: file::class::test, where the class of a
    module-level test is its module (classname "tests.test_other.TestX" or "tests.test_other")."""
    module = classname.split(".")[1]
    if f"{module}.py" not in files:
        raise RuntimeError(f"test case {classname}::{name} is from none of {files}")
    return f"{module}.py::{classname.rsplit('.', 1)[-1]}::{name}"


def run(source: Path, name: str, files: dict, patched: bool, backend: str = "reference") -> dict:
    """Run the files; returns {test id: "passed" | "failed" | "skipped"} and the plugin's report."""
    junit, report = CACHE / f"{name}.xml", CACHE / f"{name}-report.json"
    env = {
        **os.environ,
        "PYTHONPATH": f"{PLUGINS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "LORA_KERNELS_PEFT_BACKEND": backend,
        "LORA_KERNELS_PEFT_CHECK": "1",
        "LORA_KERNELS_PEFT_REPORT": str(report),
    }
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    # One pytest process per selection expression, not per file: each start imports torch,
    # transformers and PEFT (~9 s on the CI machine), and PEFT's own CI runs its files together too.
    groups = {}
    for file, select in files.items():
        groups.setdefault(select, []).append(file)
    outcomes = {}
    start = time.time()
    for select, group in groups.items():
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            *(f"tests/{file}" for file in group),
            "-q",
            "-o",
            "addopts=",
            "-p",
            "no:cacheprovider",
            "-p",
            "no_network",
            "--tb=no",
            "-rN",
            f"--junitxml={junit}",
            "-W",
            "ignore",
        ]
        cmd += ["-p", "lora_kernels_patch"] if patched else []
        cmd += ["-k", select] if select else []
        proc = subprocess.run(cmd, cwd=source, env=env, capture_output=True, text=True)
        if proc.returncode not in (0, 1, 5):  # 5: nothing selected; anything else: the run itself broke
            files_run = " ".join(group)
            raise RuntimeError(
                f"{name}: pytest {files_run} exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
            )
        for case in ET.parse(junit).iter("testcase"):
            tags = {child.tag for child in case}
            outcome = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
            outcomes[test_id(case.get("classname"), case.get("name"), group)] = outcome
        summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "?"
        print(f"  {name}: {', '.join(group)}: {summary}", flush=True)
        if patched and report.exists():
            stats = json.loads(report.read_text())
            for key in ("fused_calls", "checked_calls"):
                run.totals[name][key] = run.totals[name].get(key, 0) + stats[key]
            run.totals[name]["max_rel_diff"] = max(run.totals[name].get("max_rel_diff", 0.0), stats["max_rel_diff"])
    print(f"  {name}: {time.time() - start:.0f} s", flush=True)
    return outcomes


run.totals = {}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-baseline", action="store_true", help="run unpatched and store the baseline")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton-interpreter run")
    parser.add_argument("--triton-full", action="store_true", help="the Triton run on test_custom_models.py too")
    args = parser.parse_args()
    ver = versions()
    source = suite_dir(ver["peft"])
    baseline_file = PLUGINS / f"baseline-peft{ver['peft']}-transformers{ver['transformers']}-torch{ver['torch']}.json"
    if args.write_baseline or not baseline_file.exists():
        print(f"unpatched run (no baseline for {ver})", flush=True)
        unpatched = run(source, "unpatched", FILES, patched=False)
        data = {
            "versions": ver,
            "files": FILES,
            "not_passed": {t: o for t, o in sorted(unpatched.items()) if o != "passed"},
            "passed": sum(o == "passed" for o in unpatched.values()),
        }
        (baseline_file if args.write_baseline else CACHE / baseline_file.name).write_text(json.dumps(data, indent=0))
    else:
        data = json.loads(baseline_file.read_text())
        if data["files"] != FILES:
            sys.exit(f"{baseline_file.name} was written for other files; rerun with --write-baseline")
    baseline = data["not_passed"]
    print(f"baseline: {data['passed']} passed unpatched ({ver})", flush=True)
    failures = []
    runs = [("patched-reference", FILES, "reference")]
    if not args.no_triton:
        runs.append(("patched-triton", TRITON_FILES_FULL if args.triton_full else TRITON_FILES, "triton"))
    for name, files, backend in runs:
        run.totals[name] = {}
        outcomes = run(source, name, files, patched=True, backend=backend)
        # a test that passed unpatched (not in the baseline's list) must pass patched
        broken = sorted(t for t, o in outcomes.items() if o != "passed" and t not in baseline)
        passed = sum(o == "passed" for o in outcomes.values())
        totals = run.totals[name]
        print(
            f"{name}: {passed} passed; {len(broken)} passed unpatched but not patched; "
            f"{totals.get('fused_calls', 0)} fused calls, {totals.get('checked_calls', 0)} checked against "
            f"PEFT's forward (largest relative difference {totals.get('max_rel_diff', 0.0):.1e})",
            flush=True,
        )
        failures += [f"{name}: {t}" for t in broken]
    if failures:
        print("\n".join(failures[:50]))
        sys.exit(1)


if __name__ == "__main__":
    main()
