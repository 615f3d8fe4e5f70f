"""Check a source archive: it holds everything building the package needs (every file a csrc/
source includes, the Python package, setup files, README, LICENSE) and nothing a build made.

    python scripts/check_sdist.py dist/lora_kernels-0.1.0.tar.gz
"""

import re
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_OUTPUT = re.compile(r"(\.so|\.o|\.pyc|\.whl)$|(^|/)(build|dist|__pycache__|\.venv[^/]*)/")


def main(archive: str) -> None:
    with tarfile.open(archive) as tar:
        names = [m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name]
    have = set(names)
    # what the build needs: every C/C++/CUDA file under csrc/ and whatever they include
    needed = {"setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h")}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "lora_kernels").rglob("*.py")}
    for source in [n for n in needed if n.startswith("csrc/")]:
        for include in re.findall(r'#include "([^"]+)"', (ROOT / source).read_text()):
            needed.add(str((Path(source).parent / include)))
    missing = sorted(needed - have)
    built = sorted(n for n in names if BUILD_OUTPUT.search(n))
    print(f"{archive}: {len(names)} files; {len(needed)} needed for the build")
    if missing or built:
        sys.exit(f"missing: {missing}\nbuild output that must not be there: {built}")


if __name__ == "__main__":
    main(sys.argv[1])
