"""Property-based: hypothesis draws shape, dtype, layout, bias, dropout and backend; forward and all
gradients must match the float64 reference within the dtype's bound, relative to the magnitude of
the terms each output sums (shapes like K = N = r = 1 make single outputs cancel to ~0, where a
plain relative error means nothing). 500 examples per run."""

import torch
from conftest import BACKENDS, make_problem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_function import run_and_compare

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def problems(draw):
    return dict(
        M=draw(st.integers(0, 40)),
        K=draw(st.integers(0, 72)),
        N=draw(st.integers(0, 72)),
        r=draw(st.integers(1, 20)),
        dtype=draw(st.sampled_from(DTYPES)),
        bias=draw(st.booleans()),
        lead=draw(st.sampled_from([(), (2,), (1, 3)])),
        layout=draw(st.sampled_from(["dense", "row-strided", "col-major"])),
        backend=draw(st.sampled_from(BACKENDS)),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.3])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def with_layout(x, layout):
    if layout == "row-strided":  # a column slice of a wider tensor: row stride > K
        wide = torch.randn(*x.shape[:-1], x.shape[-1] + 5, dtype=x.dtype, device=x.device)
        wide[..., 2 : 2 + x.shape[-1]] = x
        return wide[..., 2 : 2 + x.shape[-1]]
    if layout == "col-major":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems())
def test_any_valid_input_matches_float64(p):
    torch.manual_seed(p["seed"])
    x, w, b, a, bb, s = make_problem(p["M"], p["K"], p["N"], p["r"], p["dtype"], bias=p["bias"], lead=p["lead"])
    x = with_layout(x, p["layout"])
    run_and_compare(
        p["backend"],
        x,
        w,
        b,
        a,
        bb,
        s,
        p["dtype"],
        dropout_p=p["dropout"],
        seed=p["seed"] if p["dropout"] else None,
        magnitude_bound=True,
    )
