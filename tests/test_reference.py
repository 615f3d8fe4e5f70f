"""The split forward/backward of reference.py agrees with autograd of the one-line definition."""
import torch

from lora_kernels import LoRALinearFunction, reference
from conftest import make_problem, reference_grads


def test_split_math_matches_autograd_definition():
    x, w, b, a, bb, s = make_problem(13, 24, 20, 5, torch.float64)
    dy = torch.randn(13, 20, dtype=torch.float64)
    y_ref, dx_ref, da_ref, db_ref, _ = reference_grads(x, w, b, a, bb, s, dy)
    y, xa = reference.forward(x, w, b, a, bb, s)
    dx, da, db, g = reference.backward(dy, x, w, a, bb, xa, s)
    for out, ref in ((y, y_ref), (xa, s * x @ a.t()), (dx, dx_ref), (da, da_ref), (db, db_ref), (g, dy @ bb)):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64_function():
    x, w, b, a, bb, s = make_problem(5, 7, 6, 3, torch.float64)
    inputs = (x.requires_grad_(), w, b.requires_grad_(), a.requires_grad_(), bb.requires_grad_(), s, 0.0, "reference")
    assert torch.autograd.gradcheck(LoRALinearFunction.apply, inputs)


def test_gradcheck_float64_weight_gradient_when_asked():
    x, w, b, a, bb, s = make_problem(4, 6, 5, 2, torch.float64)
    inputs = (x.requires_grad_(), w.requires_grad_(), b, a.requires_grad_(), bb.requires_grad_(), s, 0.0, "reference")
    assert torch.autograd.gradcheck(LoRALinearFunction.apply, inputs)


def test_lora_scale():
    assert reference.lora_scale(8, 16) == 2.0
    assert reference.lora_scale(16, 16, use_rslora=True) == 4.0
