"""torch.compile without graph breaks, torch.export, torch.library.opcheck on every custom op, CUDA-graph capture."""

import copy

import pytest
import torch
from conftest import BACKENDS, DEVICE, KERNEL_BACKENDS, assert_close, lora_mlp, make_problem

import lora_kernels


def lora_model(backend, dropout=0.0):
    return lora_mlp(backend=backend, dropout=dropout)


def run(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().mean().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend, compiler):
    torch._dynamo.reset()
    model = lora_model(backend)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    x = torch.randn(3, 5, 32, device=DEVICE)
    y, dx, grads = run(model, x)
    y_c, dx_c, grads_c = run(compiled, x)
    assert_close(y_c, y.double(), torch.float32, "y")
    assert_close(dx_c, dx.double(), torch.float32, "dx")
    assert grads_c.keys() == grads.keys() and len(grads) == 4
    for name in grads:
        assert_close(grads_c[name], grads[name].double(), torch.float32, name)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b == "triton"])
def test_compiled_graph_holds_the_kernel_as_one_op(backend):
    """Eager calls bypass the op's dispatch; under torch.compile the op itself must be traced."""
    torch._dynamo.reset()
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    x, w, b, a, bb, s = make_problem(6, 32, 24, 4, torch.float32)
    fn = torch.compile(
        lambda x: lora_kernels.lora_linear(x, w, b, a, bb, s, backend=backend), fullgraph=True, backend=record
    )
    assert_close(fn(x), lora_kernels.lora_linear_reference(x, w, b, a, bb, s).double(), torch.float32, "y")
    assert f"lora_kernels.{backend}_forward.default" in targets, targets


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_with_a_dynamic_batch_runs_as_eager(backend):
    """torch.export (AOTInductor, ExecuTorch): the layers export with a dynamic row count, the kernel
    backends as their one op each, and the exported program computes what the eager model does."""
    model = lora_model(backend).eval()
    x = torch.randn(5, 32, device=DEVICE)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("rows", min=2)},))
    if backend != "reference" and backend != "auto":
        targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
        assert targets.count(f"lora_kernels.{backend}_forward.default") == 2, targets
    for rows in (5, 11):
        x = torch.randn(rows, 32, device=DEVICE)
        with torch.no_grad():
            assert torch.equal(program.module()(x), model(x))


