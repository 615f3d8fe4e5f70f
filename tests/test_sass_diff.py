"""scripts/sass_diff.py's verdicts, on made-up instruction lists (the compile itself is exercised
by tests/triton/test_gpu_compile.py, which writes the SASS it reads)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "sass_diff.py"
spec = importlib.util.spec_from_file_location("sass_diff", SCRIPT)
sass_diff = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_diff)

BEFORE = [
    "ISETP.LT.AND P1, PT, R17, UR17, !P0",
    "LEA R13, P4, R12.reuse, UR8, 0x1",
    "@!P1 STG.E.64 desc[UR10][R2.64], R10",
    "EXIT",
]


def test_identical():
    assert sass_diff.compare(BEFORE, list(BEFORE)) == "identical"


def test_other_registers_and_order_is_reordered():
    after = [
        "LEA R13, P5, R12, UR8, 0x1",  # other predicate, no reuse hint, moved up
        "ISETP.LT.AND P4, PT, R17, UR17, !P0",
        "@!P4 STG.E.64 desc[UR10][R6.64], R10",
        "EXIT",
    ]
    assert sass_diff.compare(BEFORE, after) == "reordered"
    # register numbers are set aside entirely, so reading another register looks the same: why
    # "reordered" is a lead to read the diff, not proof, and fails the script's exit status
    assert sass_diff.compare(BEFORE, ["ISETP.LT.AND P1, PT, R17, UR16, !P0"] + BEFORE[1:]) == "reordered"


@pytest.mark.parametrize(
    "after, expected",
    [
        (BEFORE[:2] + ["STG.E.64 desc[UR10][R2.64], R10", "EXIT"], "opcodes same counts"),  # lost its predicate
        (BEFORE[:2] + ["@!P1 STG.E desc[UR10][R2.64], R10", "EXIT"], "'STG.E.64': -1, 'STG.E': 1"),
        (BEFORE + ["NOP"], "4 -> 5 instructions, opcodes {'NOP': 1}"),
    ],
)
def test_other_instructions_are_changed(after, expected):
    verdict = sass_diff.compare(BEFORE, after)
    assert verdict.startswith("changed") and expected in verdict, verdict


def test_short_key():
    key = (
        "sm_90 _lora_forward_kernel [('K', 'i32'), ('a_ptr', '*fp32'), ('x_ptr', '*bf16')] "
        "[('BLOCK_M', 64), ('HAS_BIAS', True)] w4 s3"
    )
    assert sass_diff.short(key) == "_lora_forward_kernel bf16+fp32 BLOCK_M=64 HAS_BIAS=True w4 s3"


REORDERED = [BEFORE[1], BEFORE[0], *BEFORE[2:]]
CHANGED = BEFORE[:2] + ["@!P1 STG.E desc[UR10][R2.64], R10", "EXIT"]


@pytest.mark.parametrize(
    "ours, verdict, unstable",
    [
        ([BEFORE], "identical", False),
        ([BEFORE, BEFORE, None], "identical", False),  # None: not compiled again
        ([BEFORE, REORDERED], "identical", True),  # this tree's compiles differ; the first is REV's
        ([REORDERED, REORDERED, BEFORE], "identical (to another compile of this tree)", True),
        ([REORDERED, REORDERED, REORDERED], "reordered", False),
        ([CHANGED, REORDERED], "changed", True),  # unstable, and no compile gave REV's listing: not excused
    ],
)
def test_judge(ours, verdict, unstable):
    [(key, got, got_unstable)] = sass_diff.judge({"k": BEFORE}, {"k": ours})
    assert (key, got.split(":")[0], got_unstable) == ("k", verdict, unstable)


def test_judge_launches_on_one_side():
    judged = sass_diff.judge({"gone": BEFORE}, {"new": [BEFORE]})
    assert judged == [("gone", "only before", False), ("new", "only after", False)]


@pytest.mark.parametrize(
    "before_input, our_input, verdict",
    [
        ("ir", "ir", "same compiler input"),  # the listings differ, the compiler was given the same
        ("ir", "other ir", "changed"),
        (None, "ir", "changed"),  # REV's listings written without inputs: the listings decide
    ],
)
def test_judge_by_compiler_input(before_input, our_input, verdict):
    before_inputs = {} if before_input is None else {"k": before_input}
    [(_, got, _)] = sass_diff.judge({"k": BEFORE}, {"k": [CHANGED]}, before_inputs, {"k": our_input})
    assert got.split(":")[0] == verdict
    # identical listings stay identical whatever the inputs say
    [(_, got, _)] = sass_diff.judge({"k": BEFORE}, {"k": [BEFORE]}, before_inputs, {"k": "x"})
    assert got == "identical"


def test_load_reads_inputs_where_written(tmp_path):
    (tmp_path / "0000.sass").write_text("\n".join(BEFORE) + "\n")
    (tmp_path / "index.json").write_text('{"triton": "3.6.0", "launches": {"k": "0000.sass"}}')
    assert sass_diff.load(tmp_path) == ("3.6.0", {"k": BEFORE}, {})
    (tmp_path / "0000.input").write_text("ir\n")
    (tmp_path / "index.json").write_text(
        '{"triton": "3.6.0", "launches": {"k": "0000.sass"}, "inputs": {"k": "0000.input"}}'
    )
    assert sass_diff.load(tmp_path) == ("3.6.0", {"k": BEFORE}, {"k": "ir\n"})
