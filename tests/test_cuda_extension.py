"""The CUDA extension is compiled, loads, registers its ops, and (on a GPU) is correct."""

import os
import shutil
import subprocess

import pytest
import torch
from conftest import DEVICE, assert_close, backend_contract_vs_float64, make_problem, reference_grads

import lora_kernels.cuda

EXPECT_BUILT = torch.version.cuda is not None and os.environ.get("LORA_KERNELS_SKIP_CUDA_BUILD") != "1"


@pytest.mark.skipif(not EXPECT_BUILT, reason="CPU-only torch or LORA_KERNELS_SKIP_CUDA_BUILD=1")
def test_extension_loads_and_registers_ops():
    assert lora_kernels.cuda.extension_loaded(), lora_kernels.cuda._LOAD_ERROR
    for op in ("cuda_forward", "cuda_backward"):
        schema = str(getattr(torch.ops.lora_kernels, op).default._schema)
        assert schema.startswith(f"lora_kernels::{op}(")


def find_cuobjdump():
    """cuobjdump from the CUDA toolkit, or the copy Triton's NVIDIA backend ships."""
    candidates = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.exists(c)), None)


@pytest.mark.skipif(not EXPECT_BUILT or find_cuobjdump() is None, reason="needs the built extension and cuobjdump")
def test_extension_holds_code_for_every_requested_arch():
    """setup.py's default targets (8.0 and 9.0a), or those TORCH_CUDA_ARCH_LIST asks for."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a").replace(",", ";").replace(" ", ";")
    wanted = ["sm_" + a.replace("+PTX", "").replace(".", "") for a in archs.split(";") if a.strip()]
    listing = subprocess.run(
        [find_cuobjdump(), "--list-elf", lora_kernels.cuda._C.__file__], capture_output=True, text=True, check=True
    ).stdout
    assert all(f"{arch}." in listing for arch in wanted), (wanted, listing)


ON_GPU = pytest.mark.skipif(DEVICE != "cuda" or not lora_kernels.cuda.extension_loaded(), reason="needs a GPU")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def contract_vs_float64(*args, **kwargs):
    backend_contract_vs_float64(lora_kernels.cuda, *args, **kwargs)


@ON_GPU
@pytest.mark.parametrize("r", [1, 2, 16, 17, 64, 100, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_rank_up_to_128(r, dtype, poison):
    contract_vs_float64(21, 48, 40, r, dtype)


# Each kernel path of csrc/: decode (M ≤ 32; on tensor cores at N ≥ 256, K split over blocks at
# M > 8), 64×64 and 128×128 tensor-core tiles, split-K of the skinny products, element-wise staging
# (K % 8 ≠ 0), M = 0.
@ON_GPU
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [
        (1, 4096, 4096, 16),
        (3, 50, 33, 1),
        (32, 1040, 72, 8),
        (24, 1040, 264, 8),
        (13, 4096, 4096, 16),
        (37, 70, 50, 12),
        (131, 100, 90, 8),
        (300, 520, 264, 16),
        (300, 1000, 520, 128),
        (0, 64, 64, 8),
    ],
    ids=lambda s: "x".join(map(str, s)),
)
def test_kernel_paths(shape, dtype, poison):
    contract_vs_float64(*shape, dtype)


def kernels_run(fn):
    """Names of the CUDA kernels ``fn()`` launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA}


ON_HOPPER = pytest.mark.skipif(
    DEVICE != "cuda" or not lora_kernels.cuda.extension_loaded() or torch.cuda.get_device_capability() != (9, 0),
    reason="needs an H100/H200",
)


