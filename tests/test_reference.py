"""The split forward/backward of reference.py agrees with autograd of the one-line definition."""

import torch
from conftest import make_problem, reference_grads

from lora_kernels import LoRALinearFunction, reference


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


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox-4×32-10 (kat_vectors)."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, want in cases:
        got = reference.philox4x32(*(torch.tensor([c]) for c in counter), *key)
        assert [int(v) for v in got] == list(want)


def test_dropout_keep_statistics():
    p, M, K = 0.1, 300, 200
    keep = reference.dropout_keep(20261123, M, K, p)
    sigma = (p * (1 - p) / (M * K)) ** 0.5
    assert keep.shape == (M, K) and abs(keep.double().mean().item() - (1 - p)) < 5 * sigma
    assert torch.equal(keep, reference.dropout_keep(20261123, M, K, p))
    assert not torch.equal(keep, reference.dropout_keep(20261124, M, K, p))
    assert not reference.dropout_keep(1, 4, 4, 1.0).any() and reference.dropout_keep(1, 4, 4, 0.0).all()
