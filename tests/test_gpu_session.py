"""scripts/gpu_session.sh, checked on CPU: what it would do on a lent GPU, whose minutes are counted,
must not fail on a typo. Its shell parses; the benchmark suites, implementations, files and
switches it names exist (a misspelt --impls name would measure nothing, silently)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_session.sh"
sys.path.insert(0, str(ROOT / "bench"))
from report import RESULTS  # noqa: E402  (its keys are the suites)
from test_layer import known_implementations  # noqa: E402

from lora_kernels import _env  # noqa: E402


def script_text() -> str:
    # the commands only: a comment may name what is not a command-line argument
    lines = SCRIPT.read_text().splitlines()
    return "\n".join(line.split(" # ")[0] for line in lines if not line.lstrip().startswith("#"))


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_implementation_it_asks_for_exists():
    lists = re.findall(r'--impls "([^"$]+)"', script_text())
    assert lists, "no --impls list found: has the script's form changed?"
    names = {name.strip() for names in lists for name in names.split(",")}
    assert names <= known_implementations(), sorted(names - known_implementations())


def test_every_suite_file_and_switch_it_names_exists():
    text = script_text()
    suites = set(re.findall(r"--suite (\w+)", text))
    assert suites and suites <= {"all", *RESULTS}, suites
    paths = set(re.findall(r"\b((?:tests|scripts|bench)/[\w/.]+\.py)\b", text))
    assert paths and all((ROOT / p).is_file() for p in paths), sorted(p for p in paths if not (ROOT / p).is_file())
    switches = set(re.findall(r"\bLORA_KERNELS_\w+", text))
    assert switches <= {s.name for s in _env.SWITCHES}, sorted(switches - {s.name for s in _env.SWITCHES})


def script_selections():
    """(test files, -k expression) of each pytest command in the script that selects with -k."""
    commands = script_text().replace("\\\n", " ").splitlines()
    found = []
    for command in commands:
        files = re.search(r"python3 -m pytest ((?:tests/\S+\s+)+)", command)
        keyword = re.search(r'-k "([^"]+)"', command)
        if files and keyword:
            found.append((files.group(1).split(), keyword.group(1)))
    return found


@pytest.mark.parametrize("files, keyword", script_selections(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_test_selection_selects_tests(files, keyword):
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files, "-k", keyword],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    counts = re.search(r"(\d+)(?:/\d+)? tests? collected", run.stdout)
    assert run.returncode == 0 and counts and int(counts.group(1)) > 0, run.stdout[-2000:] + run.stderr[-2000:]


def test_the_script_has_test_selections():
    assert len(script_selections()) >= 4  # cuda, wgmma, launch, tma: has the script's form changed?


def test_a_misspelt_implementation_stops_the_benchmark(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--suite", "layer",
         "--results-dir", str(tmp_path), "--shapes", "32x32", "--m", "1", "--ranks", "4",
         "--impls", "base,peft-stlye"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0 and "--impls: unknown ['peft-stlye']" in run.stdout + run.stderr
