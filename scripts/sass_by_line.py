"""Static SASS of one compiled CUDA kernel, counted per source line: where its instructions come from.

    python scripts/sass_by_line.py lora_kernels/_C*.so wgmma_gemm_producerI13__nv_bfloat16 --arch sm_90a

Extracts the cubin of `--arch` from the object or shared library with cuobjdump, disassembles it
with nvdisasm -g (line information: the extension is built with -lineinfo) and prints, for the
first kernel whose mangled name contains NAME, its instruction count, a few instruction classes and
the source lines with the most instructions. Static counts, not executed ones: a line inside an
unrolled loop counts once per copy. The tools ship with triton (or with the CUDA toolkit).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CLASSES = {  # instruction class: prefix of the opcode
    "global stores": "STG",
    "shared stores": "STS",
    "shared loads": "LDS",
    "wgmma": "HGMMA",
    "conversions to 16-bit": "F2FP",
}


def tool(name: str) -> str:
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found (it ships with triton and with the CUDA toolkit)")
    return found


def disassemble(binary: Path, arch: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [tool("cuobjdump"), "-xelf", "all", str(binary.resolve())], cwd=tmp, check=True, capture_output=True
        )
        cubins = sorted(Path(tmp).glob(f"*{arch}*.cubin"))
        if not cubins:
            raise SystemExit(f"no {arch} cubin in {binary}")
        return "\n".join(
            subprocess.run([tool("nvdisasm"), "-g", "-c", str(c)], check=True, capture_output=True, text=True).stdout
            for c in cubins
        )


def kernel_lines(sass: str, name: str):
    """(mangled name, [(source line or None, instruction text)]) of the first kernel matching name."""
    kernel, out, line = None, [], None
    for text in sass.splitlines():
        section = re.match(r'\s*\.section\s+"?\.text\.([^",]+)', text)
        if section:
            if kernel is not None:
                break
            if name in section.group(1):
                kernel = section.group(1)
            continue
        if kernel is None:
            continue
        where = re.search(r'//## File "([^"]+)", line (\d+)', text)
        if where:
            line = f"{Path(where.group(1)).name}:{where.group(2)}"
        elif re.match(r"\s+/\*[0-9a-f]{4,}\*/", text):
            out.append((line, text))
    if kernel is None:
        raise SystemExit(f"no kernel whose name contains {name!r}")
    return kernel, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", type=Path, help="object file or shared library holding the cubin")
    parser.add_argument("name", help="part of the kernel's mangled name")
    parser.add_argument("--arch", default="sm_90a")
    parser.add_argument("--top", type=int, default=20, help="source lines to list")
    args = parser.parse_args()
    kernel, instructions = kernel_lines(disassemble(args.binary, args.arch), args.name)
    opcodes = [re.sub(r"^\s*/\*[0-9a-f]+\*/\s*(@!?U?P\w+\s+)?", "", text).split()[0] for _, text in instructions]
    print(f"{kernel}: {len(instructions)} instructions")
    for label, prefix in CLASSES.items():
        print(f"  {label}: {sum(op.startswith(prefix) for op in opcodes)}")
    print(f"  16-byte global stores: {sum('STG.E.128' in text for _, text in instructions)}")
    per_line = collections.Counter(line for line, _ in instructions)
    for line, count in per_line.most_common(args.top):
        print(f"{count:7d}  {line}")


if __name__ == "__main__":
    main()
