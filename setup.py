"""Builds lora_kernels, with the CUDA extension lora_kernels._C when a CUDA torch and nvcc exist.

Install with ``pip install --no-build-isolation .`` so the build sees the torch you run with. The
build-time switches (LORA_KERNELS_SKIP_CUDA_BUILD, TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME) are
listed with every other switch in lora_kernels/_env.py and the README.
"""

import importlib.util
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(path, name):
    """A module of the package loaded by path: setup.py runs before the package (or torch) imports."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


env = _load("lora_kernels/_env.py", "lora_kernels_env")
VERSION = re.search(
    r'^__version__ = "([^"]+)"', open(os.path.join(HERE, "lora_kernels", "__init__.py")).read(), re.M
).group(1)


def has_sm90a(arch_list):
    """Whether a compute capability 9.0 GPU will run sm_90a code from this build: the list names 9.0a
    (or sm_90a) and not plain 9.0, whose code the GPU could load instead."""
    archs = {a.strip().lower().removesuffix("+ptx").replace("sm_", "") for a in arch_list.replace(" ", ";").split(";")}
    return bool(archs & {"9.0a", "90a"}) and not archs & {"9.0", "90"}


def cuda_extension():
    """(ext_modules, cmdclass, why-not) for the CUDA extension."""
    if env.enabled("LORA_KERNELS_SKIP_CUDA_BUILD"):
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
    arch_list = env.with_default("TORCH_CUDA_ARCH_LIST")  # torch's build reads it from the environment
    # torch picks the C++ standard. --resource-usage: ptxas's report per kernel (registers, spills,
    # serialized wgmma) in the build log, where tests/test_ptxas_report.py reads it (make install keeps it)
    nvcc_flags = ["-O3", "-lineinfo", "--resource-usage"]
    if has_sm90a(arch_list):
        nvcc_flags.append("-DLORA_KERNELS_HAS_SM90A")
    ext = CUDAExtension(
        name="lora_kernels._C",
        sources=[
            "csrc/bindings.cpp",
            "csrc/lora_gemm.cu",
            "csrc/lora_tensor_core.cu",
            "csrc/lora_wgmma.cu",
            "csrc/lora_decode.cu",
            "csrc/lora_dropout.cu",
        ],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension}, None


ext_modules, cmdclass, skipped = cuda_extension()
if skipped:
    print(f"lora_kernels: installing WITHOUT the CUDA extension: {skipped}. The Triton and reference backends work.")

setup(
    name="lora_kernels",
    version=VERSION,
    description="Fused LoRA forward and backward kernels (Triton and CUDA) with a drop-in nn.Linear replacement",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    packages=find_packages(include=["lora_kernels", "lora_kernels.*"]),
    # The range CI tests: Python 3.10 with torch 2.11 (the oldest; `make test-oldest`), Python 3.11
    # with torch 2.14.1 (`make test`); the GPU machines run Python 3.12 with torch 2.11 and triton 3.6.
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={
        "triton": ["triton>=3.6"],
        "peft": ["peft>=0.21.2", "transformers>=5.17", "safetensors"],
        "test": ["pytest", "hypothesis", "numpy"],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Environment :: GPU :: NVIDIA CUDA",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: C++",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
