"""An installed lora_kernels, used as a user would: run from outside the checkout (make test-package).
Imports the package, lists its backends, runs one lora_linear call with its gradients against plain
torch, and, where the build had a CUDA torch and nvcc, checks that the extension's ops are
registered."""

import os
import sys
from pathlib import Path

import torch

import lora_kernels

checkout = Path(__file__).resolve().parent.parent
where = Path(lora_kernels.__file__).resolve()
assert where.parent != checkout / "lora_kernels" and "site-packages" in where.parts, (
    f"imported {where}, not the installed package"
)
print(f"lora_kernels {lora_kernels.__version__} from {where.parent}; torch {torch.__version__}")
print("available backends (cpu):", lora_kernels.available_backends("cpu"))
x = torch.randn(5, 16, requires_grad=True)
w, a, b = torch.randn(8, 16), torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
y = lora_kernels.lora_linear(x, w, None, a, b, 2.0)
want = x @ w.t() + 2.0 * (x @ a.t()) @ b.t()
torch.testing.assert_close(y, want)
y.sum().backward()
assert x.grad is not None and a.grad is not None and b.grad is not None
expect_extension = os.environ.get("EXPECT_CUDA_EXTENSION") == "1"
loaded = lora_kernels.cuda.extension_loaded()
print("CUDA extension:", "loaded" if loaded else f"not loaded ({lora_kernels.cuda._LOAD_ERROR})")
if expect_extension:
    assert loaded, "the build had nvcc and a CUDA torch: the extension must be there"
    for op in ("cuda_forward", "cuda_backward"):
        assert hasattr(torch.ops.lora_kernels, op), op
    print("ops registered:", ", ".join(f"lora_kernels::{op}" for op in ("cuda_forward", "cuda_backward")))
sys.exit(0)
