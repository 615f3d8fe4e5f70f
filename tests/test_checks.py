"""Bad input gets a clear error that names the argument."""

import pytest
import torch
from conftest import make_problem

from lora_kernels import LoRALinear, lora_linear


def args(**override):
    x, w, b, a, bb, s = make_problem(4, 8, 6, 2, torch.float32, device="cpu")
    kw = dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb, scale=s)
    kw.update(override)
    return kw


@pytest.mark.parametrize(
    "override, error, pattern",
    [
        (dict(x=torch.randn(4, 9)), ValueError, "x has 9 features"),
        (dict(lora_A=torch.randn(2, 9)), ValueError, "lora_A must have shape"),
        (dict(lora_B=torch.randn(6, 3)), ValueError, "lora_B must have shape"),
        (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), ValueError, "r=0"),
        (dict(bias=torch.randn(7)), ValueError, "bias must have shape"),
        (dict(weight=torch.randn(6, 8, dtype=torch.float64)), TypeError, "weight has dtype torch.float64"),
        (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "x must be a floating-point"),
        (dict(lora_A=[[1.0]]), TypeError, "lora_A must be a torch.Tensor"),
        (dict(scale=float("nan")), ValueError, "scale must be finite"),
        (dict(scale="2"), TypeError, "scale must be a real number"),
        (dict(weight=torch.randn(6, 8, device="meta")), ValueError, "weight is on meta"),
    ],
)
def test_bad_arguments(override, error, pattern):
    with pytest.raises(error, match=pattern):
        lora_linear(**args(**override))


def test_bad_backend_and_dropout():
    with pytest.raises(ValueError, match="backend must be one of"):
        lora_linear(**args(), backend="cutlass")
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(**args(), dropout_p=1.0)


def test_unavailable_backend_says_why():
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run here: .*CUDA"):
        lora_linear(**args(), backend="cuda")


def test_layer_arguments():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoRALinear(8, 6, r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(8, 6, dropout=1.5)
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        LoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1))
