"""lora_linear_multi: one adapter per row, fused, against the float64 loop-over-adapters reference."""

import pytest
import torch
from conftest import BACKENDS, DEVICE, assert_close

import lora_kernels

MULTI_BACKENDS = BACKENDS


def problem(M, K, N, r, n, dtype, lead=()):
    x = torch.randn(*lead, M, K, dtype=dtype, device=DEVICE)
    w = torch.randn(N, K, dtype=dtype, device=DEVICE) / K**0.5
    b = torch.randn(N, dtype=dtype, device=DEVICE)
    a = torch.randn(n, r, K, dtype=dtype, device=DEVICE) / K**0.5
    bb = torch.randn(n, N, r, dtype=dtype, device=DEVICE) / r**0.5
    scales = torch.rand(n).mul(3).add(0.5).tolist()
    ids = torch.randint(-1, n, (*lead, M), device=DEVICE)
    return x, w, b, a, bb, scales, ids


@pytest.mark.parametrize("backend", MULTI_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(37, 48, 40, 4, 8), (1, 40, 24, 8, 2), (20, 33, 17, 3, 5)], ids=str)
def test_multi_matches_float64_reference(backend, dtype, shape, poison):
    x, w, b, a, bb, scales, ids = problem(*shape, dtype)
    x, a, bb, b = (t.clone().requires_grad_() for t in (x, a, bb, b))
    y = lora_kernels.lora_linear_multi(x, w, b, a, bb, scales, ids, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, a64, b64, bias64 = (t.detach().double().requires_grad_() for t in (x, a, bb, b))
    ref = lora_kernels.lora_linear_multi_reference(x64, w.double(), bias64, a64, b64, scales, ids)
    ref.backward(dy.double())
    for out, want, what in (
        (y, ref, "y"),
        (x.grad, x64.grad, "dx"),
        (a.grad, a64.grad, "dA"),
        (bb.grad, b64.grad, "dB"),
        (b.grad, bias64.grad, "dbias"),
    ):
        assert_close(out, want, dtype, what)


@pytest.mark.parametrize("backend", MULTI_BACKENDS)
def test_rows_without_adapter_get_the_base_output_and_single_adapter_matches_lora_linear(backend):
    x, w, b, a, bb, scales, ids = problem(12, 40, 24, 4, 3, torch.float32, lead=(2,))
    base = torch.nn.functional.linear(x, w, b)
    none = torch.full_like(ids, -1)
    torch.testing.assert_close(lora_kernels.lora_linear_multi(x, w, b, a, bb, scales, none, backend=backend), base)
    ones = torch.ones_like(ids)
    single = lora_kernels.lora_linear(x, w, b, a[1], bb[1], scales[1], backend=backend)
    torch.testing.assert_close(
        lora_kernels.lora_linear_multi(x, w, b, a, bb, scales, ones, backend=backend), single, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("backend", MULTI_BACKENDS)
@pytest.mark.parametrize("M, K, N", [(3, 0, 4), (3, 5, 0), (0, 5, 4)])
def test_multi_zero_sized_dimensions(backend, M, K, N):
    x, w, b, a, bb, scales, ids = problem(M, K, N, 2, 3, torch.float32)
    x.requires_grad_()
    y = lora_kernels.lora_linear_multi(x, w, b, a, bb, scales, ids, backend=backend)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b))
    y.sum().backward()
    assert x.grad.shape == (M, K)


def test_multi_bad_arguments():
    x, w, b, a, bb, scales, ids = problem(6, 16, 8, 2, 3, torch.float32)
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 3\)"):
        lora_kernels.lora_linear_multi(x, w, b, a, bb, scales, torch.full_like(ids, 3))
    with pytest.raises(ValueError, match="adapter_ids must have shape"):
        lora_kernels.lora_linear_multi(x, w, b, a, bb, scales, ids[:3])
    with pytest.raises(TypeError, match="integer tensor"):
        lora_kernels.lora_linear_multi(x, w, b, a, bb, scales, ids.float())
    with pytest.raises(ValueError, match="scales must be 3 finite numbers"):
        lora_kernels.lora_linear_multi(x, w, b, a, bb, scales[:2], ids)
    with pytest.raises(ValueError, match="lora_A must be a"):
        lora_kernels.lora_linear_multi(x, w, b, a[0], bb, scales, ids)
    with pytest.raises(ValueError, match="lora_B must have shape|lora_B must be a"):
        lora_kernels.lora_linear_multi(x, w, b, a, bb[:, :, :1], scales, ids)


@pytest.mark.parametrize("backend", MULTI_BACKENDS)
def test_lora_linear_named_adapters_mixed_batch(backend):
    layer = lora_kernels.LoRALinear(40, 24, r=4, alpha=8, backend=backend, device=DEVICE)
    other = layer.add_adapter("other", r=6, alpha=3)
    for w in (layer.lora_B.weight, other["lora_B"].weight):
        torch.nn.init.normal_(w)
    layer.eval()
    x = torch.randn(3, 5, 40, device=DEVICE, requires_grad=True)
    names = ["other", "__base__", "default"]
    y = layer(x, adapter_names=names)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    other_term = 0.5 * (x @ other["lora_A"].weight.t()) @ other["lora_B"].weight.t()
    default_term = layer.scaling * (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    want = torch.stack([base[0] + other_term[0], base[1], base[2] + default_term[2]])
    assert_close(y, want.double(), torch.float32, "mixed batch")
    y.square().sum().backward()  # gradients reach each adapter through the stacking
    assert other["lora_A"].weight.grad is not None and layer.lora_B.weight.grad is not None
    torch.testing.assert_close(layer(x[2:], adapter_names=["default"]), layer(x[2:]))
    with pytest.raises(ValueError, match="unknown adapter names"):
        layer(x, adapter_names=["nope", "default", "default"])
    with pytest.raises(ValueError, match="one adapter per sample"):
        layer(x, adapter_names=["default"])
    with pytest.raises(ValueError, match="is taken"):
        layer.add_adapter("other")
    assert sorted(lora_kernels.lora_state_dict(torch.nn.Sequential(layer))) == [
        "0.extra_adapters.other.lora_A.weight",
        "0.extra_adapters.other.lora_B.weight",
        "0.lora_A.weight",
        "0.lora_B.weight",
    ]
