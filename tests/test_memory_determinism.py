"""What the training step keeps for backward, and bit-identical results run after run."""

import pytest
import torch
from conftest import BACKENDS, make_problem

import lora_kernels


def saved_storages(fn):
    """Run fn under autograd; return {storage pointer: bytes} of every tensor saved for backward."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_training_step_keeps_only_x_weights_and_xa(backend, dropout_p):
    """nn.Linear with LoRA must keep x and the weights; the fused op adds only xa = s·x·Aᵀ (M×r),
    and with dropout the kernel backends an 8-byte seed (their kernels redraw the mask), the
    reference backend the mask (M×K; backward rebuilds dropout(x) from it)."""
    M, K, N, r = 64, 48, 96, 4
    x, w, b, a, bb, s = make_problem(M, K, N, r, torch.float32)
    x.requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()
    saved = saved_storages(lambda: lora_kernels.lora_linear(x, w, b, a, bb, s, dropout_p=dropout_p, backend=backend))
    inputs = {t.untyped_storage().data_ptr() for t in (x, w, a, bb)}
    extra = sorted(nbytes for ptr, nbytes in saved.items() if ptr not in inputs)
    assert inputs - {x.untyped_storage().data_ptr()} <= set(saved), "W, A and B are saved by reference, not copied"
    if dropout_p == 0.0:
        assert x.untyped_storage().data_ptr() in saved
        want = [M * r * 4]
    else:
        want = [M * r * 4, M * K * 4] if backend == "reference" else [8, M * r * 4]
    assert extra == want, f"saved beyond the inputs: {extra}, expected {want}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bit_identical_run_after_run(backend, dtype):
    """No kernel uses atomics; split reductions are summed in a fixed order."""
    x, w, b, a, bb, s = make_problem(45, 80, 72, 8, dtype)
    dy = torch.randn(45, 72, dtype=dtype, device=x.device)
    results = []
    for _ in range(3):
        xs, As, Bs = (t.clone().requires_grad_() for t in (x, a, bb))
        y = lora_kernels.lora_linear(xs, w, b, As, Bs, s, backend=backend)
        y.backward(dy)
        results.append([y, xs.grad, As.grad, Bs.grad])
    for other in results[1:]:
        assert all(torch.equal(t0, t1) for t0, t1 in zip(results[0], other))
