"""The direct launch path (lora_kernels/triton/_launch.py, LORA_KERNELS_DIRECT_LAUNCH=1), without a GPU.

Its logic against a stand-in for Triton's JITFunction and CompiledKernel (what launches where,
which argument changes make a new class); on the real kernels, that the wrappers pass every
parameter the compiled launcher takes (positional first, then only constexprs by name), since
the launcher is called with all of them in order; and through Triton's own launch path with only
the driver faked (direct_launch_check.py), that a direct launch hands the launcher what the JIT
hands it. On a GPU, scripts/gpu_session.sh launch runs the kernel tests with the switch on and
times the host path.
"""

import contextlib
import inspect
import os
import subprocess
import sys

import pytest
import torch
from conftest import REL_TOL, rel_err

pytest.importorskip("triton")
import lora_kernels  # noqa: E402
from lora_kernels import reference  # noqa: E402
from lora_kernels.triton import _common, _launch, lora_backward, lora_forward  # noqa: E402


class FakeCompiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("direct", grid, args))


class FakeKernel:
    """JITFunction's interface as _launch uses it: arg_names, and kernel[grid](...) returning the
    compiled kernel."""

    arg_names = ["x_ptr", "M", "scale", "BLOCK_M", "FLAG"]

    def __init__(self):
        self.log, self.compiled = [], None

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            self.compiled = self.compiled or FakeCompiled(self.log)
            return self.compiled

        return run


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setattr(_launch, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(_launch, "_COMPILED", {})
    monkeypatch.setattr(_launch, "_LAYOUTS", {})


def kinds(kernel):
    return [entry[0] for entry in kernel.log]


def test_a_seen_class_launches_the_compiled_kernel_with_every_parameter_in_order(direct):
    kernel, x = FakeKernel(), torch.zeros(64)
    _launch.launch(kernel, (4,), x, 64, 2.0, BLOCK_M=16, FLAG=True, num_warps=4)
    _launch.launch(kernel, (8,), x, 64, 2.0, BLOCK_M=16, FLAG=True, num_warps=4)
    assert kinds(kernel) == ["jit", "direct"]
    assert kernel.log[1] == ("direct", (8, 1, 1), (x, 64, 2.0, 16, True))  # constexprs appended, options not
    assert _launch.direct_launches() == 1


@pytest.mark.parametrize("change", ["int", "float", "dtype", "alignment", "constexpr", "option"])
def test_any_change_the_jit_could_specialise_on_takes_the_jit(direct, change):
    kernel, x = FakeKernel(), torch.zeros(64)
    _launch.launch(kernel, (1,), x, 64, 2.0, BLOCK_M=16, FLAG=True, num_warps=4)
    args, consts = [x, 64, 2.0], dict(BLOCK_M=16, FLAG=True, num_warps=4)
    if change == "int":
        args[1] = 65
    elif change == "float":
        args[2] = 3.0
    elif change == "dtype":
        args[0] = x.to(torch.float16)
    elif change == "alignment":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
        assert args[0].data_ptr() % 16 != 0
    elif change == "constexpr":
        consts["FLAG"] = False
    else:
        consts["num_warps"] = 8
    _launch.launch(kernel, (1,), *args, **consts)
    assert kinds(kernel) == ["jit", "jit"]


def test_a_call_with_tensors_elsewhere_than_the_first_launch_always_takes_the_jit(direct):
    """The class reads tensors at the positions of the kernel's first launch; a call that has a
    tensor at another position (or none at one of them) is never kept, so never launched directly."""
    kernel, x = FakeKernel(), torch.zeros(64)
    _launch.launch(kernel, (1,), x, 64, 2.0, BLOCK_M=16, FLAG=True)
    for _ in range(2):
        _launch.launch(kernel, (1,), x, torch.zeros(1), 2.0, BLOCK_M=16, FLAG=True)
        _launch.launch(kernel, (1,), 0, 64, 2.0, BLOCK_M=16, FLAG=True)
    _launch.launch(kernel, (1,), x, 64, 2.0, BLOCK_M=16, FLAG=True)
    assert kinds(kernel) == ["jit"] * 5 + ["direct"]
    assert _launch.direct_launches() == 1


def test_off_by_default_every_call_takes_the_jit(monkeypatch):
    monkeypatch.setattr(_launch, "DIRECT_LAUNCH", False)
    kernel, x = FakeKernel(), torch.zeros(64)
    for _ in range(3):
        _launch.launch(kernel, (1,), x, 64, 2.0, BLOCK_M=16, FLAG=True)
    assert kinds(kernel) == ["jit"] * 3


def test_the_cache_is_bounded(direct, monkeypatch):
    monkeypatch.setattr(_launch, "MAX_CLASSES", 2)
    kernel, x = FakeKernel(), torch.zeros(64)
    for m in (1, 2, 3):
        _launch.launch(kernel, (1,), x, m, 2.0, BLOCK_M=16, FLAG=True)
    assert _launch.direct_launches() == 1  # started over at the third class


@pytest.mark.parametrize("interpret, expected", [("0", "True"), ("1", "False")])
def test_the_switch_turns_it_on_except_under_the_interpreter(interpret, expected):
    """The interpreter has no compiled kernels: there the switch is ignored."""
    env = {**os.environ, "LORA_KERNELS_DIRECT_LAUNCH": "1", "TRITON_INTERPRET": interpret}
    code = "from lora_kernels.triton import _launch; print(_launch.DIRECT_LAUNCH)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == expected


def constexpr_parameters(kernel):
    """The parameters annotated tl.constexpr (JITFunction and the interpreter's stand-in both keep
    the Python function as .fn)."""
    params = inspect.signature(kernel.fn).parameters
    return {name for name, p in params.items() if "constexpr" in str(p.annotation)}


class Recorder:
    def __init__(self, fn, seen):
        self.fn, self.seen, self.arg_names = fn, seen, fn.arg_names

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.seen.append((self.fn, args, kwargs))


def test_the_wrappers_pass_every_kernel_parameter_positional_then_constexprs(monkeypatch):
    """What the compiled launcher needs: all of arg_names, positional ones first, and everything
    passed by name a constexpr (or a launch option)."""
    seen = []
    for mod, name in (
        (lora_forward, "_lora_forward_kernel"),
        (lora_forward, "_dropout_xa_kernel"),
        (lora_backward, "_lora_dx_kernel"),
        (lora_backward, "_lora_dadb_kernel"),
    ):
        monkeypatch.setattr(mod, name, Recorder(getattr(mod, name), seen))
    meta = dict(device="meta", dtype=torch.bfloat16)
    M, K, N, R = 40, 64, 48, 8
    x, w, a, b = (torch.empty(*s, **meta) for s in ((M, K), (N, K), (R, K), (N, R)))
    seed = torch.empty(1, device="meta", dtype=torch.int64)
    y, xa = lora_forward.fused_forward(x, w, None, a, b, 2.0, dropout_p=0.1, seed=seed)
    lora_backward.fused_backward(torch.empty(M, N, **meta), x, w, a, b, xa, 2.0, dropout_p=0.1, seed=seed)
    assert {fn.__name__ for fn, _, _ in seen} == {
        "_lora_forward_kernel",
        "_dropout_xa_kernel",
        "_lora_dx_kernel",
        "_lora_dadb_kernel",
    }
    for fn, args, kwargs in seen:
        by_name = fn.arg_names[len(args) :]
        assert set(by_name) <= set(kwargs), (fn.__name__, set(by_name) - set(kwargs))
        assert set(kwargs) - set(by_name) <= {"num_warps", "num_stages", "enable_fp_fusion"}, fn.__name__
        assert kwargs["enable_fp_fusion"] is True, fn.__name__  # as measured, whatever Triton's default
        constexprs = constexpr_parameters(fn)
        assert set(by_name) <= constexprs, (fn.__name__, set(by_name) - constexprs)
        assert not constexprs & set(fn.arg_names[: len(args)]), fn.__name__


def test_direct_launches_give_the_launcher_what_the_jit_gives_it():
    """Real Triton (JITFunction.run, CompiledKernel and its runner, kernels compiled for sm_90) with
    a stand-in driver, in a subprocess without the interpreter; the cases are listed in the script,
    which also checks gpu_compile.py's specialisation of each launch against the JIT's.
    It caught the runner reading grid[1] and grid[2] of the wrappers' 1-D grids (an IndexError on
    every direct launch), which the stand-ins above did not."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "direct_launch_check.py")
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    assert run.stdout.count("\nok ") >= 8, run.stdout


class OnGpu:
    """Stands in for a tensor on GPU ``index`` (-1: on the CPU), as on_tensor_device reads it."""

    def __init__(self, index):
        self.index = index

    def get_device(self):
        return self.index


def test_the_wrappers_launch_on_the_tensors_gpu_not_the_current_one(monkeypatch):
    """Triton launches on the current device: a layer on cuda:1 called while cuda:0 is current (a
    model spread over GPUs) must make cuda:1 current for its launches, and only then."""
    current, entered = [0], []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        saved, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = saved

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    ran_on = []
    guarded = _common.on_tensor_device(lambda x, *args, **kwargs: ran_on.append((current[0], args, kwargs)) or "y")
    for index in (1, 0, -1):
        assert guarded(OnGpu(index), 2.0, dropout_p=0.1) == "y"
    assert entered == [1]
    call = ((2.0,), {"dropout_p": 0.1})
    assert ran_on == [(1, *call), (0, *call), (0, *call)]  # cuda:1 made current; cuda:0 and CPU as they were
    assert current == [0]
    for wrapper in (lora_forward.fused_forward, lora_backward.fused_backward, _common.dropout_mask):
        assert wrapper.__code__.co_name == "on_device", f"{wrapper.__name__} is not wrapped by on_tensor_device"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_layer_on_the_second_gpu_while_the_first_is_current(poison):
    """Forward and backward of the fused Triton path on cuda:1 with cuda:0 current, against float64
    (without the device guard the kernels ran on cuda:0's stream with cuda:1's pointers)."""
    gen = torch.Generator().manual_seed(5)
    M, K, N, r = 37, 96, 80, 8
    x, w, a, b, dy = (
        torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((M, K), (N, K), (r, K), (N, r), (M, N))
    )
    leaves = [t.to("cuda:1", torch.bfloat16).requires_grad_() for t in (x, a, b)]
    with torch.cuda.device(0):
        y = lora_kernels.lora_linear(
            leaves[0], w.to("cuda:1", torch.bfloat16), None, *leaves[1:], 2.0, backend="triton"
        )
        y.backward(dy.to("cuda:1", torch.bfloat16))
    torch.cuda.synchronize("cuda:1")
    want = [t.requires_grad_() for t in (x, a, b)]
    y64 = reference.lora_linear_reference(want[0], w, None, *want[1:], 2.0)
    y64.backward(dy)
    for got, expected in [(y, y64)] + [(g.grad, e.grad) for g, e in zip(leaves, want)]:
        assert got.device == torch.device("cuda:1")
        assert rel_err(got, expected) < REL_TOL[torch.bfloat16]
