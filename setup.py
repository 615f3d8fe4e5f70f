"""Builds lora_kernels, with the CUDA extension lora_kernels._C when a CUDA torch and nvcc exist.

Environment switches:
  LORA_KERNELS_SKIP_CUDA_BUILD=1   install the pure-Python package (Triton and reference backends)
  TORCH_CUDA_ARCH_LIST             target GPUs (default "8.0;9.0a": A100 and H100/H200). The wgmma
                                   kernel (csrc/lora_wgmma.cu) is built when the list has 9.0a and
                                   not plain 9.0 (which H100s would then run instead).
  MAX_JOBS                         parallel compile jobs for ninja
Install with ``pip install --no-build-isolation .`` so the build sees the torch you run with.
"""
import os

from setuptools import find_packages, setup


def has_sm90a(arch_list):
    """Whether a compute capability 9.0 GPU will run sm_90a code from this build: the list names 9.0a
    (or sm_90a) and not plain 9.0, whose code the GPU could load instead."""
    archs = {a.strip().lower().removesuffix("+ptx").replace("sm_", "") for a in arch_list.replace(" ", ";").split(";")}
    return bool(archs & {"9.0a", "90a"}) and not archs & {"9.0", "90"}


def cuda_extension():
    """(ext_modules, cmdclass, why-not) for the CUDA extension."""
    if os.environ.get("LORA_KERNELS_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}, "LORA_KERNELS_SKIP_CUDA_BUILD=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}, "torch is not importable at build time (use pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None:
        return [], {}, "nvcc was not found (set CUDA_HOME)"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    nvcc_flags = ["-O3", "-lineinfo"]  # torch picks the C++ standard
    if has_sm90a(os.environ["TORCH_CUDA_ARCH_LIST"]):
        nvcc_flags.append("-DLORA_KERNELS_HAS_SM90A")
    ext = CUDAExtension(
        name="lora_kernels._C",
        sources=["csrc/bindings.cpp", "csrc/lora_gemm.cu", "csrc/lora_tensor_core.cu", "csrc/lora_wgmma.cu",
                 "csrc/lora_decode.cu", "csrc/lora_dropout.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension}, None


ext_modules, cmdclass, skipped = cuda_extension()
if skipped:
    print(f"lora_kernels: installing WITHOUT the CUDA extension: {skipped}. The Triton and reference backends work.")

setup(
    name="lora_kernels",
    version="0.1.0",
    description="Fused LoRA forward and backward kernels (Triton and CUDA) with a drop-in nn.Linear replacement",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lora_kernels", "lora_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest", "hypothesis"], "bench": ["pytest-benchmark"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
