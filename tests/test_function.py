"""lora_linear: forward and all gradients of every available backend against the float64 reference."""

import math

import pytest
import torch
from conftest import BACKENDS, DEVICE, KERNEL_BACKENDS, assert_close, make_problem, reference_grads

import lora_kernels
from lora_kernels.function import draw_dropout_seed

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, K, N, r): M = 1 and 37, sizes that are not multiples of any block, r from 1 to 64.
SHAPES = [(1, 40, 24, 8), (37, 70, 50, 12), (16, 64, 32, 1), (33, 48, 65, 64), (5, 17, 19, 3)]


def expected_dropout_mask(backend, seed, x, p):
    """The scaled keep-mask lora_linear used after torch.manual_seed(seed): the Function's first
    random draw is either the fused kernels' seed or the materialised bernoulli mask."""
    torch.manual_seed(seed)
    shape2d = (math.prod(x.shape[:-1]), x.shape[-1])
    if backend in ("triton", "cuda") or (backend == "auto" and x.device.type == "cuda"):  # fused: drawn from a seed
        kernel_seed = draw_dropout_seed(x.device).item()
        keep = lora_kernels.reference.dropout_keep(kernel_seed, *shape2d, p, device=x.device)
        return (keep.double() / (1 - p)).reshape(x.shape)  # exact: compared in float64
    mask = torch.empty(shape2d, dtype=x.dtype, device=x.device)
    return mask.bernoulli_(1 - p).div_(1 - p).reshape(x.shape)


