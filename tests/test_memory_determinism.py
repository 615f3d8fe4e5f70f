"""What the training step keeps for backward, and bit-identical results run after run."""
import pytest
import torch

import lora_kernels
from conftest import BACKENDS, make_problem


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
def test_training_step_keeps_only_x_weights_and_xa(backend):
    """nn.Linear with LoRA must keep x and the weights; the fused op adds only xa = s·x·Aᵀ (M×r)."""
    M, K, N, r = 64, 48, 96, 4
    x, w, b, a, bb, s = make_problem(M, K, N, r, torch.float32)
    x.requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()
    saved = saved_storages(lambda: lora_kernels.lora_linear(x, w, b, a, bb, s, backend=backend))
    inputs = {t.untyped_storage().data_ptr() for t in (x, w, a, bb)}
    extra = {ptr: nbytes for ptr, nbytes in saved.items() if ptr not in inputs}
    assert inputs <= set(saved), "x, W, A and B are saved by reference, not copied"
    assert list(extra.values()) == [M * r * 4], f"only xa (M×r) may be added, got {extra}"


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
