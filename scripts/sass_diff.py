"""Whether a change alters the GPU code: the sm_90 SASS of every Triton launch, before and after.

    .venv/bin/python scripts/sass_diff.py REV        # REV's kernels against the working tree's
    PYTHONPATH=.triton36 .venv/bin/python scripts/sass_diff.py REV   # under triton 3.6 (the GPU machines')

Without a GPU, a kernel change has run only under the interpreter; if the compiled instructions are
the same as before, the GPU runs what it ran before. This checks REV out into a temporary worktree,
runs tests/triton/gpu_compile.py (this tree's copy, --quick, sm_90) once on REV's lora_kernels and
once on this tree's, side by side, and compares each launch's instructions (SASS, without addresses
and encodings), matched by kernel, argument types, constexprs, warps and stages:

    identical          the same instructions in the same order
    reordered          the same instructions once register and predicate numbers (and operand-reuse
                       hints) are set aside, in another order: most likely scheduling and register
                       allocation, but not proof (reading another register looks the same): read
                       the two listings (--keep DIR keeps them)
    changed            other instructions (count and opcodes that differ are printed)
    only before/after  a launch that one side does not make

Some compiles are not deterministic (the warp-specialized TMA kernel's, under triton 3.6 to 3.9:
bench/results/sm90-sass-diffs.md). So where launches differ, the kernels they belong to are
compiled from this tree ``--again`` more times (3 by default): a launch for which one of those
compiles gives REV's listing is "identical (to another compile of this tree)", and a launch whose
compiles of this tree differ from one another is marked unstable. A launch whose listings differ
but whose compiler input is REV's (Triton IR without source locations, and the resolved compile
options: gpu_compile.py's compiler_input) is "same compiler input": the change did not reach the
compiler, whatever the compiler then made of it. Exit status 0 only if every launch of REV is
reproduced by some compile of this tree or given the same compiler input. About 4 minutes on 2
cores, and 2 more where launches differ.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_COMPILE = ROOT / "tests" / "triton" / "gpu_compile.py"
REGISTER = re.compile(r"\b(U?R|U?P)\d+\b|\.reuse\b")  # R12, UR4, P3, UP0 (RZ, PT stay); operand-reuse hints


def compile_launches(code_root: Path, sass_dir: Path, cache_dir: Path, kernels=()) -> subprocess.Popen:
    """gpu_compile.py on ``code_root``'s lora_kernels (first on the path), writing SASS to ``sass_dir``;
    the launches of ``kernels`` only, if given."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # absolute: the compile runs in code_root, and a caller's PYTHONPATH=.triton36 names this tree's
    given = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(code_root), *given])
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    cmd = [sys.executable, str(GPU_COMPILE), "--quick", "--arch", "90", "--sass-dir", str(sass_dir)]
    cmd += [arg for kernel in kernels for arg in ("--kernel", kernel)]
    return subprocess.Popen(cmd, env=env, cwd=code_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def load(sass_dir: Path) -> tuple:
    """(the Triton version that compiled it, {launch key: its instructions}, {launch key: its
    compiler input} (none from listings written before gpu_compile.py wrote inputs))."""
    index = json.loads((sass_dir / "index.json").read_text())
    listings = {key: (sass_dir / name).read_text().splitlines() for key, name in index["launches"].items()}
    inputs = {key: (sass_dir / name).read_text() for key, name in index.get("inputs", {}).items()}
    return index["triton"], listings, inputs


def compare(before: list, after: list) -> str:
    """The verdict on two listings of one launch (see the module's docstring)."""
    if before == after:
        return "identical"
    unnumbered = [collections.Counter(REGISTER.sub(r"\1", line) for line in side) for side in (before, after)]
    if unnumbered[0] == unnumbered[1]:
        return "reordered"
    opcodes = [
        collections.Counter(REGISTER.sub("", line).lstrip("@!").split()[0] for line in side) for side in (before, after)
    ]
    delta = {op: opcodes[1][op] - opcodes[0][op] for op in opcodes[0] | opcodes[1] if opcodes[1][op] != opcodes[0][op]}
    return f"changed: {len(before)} -> {len(after)} instructions, opcodes {delta or 'same counts'}"


def short(key: str) -> str:
    """The launch key, shorter: kernel, element types, constexprs, warps, stages."""
    arch, name, rest = key.split(" ", 2)
    sig, consts = rest.split("] [", 1)
    types = sorted({t for t in re.findall(r"'\*(\w+)'", sig) if t not in ("i32", "i64")})
    consts = re.findall(r"\('(\w+)', ([^)]*)\)", consts)
    return (
        f"{name} {'+'.join(types)} "
        + " ".join(f"{k}={v.strip(chr(39))}" for k, v in consts)
        + " "
        + rest.rsplit("] ", 1)[1]
    )


def judge(before: dict, ours: dict, before_inputs: dict | None = None, our_inputs: dict | None = None) -> list:
    """[(launch key, verdict, unstable)] for REV's listings ``before`` and this tree's, ``ours``:
    {key: [the first compile's listing, then those of the compiles again (None: not compiled)]};
    ``before_inputs`` and ``our_inputs``: each side's compiler inputs, {key: text}, where known.
    A launch is unstable if this tree's compiles of it differ from one another."""
    before_inputs, our_inputs, judged = before_inputs or {}, our_inputs or {}, []
    for key in sorted(before.keys() | ours.keys()):
        listings = [listing for listing in ours.get(key, []) if listing is not None]
        unstable = any(listing != listings[0] for listing in listings)
        if key not in ours or key not in before:
            verdict = "only before" if key not in ours else "only after"
        elif before[key] == listings[0]:
            verdict = "identical"
        elif before[key] in listings:  # this tree can compile to REV's listing
            verdict = "identical (to another compile of this tree)"
        elif key in before_inputs and before_inputs[key] == our_inputs.get(key):
            verdict = "same compiler input"  # what differs was made by the compiler, not the change
        else:
            verdict = compare(before[key], listings[0])
        judged.append((key, verdict, unstable))
    return judged


def run(jobs: dict, listings: Path) -> dict:
    """Wait for the compiles; {side: (Triton version, launches)}."""
    for side, job in jobs.items():
        out = job.communicate()[0]
        if job.returncode != 0:
            raise SystemExit(f"gpu_compile.py failed on {side}:\n{out[-3000:]}")
    return {side: load(listings / side) for side in jobs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the git revision to compare the working tree with")
    parser.add_argument("--again", type=int, default=3, help="recompiles of this tree where launches differ")
    parser.add_argument("--keep", metavar="DIR", help="keep the listings in DIR/{before,after,again-N}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        worktree = tmp / "worktree"
        listings = Path(args.keep) if args.keep else tmp
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(worktree), args.rev], check=True
        )
        try:
            trees = {"before": worktree, "after": ROOT}
            jobs = {
                side: compile_launches(tree, listings / side, tmp / f"cache-{side}") for side, tree in trees.items()
            }
            loaded = run(jobs, listings)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=True)
        before, after = loaded["before"][1], loaded["after"][1]
        differing = {key.split(" ")[1] for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
        sides = [f"again-{i}" for i in range(args.again if differing else 0)]
        jobs = {
            side: compile_launches(ROOT, listings / side, tmp / f"cache-{side}", sorted(differing)) for side in sides
        }
        loaded.update(run(jobs, listings))
    versions = {version for version, *_ in loaded.values()}
    if len(versions) != 1:  # a side that imported another Triton would compare compilers, not code
        print(f"the sides were compiled by different Triton versions: {versions}")
        return 1
    ours = {key: [listing, *(loaded[side][1].get(key) for side in sides)] for key, listing in after.items()}
    verdicts = collections.Counter()
    failed = False
    for key, verdict, unstable in judge(before, ours, loaded["before"][2], loaded["after"][2]):
        verdicts[verdict.split(":")[0] + (" (unstable)" if unstable else "")] += 1
        if verdict != "identical":
            print(
                f"{verdict:<12} {short(key)}" + (" (this tree's compiles differ from one another)" if unstable else "")
            )
            failed |= not verdict.startswith(("identical", "same compiler input"))
    print(
        f"{args.rev} -> working tree, triton {versions.pop()}, {len(after)} launches, sm_90"
        + (f", {len(sides)} more compiles of {', '.join(sorted(differing))}" if sides else "")
        + ": "
        + ", ".join(f"{n} {v}" for v, n in verdicts.items())
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