def run_and_compare(backend, x, w, b, a, bb, s, dtype, dropout_p=0.0, seed=None, magnitude_bound=False):
    x, a, bb = (t.clone().requires_grad_() for t in (x, a, bb))
    if b is not None:
        b = b.clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    y = lora_kernels.lora_linear(x, w, b, a, bb, s, dropout_p=dropout_p, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    mask = None if dropout_p == 0 else expected_dropout_mask(backend, seed, x, dropout_p)
    refs = reference_grads(x, w, b, a, bb, s, dy, mask)
    mags = reference_grads(x, w, b, a, bb, s, dy, mask, magnitude=True) if magnitude_bound else [None] * 5
    assert y.dtype == dtype and x.grad.dtype == dtype
    for out, ref, mag, what in zip(
        (y, x.grad, a.grad, bb.grad, None if b is None else b.grad), refs, mags, ("y", "dx", "dA", "dB", "dbias")
    ):
        if out is not None:
            assert_close(out, ref, dtype, what, magnitude=mag)
    assert w.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_reference(backend, dtype, shape, bias, poison):
    run_and_compare(backend, *make_problem(*shape, dtype, bias=bias), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_3d_input(backend, dtype, poison):
    run_and_compare(backend, *make_problem(9, 40, 24, 8, dtype, lead=(3,)), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input(backend, poison):
    x, w, b, a, bb, s = make_problem(21, 40, 24, 8, torch.float32)
    wide = torch.randn(21, 53, device=DEVICE)
    wide[:, 5:45] = x
    run_and_compare(backend, wide[:, 5:45], w, b, a, bb, s, torch.float32)  # row stride 53
    run_and_compare(backend, x.t().contiguous().t(), w, b, a, bb, s, torch.float32)  # column-major x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_gradients_use_the_same_mask(backend, dtype):
    run_and_compare(backend, *make_problem(19, 40, 24, 8, dtype), dtype, dropout_p=0.25, seed=1234)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M, K, N", [(3, 0, 4), (3, 5, 0), (0, 0, 0), (0, 5, 4)])
def test_zero_sized_dimensions(backend, M, K, N):
    """in_features = 0, out_features = 0 or no rows: exact results, no crash (nn.Linear allows them)."""
    x, w, b, a, bb, s = make_problem(M, K, N, 2, torch.float32)
    x, a, bb, b = (t.requires_grad_() for t in (x, a, bb, b))
    y = lora_kernels.lora_linear(x, w, b, a, bb, s, backend=backend)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b))  # the LoRA term is zero or empty
    y.sum().backward()
    assert x.grad.shape == (M, K) and a.grad.shape == (2, K) and bb.grad.shape == (N, 2)
    torch.testing.assert_close(x.grad, torch.ones(M, N, device=x.device) @ w)
    assert torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(bb.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, w, b, a, bb, s = make_problem(0, 40, 24, 8, torch.float32)
    x.requires_grad_()
    a.requires_grad_()
    y = lora_kernels.lora_linear(x, w, b, a, bb, s, backend=backend)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 40) and torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_that_requires_grad_gets_its_true_gradient(backend):
    x, w, b, a, bb, s = make_problem(11, 40, 24, 8, torch.float32)
    w.requires_grad_()
    y = lora_kernels.lora_linear(x, w, b, a, bb, s, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close(w.grad, dy.double().t() @ x.double(), torch.float32, "dW")


def test_auto_is_reference_on_cpu():
    from lora_kernels.dispatch import resolve

    assert resolve("auto", torch.zeros(1, 4)).backend == "reference"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backends_agree_with_reference_backend(backend, dtype):
    """Same inputs through a kernel backend and the reference backend, in the working dtype."""
    x, w, b, a, bb, s = make_problem(29, 72, 40, 16, dtype)
    y_kernel = lora_kernels.lora_linear(x, w, b, a, bb, s, backend=backend)
    y_ref = lora_kernels.lora_linear(x, w, b, a, bb, s, backend="reference")
    assert_close(y_kernel, y_ref.double(), dtype, "y vs reference backend")


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU with ~20 GB free")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_offsets_beyond_2_pow_31(backend):
    """x and dX with more than 2³¹ elements: row offsets must be 64-bit. Checked on the last rows."""
    K, N, r = 4096, 256, 16
    M = (1 << 31) // K + 64
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    a = (torch.randn(r, K, device="cuda", dtype=torch.bfloat16) / K**0.5).requires_grad_()
    bb = (torch.randn(N, r, device="cuda", dtype=torch.bfloat16) / r**0.5).requires_grad_()
    x.requires_grad_()
    y = lora_kernels.lora_linear(x, w, None, a, bb, 2.0, backend=backend)
    dy = torch.zeros_like(y)
    dy[-64:] = torch.randn(64, N, device="cuda", dtype=torch.bfloat16)
    y.backward(dy)
    tail = slice(M - 64, M)
    y_ref, dx_ref, _, _, _ = reference_grads(x[tail], w, None, a, bb, 2.0, dy[tail])
    assert_close(y[tail], y_ref, torch.bfloat16, "y tail")
    assert_close(x.grad[tail], dx_ref, torch.bfloat16, "dx tail")


@pytest.mark.skipif(DEVICE != "cuda" or "triton" not in KERNEL_BACKENDS, reason="auto picks among GPU backends")
def test_auto_follows_the_measured_policy():
    from lora_kernels.dispatch import (
        AUTO_CUDA_MAX_ROWS,
        AUTO_TRITON_MAX_ROWS,
        AUTO_TRITON_MAX_ROWS_FP32,
        AUTO_TRITON_MAX_ROWS_HIGH_RANK,
        resolve,
    )

    def pick(rows, dtype=torch.bfloat16, **kw):
        return resolve("auto", torch.empty(rows, 64, device="cuda", dtype=dtype), **kw).backend

    assert pick(AUTO_TRITON_MAX_ROWS) == "triton"
    assert pick(AUTO_TRITON_MAX_ROWS + 1) == "reference"
    assert pick(AUTO_TRITON_MAX_ROWS + 1, by_size=False) == "triton"  # dropout, multi-adapter batches
    assert pick(AUTO_TRITON_MAX_ROWS_FP32, torch.float32) == "triton"
    assert pick(AUTO_TRITON_MAX_ROWS_FP32 + 1, torch.float32) == "reference"
    assert pick(AUTO_TRITON_MAX_ROWS_HIGH_RANK, rank=64) == "triton"
    assert pick(AUTO_TRITON_MAX_ROWS_HIGH_RANK + 1, rank=64) == "reference"
    assert pick(AUTO_TRITON_MAX_ROWS_HIGH_RANK + 1, rank=16) == "triton"
    # inference at decode sizes: the CUDA decode kernel where it is built and its shape rules hold
    decode = "cuda" if "cuda" in KERNEL_BACKENDS else "triton"
    assert pick(AUTO_CUDA_MAX_ROWS, inference=True, out_features=4096) == decode
    assert pick(AUTO_CUDA_MAX_ROWS, inference=True, out_features=128) == "triton"
    assert pick(AUTO_CUDA_MAX_ROWS + 1, inference=True, out_features=4096) == "triton"
    assert pick(1, torch.float32, inference=True, out_features=4096) == "triton"
    assert pick(1, out_features=4096) == "triton"  # training: the CUDA backward is slower


@pytest.mark.skipif("cuda" not in KERNEL_BACKENDS, reason="needs the CUDA extension on a GPU")
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_auto_inference_at_decode_sizes_runs_the_cuda_kernel(M, dtype):
    """No autograd, ≤ 4 rows, out ≥ 256: auto runs (bit for bit) what backend="cuda" runs."""
    x, w, b, a, bb, s = make_problem(M, 264, 300, 8, dtype)
    with torch.no_grad():
        y = lora_kernels.lora_linear(x, w, b, a, bb, s)
        assert torch.equal(y, lora_kernels.lora_linear(x, w, b, a, bb, s, backend="cuda"))
    assert_close(y, reference_grads(x, w, b, a, bb, s, torch.ones_like(y))[0], dtype, "y")