@ON_HOPPER
def test_default_build_runs_wgmma_on_hopper():
    """setup.py's default arch list builds the sm_90a kernel, and an H100 runs it."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs is not None and ("9.0a" not in archs or "9.0;" in archs + ";"):
        pytest.skip(f"built for TORCH_CUDA_ARCH_LIST={archs}")
    assert lora_kernels.cuda.wgmma_supported()


# LORA_KERNELS_WGMMA=1: the products with at least 256 columns on the wgmma kernel. Over 64 rows on
# 128×256 tiles (y; dX when in_features ≥ 256 too, with W₀ and A transposed; dA at r = 128), split
# along K where the tiles are few; up to 64 rows computed transposed on 128×32 tiles (dX, and y from
# 9 rows: the decode kernel keeps 1-8).
@ON_HOPPER
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape",
    [
        (1, 4096, 4096, 16),
        (13, 4096, 11008, 16),
        (24, 1040, 264, 8),
        (50, 1000, 300, 4),
        (100, 1000, 300, 8),
        (128, 4096, 4096, 16),
        (160, 1000, 300, 8),
        (300, 520, 264, 16),
        (290, 264, 270, 4),
        (300, 1000, 520, 128),
        (600, 1024, 1040, 16),
        (1024, 4096, 11008, 16),
        (8192, 4096, 4096, 16),
        (4100, 4104, 4112, 64),
    ],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("loads", ["producer", "tma", "cp.async"])
def test_wgmma_kernel_paths(shape, dtype, loads, poison, monkeypatch):
    """LORA_KERNELS_WGMMA_LOADS: the warp-specialized persistent kernel fed by a TMA producer (the
    default), wgmma_gemm with TMA, or with cp.async (r = 4 always is: its rows are not 16-byte aligned)."""
    if not lora_kernels.cuda.wgmma_supported():
        pytest.skip("this build has no sm_90a code")
    monkeypatch.setenv("LORA_KERNELS_WGMMA", "1")
    monkeypatch.setenv("LORA_KERNELS_WGMMA_LOADS", loads)
    contract_vs_float64(*shape, dtype)
    x, w, b, a, bb, s = make_problem(*shape, dtype)
    y, xa = lora_kernels.cuda.forward(x, w, b, a, bb, s)
    launched = kernels_run(lambda: lora_kernels.cuda.backward(torch.randn_like(y), x, w, a, bb, xa, s))
    launched |= kernels_run(lambda: lora_kernels.cuda.forward(x, w, b, a, bb, s))
    assert any("wgmma_gemm" in k for k in launched), launched
    M, K, N, R = shape  # y (from 9 rows) or dX (N aligned too) can go to TMA
    tma_possible = K % 8 == 0 and R % 8 == 0 and (M > 8 or N % 8 == 0)
    assert any("wgmma_gemm_producer" in k for k in launched) == (loads == "producer" and tma_possible), launched


@ON_GPU
@pytest.mark.parametrize("M", [1, 16, 128, 1024, 8192])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_shapes(M, dtype, poison):
    contract_vs_float64(M, 4096, 11008, 16, dtype)


@ON_GPU
@pytest.mark.parametrize("M", [5, 200])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_input_precomputed_xa_and_unfused_dx(M, dtype, poison):
    contract_vs_float64(M, 72, 56, 8, dtype, strided_x=True)
    contract_vs_float64(M, 72, 56, 8, dtype, fuse_lora_dx=False, x_lora_given=True)


@ON_GPU
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 40, 24, 8), (19, 136, 300, 8), (200, 72, 56, 4), (130, 1040, 264, 16)], ids=str)
def test_fused_dropout_contract(shape, dtype, poison):
    """Dropout from a seed (decode, tensor-core and SIMT products): the mask is reference.dropout_keep's,
    the Triton kernels' mask, in xa, dA and dX's LoRA share."""
    contract_vs_float64(*shape, dtype, dropout_p=0.3)


@ON_GPU
def test_fused_dropout_checks_its_arguments():
    """(What the op keeps for backward with dropout: tests/test_memory_determinism.py.)"""
    M, K, N, r = 64, 48, 96, 4
    x, w, b, a, bb, s = make_problem(M, K, N, r, torch.float32)
    seed = torch.tensor([7], dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="needs seed"):
        lora_kernels.cuda.forward(x, w, b, a, bb, s, None, 0.1)
    with pytest.raises(RuntimeError, match="needs seed"):
        lora_kernels.cuda.forward(x, w, b, a, bb, s, None, 0.1, seed.int())
    with pytest.raises(RuntimeError, match="needs seed"):
        lora_kernels.cuda.backward(
            torch.randn(M, N, device="cuda"), x, w, a, bb, torch.randn(M, r, device="cuda"), s, True, 0.1
        )
    with pytest.raises(RuntimeError, match="not both"):
        lora_kernels.cuda.forward(x, w, b, a, bb, s, x, 0.1, seed)
    with pytest.raises(RuntimeError, match="x_lora must have x's shape"):
        lora_kernels.cuda.forward(x, w, b, a, bb, s, x[:-1])


@ON_GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_through_lora_linear_with_autograd(dtype, poison):
    x, w, b, a, bb, s = make_problem(37, 70, 50, 12, dtype)
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    y = lora_kernels.lora_linear(x, w, b, a, bb, s, backend="cuda")
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, da_ref, db_ref, _ = reference_grads(x, w, b, a, bb, s, dy)
    for out, ref, what in ((y, y_ref, "y"), (x.grad, dx_ref, "dx"), (a.grad, da_ref, "dA"), (bb.grad, db_ref, "dB")):
        assert_close(out, ref, dtype, what)


@ON_GPU
@pytest.mark.parametrize("M", [4, 600])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_multi_adapter_serving_shapes(M, dtype, poison):
    """8 adapters of rank 16 at 1024 → 1040: decode-sized and tensor-core batches, the masked g
    split along K (tests/test_multi.py covers the small and odd shapes on every backend)."""
    n, r, K, N = 8, 16, 1024, 1040
    x = torch.randn(M, K, dtype=dtype, device="cuda", requires_grad=True)
    w = torch.randn(N, K, dtype=dtype, device="cuda") / K**0.5
    a = (torch.randn(n, r, K, dtype=dtype, device="cuda") / K**0.5).requires_grad_()
    bb = (torch.randn(n, N, r, dtype=dtype, device="cuda") / r**0.5).requires_grad_()
    scales = torch.rand(n).add(0.5).tolist()
    ids = torch.randint(-1, n, (M,), device="cuda")
    y = lora_kernels.lora_linear_multi(x, w, None, a, bb, scales, ids, backend="cuda")
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, bb))
    ref = lora_kernels.lora_linear_multi_reference(x64, w.double(), None, a64, b64, scales, ids)
    ref.backward(dy.double())
    for out, want, what in (
        (y, ref, "y"),
        (x.grad, x64.grad, "dx"),
        (a.grad, a64.grad, "dA"),
        (bb.grad, b64.grad, "dB"),
    ):
        assert_close(out, want, dtype, what)


@ON_GPU
@pytest.mark.parametrize("M", [1, 7, 32])
def test_overlapped_decode_forward_equals_serial_launch_and_graph_replay(M, monkeypatch):
    """On sm_90+ y's decode kernel overlaps the xa kernel (programmatic dependent launch) and waits
    for xa only before the LoRA term: the result must be bit-identical to launching it after xa,
    call after call (a premature read of xa would show as a mismatch), and under CUDA-graph replay."""
    x, w, b, a, bb, s = make_problem(M, 4096, 4096, 16, torch.bfloat16)
    inputs = [torch.randn_like(x) for _ in range(20)]
    overlapped = [lora_kernels.cuda.forward(xi, w, b, a, bb, s)[0] for xi in inputs]
    monkeypatch.setenv("LORA_KERNELS_PDL", "0")
    serial = [lora_kernels.cuda.forward(xi, w, b, a, bb, s)[0] for xi in inputs]
    monkeypatch.delenv("LORA_KERNELS_PDL")
    for i, (got, want) in enumerate(zip(overlapped, serial)):
        assert torch.equal(got, want), f"call {i}"
    static_x = inputs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        lora_kernels.cuda.forward(static_x, w, b, a, bb, s)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = lora_kernels.cuda.forward(static_x, w, b, a, bb, s)[0]
    for xi, want in zip(inputs, serial):
        static_x.copy_(xi)
        graph.replay()
        assert torch.equal(static_y, want)
