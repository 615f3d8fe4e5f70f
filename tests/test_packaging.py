"""Packaging facts that need no build: one table of environment switches, read in one place, and
the version the package exposes. (The sdist, a build from it and the smoke test run in
`make test-package`; the oldest versions in `make test-oldest`.)"""

import re
from pathlib import Path

import lora_kernels
from lora_kernels import _env

ROOT = Path(__file__).resolve().parent.parent


def test_readme_holds_the_switch_table():
    assert _env.markdown_table() in (ROOT / "README.md").read_text()


def test_switches_are_read_in_one_place():
    """Python reads environment variables only in lora_kernels/_env.py, C++ only in csrc/switches.h,
    and every variable either reads is in the table."""
    names = {s.name for s in _env.SWITCHES}
    for path in list((ROOT / "lora_kernels").rglob("*.py")) + [ROOT / "setup.py"]:
        text = path.read_text()
        if path.name != "_env.py":
            assert not re.search(r"os\.environ|getenv", text), f"{path.relative_to(ROOT)} reads the environment"
    for path in (ROOT / "csrc").iterdir():
        text = path.read_text()
        if path.name != "switches.h":
            assert "getenv" not in text, f"{path.relative_to(ROOT)} reads the environment"
        else:
            assert set(re.findall(r'"(LORA_KERNELS_\w+)"', text)) <= names
    assert "TORCH_CUDA_ARCH_LIST" in names and "LORA_KERNELS_SKIP_CUDA_BUILD" in names


def test_version_is_the_packages():
    setup = (ROOT / "setup.py").read_text()
    assert "version=VERSION" in setup and re.fullmatch(r"\d+\.\d+\.\d+", lora_kernels.__version__)