def test_auto_under_export_does_not_guard_a_dynamic_row_count(monkeypatch):
    """auto chooses by row count; under torch.export that comparison on a dynamic size would add a
    guard (failing the export on a GPU), so there it takes the fused Triton kernels at any size. A
    CUDA tensor with a symbolic row count, faked (no GPU needed)."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from lora_kernels import dispatch

    if not dispatch.is_resolved("triton"):
        pytest.skip("triton is not importable")
    for exporting, key, guards in ((False, "auto-triton", True), (True, "auto-export", False)):
        shape_env = ShapeEnv()
        symbol = shape_env.create_symbol(5, source=ConstantSource("rows"), dynamic_dim=DimDynamic.DYNAMIC)
        with FakeTensorMode(shape_env=shape_env):
            x = torch.empty(shape_env.create_symintnode(symbol, hint=5), 32, device="cuda", dtype=torch.bfloat16)
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: exporting)
        decision = dispatch._auto(x, by_size=True, inference=True, out_features=256, rank=4)
        assert (decision.key, decision.backend, bool(shape_env.guards)) == (key, "triton", guards)


def test_compile_fullgraph_with_dropout():
    torch._dynamo.reset()
    model = lora_model("auto", dropout=0.1).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y, dx, grads = run(compiled, torch.randn(4, 32, device=DEVICE))
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and len(grads) == 4


def custom_ops():
    ops = []
    for backend in KERNEL_BACKENDS:
        ns = torch.ops.lora_kernels
        ops += [(backend, getattr(ns, f"{backend}_forward").default, getattr(ns, f"{backend}_backward").default)]
    return ops


@pytest.mark.parametrize("backend, forward_op, backward_op", custom_ops(), ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(backend, forward_op, backward_op, dtype):
    x, w, b, a, bb, s = make_problem(9, 40, 24, 8, dtype)
    torch.library.opcheck(forward_op, (x, w, b, a, bb, s, None))
    torch.library.opcheck(forward_op, (x, w, None, a, bb, s, x * 0.5))
    y, xa = forward_op(x, w, b, a, bb, s, None)
    dy = torch.randn_like(y)
    torch.library.opcheck(backward_op, (dy, x, w, a, bb, xa, s, True))
    torch.library.opcheck(backward_op, (dy, x, w, a, bb, xa, s, False))
    # multi-adapter batches: two stacked adapters of rank 4, row ids in [-1, 2)
    adapters = {
        "adapter_ids": torch.randint(-1, 2, (9,), dtype=torch.int32, device=DEVICE),
        "adapter_scales": torch.tensor([0.5, 2.0], device=DEVICE),
        "adapter_rank": 4,
    }
    torch.library.opcheck(forward_op, (x, w, b, a, bb, s, None), adapters)
    y, xa = forward_op(x, w, b, a, bb, s, None, **adapters)
    torch.library.opcheck(backward_op, (dy, x, w, a, bb, xa, s, True), adapters)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cuda_graph_capture_forward_and_training_step(backend):
    model = lora_model(backend)
    static_x = torch.randn(16, 32, device="cuda", requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        y = model(static_x)
        return (y, *torch.autograd.grad(y.square().mean(), [static_x, *params]))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for _ in range(2):
        with torch.no_grad():
            static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        eager = step()
        for got, want in zip(static_out, eager):
            assert_close(got, want.double(), torch.float32, "graph replay")


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cuda_graph_replay_draws_a_new_dropout_mask(backend):
    """As nn.Dropout under capture does (torch's generator state advances per replay): each replay of
    a captured training forward with fused dropout has its own mask, and its outputs are those of
    one mask, the same in its forward and its backward."""
    torch.manual_seed(0)
    M, K, N, r, p, s = 64, 48, 40, 8, 0.5, 2.0
    x = torch.randn(M, K, device="cuda", requires_grad=True)
    w = torch.randn(N, K, device="cuda") / K**0.5
    a = (torch.randn(r, K, device="cuda") / K**0.5).requires_grad_()
    b = (torch.randn(N, r, device="cuda") / r**0.5).requires_grad_()

    def step():
        y = lora_kernels.lora_linear(x, w, None, a, b, s, dropout_p=p, backend=backend)
        return (y, *torch.autograd.grad(y.sum(), [a]))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, da = step()
    outputs = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        outputs.append((y.clone(), da.clone()))
    assert not torch.equal(outputs[0][0], outputs[1][0]), "two replays drew the same dropout mask"
    for y_r, da_r in outputs:
        # with dY = 1, g = dY·B has the row b.sum(0) everywhere, so dA = s·gᵀ·(x⊙m) has rows
        # b.sum(0)[j]·v with v = s·Σ_rows (x⊙m); the forward's LoRA term summed over rows is v·Aᵀ·Bᵀ
        # for the same mask m: forward and backward of one replay used one mask
        g = b.detach().double().sum(0)
        j = g.abs().argmax()
        v = da_r.double()[j] / g[j]
        # (bf16's bound: the identity of the mask is checked, which a different one breaks by O(1))
        assert_close(da_r, torch.outer(g, v), torch.bfloat16, "dA's rows, one mask")
        lora_rows_sum = (y_r.double() - x.detach().double() @ w.double().t()).sum(0)
        assert_close(
            lora_rows_sum.float(),
            v @ a.detach().double().t() @ b.detach().double().t(),
            torch.bfloat16,
            "forward's LoRA term, the backward's mask",
        )
