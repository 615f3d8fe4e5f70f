"""The CUDA kernels of csrc/, run on the CPU by tests/cuda_emulation/emulator.h, against float64.

This is how the CUDA backend's kernels (decode GEMV, tensor-core mma.sync and wgmma GEMMs, SIMT) are
checked on machines without a GPU: the unchanged kernel sources are compiled with g++, every CUDA
thread a fiber (see emulator.h), the warp-collective instructions (ldmatrix, mma.sync, shuffles; wgmma per
warpgroup) computed as the PTX ISA defines them per lane, cp.async landing only at its wait and
TMA boxes at their mbarrier's. Each test runs the six products of
one forward + backward exactly as csrc/bindings.cpp composes them (same operands, strides and
scales), on fresh random inputs, into NaN-poisoned outputs. Every launch must also pass the
emulator's shared-memory checks (bounds, alignment, races; see emulator.h), and every tensor sits
between NaN guard regions: a read past its end turns the result into NaN, a write past it changes
the guard. On a GPU, tests/test_cuda_extension.py runs the real thing.
"""

import ctypes
import hashlib
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import assert_close

from lora_kernels.reference import dropout_keep

ROOT = Path(__file__).resolve().parent.parent
SOURCES = (
    sorted((ROOT / "csrc").glob("*.c*"))
    + sorted((ROOT / "csrc").glob("*.h"))
    + sorted((ROOT / "tests" / "cuda_emulation").glob("*"))
)
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SIMT, TENSOR_CORE, DECODE, WGMMA = 0, 1, 2, 3


def build_library():
    """Compile tests/cuda_emulation/ (the kernels, and the emulator's own faulty test kernels) once
    per source version (cached in /tmp)."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES if p.is_file())).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / "lora_kernels_emulation" / f"emulated_gemm_{digest}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [
            shutil.which("g++") or "g++",
            "-std=c++20",
            "-O2",
            "-pthread",
            "-shared",
            "-fPIC",
            f"-I{CUDA_INCLUDE}",
            f"-I{ROOT / 'csrc'}",
            str(ROOT / "tests" / "cuda_emulation" / "emulated_gemm.cpp"),
            str(ROOT / "tests" / "cuda_emulation" / "faulty_kernels.cpp"),
            "-o",
            str(tmp),
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        tmp.rename(out)
    lib = ctypes.CDLL(str(out))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    gemm_args = [
        ctypes.c_int,
        i64,
        i64,
        i64,
        i64,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        ctypes.POINTER(i64),
        ctypes.c_float,
        ctypes.c_float,
        ptr,
        ptr,
        ptr,
        i64,
        i64,
        ctypes.c_bool,
    ]
    for entry in (lib.emulated_gemm, lib.chosen_kernel, lib.workspace_elems, lib.wgmma_staged_epilogue):
        entry.argtypes = gemm_args
    lib.workspace_elems.restype = i64
    lib.wgmma_staged_epilogue.restype = ctypes.c_bool
    lib.run_faulty_kernel.argtypes = [ctypes.c_int, ctypes.c_bool]
    lib.run_block_index.argtypes = [ptr, ctypes.c_int]
    lib.emulation_error.restype = ctypes.c_char_p
    lib.emulated_launches.argtypes = [ctypes.POINTER(i64), ctypes.c_int]
    lib.emulated_dropout.argtypes = [
        ctypes.c_int,
        i64,
        i64,
        ptr,
        i64,
        i64,
        ptr,
        i64,
        ptr,
        ctypes.c_double,
        ctypes.c_bool,
    ]
    return lib


def launches(lib):
    """The emulated launches since the last call: (grid x, y, z, threads per block) each."""
    out = (ctypes.c_int64 * 64)()
    count = lib.emulated_launches(out, 16)
    return [tuple(out[4 * i : 4 * i + 4]) for i in range(min(count, 16))]


@pytest.fixture(scope="module")
def lib():
    if shutil.which("g++") is None or not (CUDA_INCLUDE / "cuda_bf16.h").exists():
        pytest.skip("needs g++ and the CUDA headers (CUDA_HOME) to build the emulation")
    return build_library()


class Gemm:
    """C = keep ⊙ (alpha·P·Q (+ alpha2·P2·Q2)) (+ bias) through the emulated launch_gemm, with the
    split-K scratch it asks for (NaN-poisoned, as bindings.cpp's is uninitialised); records the
    kernel used, whether K was split, whether a wgmma kernel would stage its epilogue through
    shared memory (16-byte stores) and the launches (grid, threads per block). keep: the
    multi-adapter mask of ``adapters`` = (ids int32, scales float32, rank), or 1."""

    def __init__(self, lib):
        self.lib, self.kernels, self.split, self.staged, self.launches = lib, [], [], [], []

    def __call__(self, C, P, Q, alpha, P2=None, Q2=None, alpha2=0.0, bias=None, adapters=None, overlap_prior=False):
        dtype = DTYPE_CODE[C.dtype]
        K2 = 0 if P2 is None else P2.shape[1]
        strides = [s for t in (P, Q, P2, Q2) for s in (t.stride() if t is not None else (0, 0))] + list(C.stride())
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        M, N, K = C.shape[0], C.shape[1], P.shape[1]
        ids, scales, rank = adapters if adapters is not None else (None, None, 0)
        args = lambda workspace: (
            dtype,
            M,
            N,
            K,
            K2,
            ptr(P),
            ptr(Q),
            ptr(P2),
            ptr(Q2),
            ptr(bias),
            ptr(C),  # noqa: E731
            (ctypes.c_int64 * 10)(*strides),
            alpha,
            alpha2,
            ptr(workspace),
            ptr(ids),
            ptr(scales),
            0 if scales is None else scales.numel(),
            rank,
            overlap_prior,
        )
        scratch = self.lib.workspace_elems(*args(None))
        workspace = poisoned(scratch, dtype=torch.float32) if scratch else None
        launches(self.lib)  # (forget earlier ones)
        err = self.lib.emulated_gemm(*args(workspace))
        self.launches.append(launches(self.lib))
        assert err == 0, f"launch_gemm returned cudaError {err}"
        problem = self.lib.emulation_error().decode()
        assert not problem, f"{M}×{K}→{N} (K2 = {K2}): {problem}"
        for out in (C, workspace):
            if out is not None and out.is_contiguous():  # (a slice's caller checks the whole)
                assert_guards_intact(out)
        self.kernels.append(self.lib.chosen_kernel(*args(workspace)))
        self.split.append(scratch > 0)
        self.staged.append(self.lib.wgmma_staged_epilogue(*args(workspace)))
        return C


GUARD = 64  # elements of NaN before and after every tensor (a multiple of 16 bytes in every dtype)


def guarded(t):
    """A copy of ``t`` inside a NaN-filled buffer with GUARD elements on either side, as 16-byte
    aligned as torch's own allocations: an out-of-bounds read gets NaN, which reaches the result
    (integer tensors: the most negative value)."""
    poison = float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).min
    buffer = torch.full((t.numel() + 2 * GUARD,), poison, dtype=t.dtype)
    inner = buffer[GUARD : GUARD + t.numel()].view(t.shape)
    return inner.copy_(t)


def assert_guards_intact(t):
    """No kernel wrote outside ``t`` (contiguous, made by guarded or poisoned): its guards are still NaN."""
    if t is None:
        return
    whole = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
    start, end = t.storage_offset(), t.storage_offset() + t.numel()
    outside = torch.cat([whole[:start], whole[end:]])
    assert outside.numel() == 2 * GUARD and outside.isnan().all(), "a kernel wrote past the end of its output"


def poisoned(*shape, dtype):
    return guarded(torch.full(shape, float("nan"), dtype=dtype))


def launch_dropout(lib, out, src, seed, p, accumulate=False):
    """out = keep ⊙ src / (1 − p) (+ out) through the emulated launch_dropout; seed: int64 (1,)."""
    err = lib.emulated_dropout(
        DTYPE_CODE[out.dtype],
        src.shape[0],
        src.shape[1],
        src.data_ptr(),
        *src.stride(),
        out.data_ptr(),
        out.stride(0),
        seed.data_ptr(),
        p,
        accumulate,
    )
    assert err == 0, f"launch_dropout returned cudaError {err}"
    problem = lib.emulation_error().decode()
    assert not problem, problem
    assert_guards_intact(out)
    return out


def run_forward_backward(gemm, x, w, b, a, bb, s, dy, adapters=None, dropout=None):
    """csrc/bindings.cpp's forward and backward, product by product (multi-adapter: xa and g
    masked). dropout = (seed tensor, p): x is dropped into a scratch copy for xa and again for dA,
    and dX = dY·W₀ then + keep ⊙ s·g·A / (1 − p) (launch_dropout's accumulate)."""
    M, N, R = x.shape[0], w.shape[0], a.shape[0]
    dropped = lambda: launch_dropout(gemm.lib, poisoned(*x.shape, dtype=x.dtype), x, *dropout)  # noqa: E731
    x_lora = x if dropout is None else dropped()  # forward's scratch
    xa = gemm(poisoned(M, R, dtype=x.dtype), x_lora, a.t(), s, adapters=adapters)  # xa = s·x·Aᵀ
    y = gemm(
        poisoned(M, N, dtype=x.dtype),
        x,
        w.t(),
        1.0,
        xa,
        bb.t(),
        1.0,
        b,  # y = x·W₀ᵀ + xa·Bᵀ + b
        overlap_prior=True,
    )  # as bindings.cpp launches it on sm_90+
    g = gemm(poisoned(M, R, dtype=x.dtype), dy, bb, 1.0, adapters=adapters)  # g = dY·B
    if dropout is None:
        dx = gemm(poisoned(*x.shape, dtype=x.dtype), dy, w, 1.0, g, a, s)  # dX = dY·W₀ + s·g·A
    else:
        dx = gemm(poisoned(*x.shape, dtype=x.dtype), dy, w, 1.0)  # dY·W₀ ...
        lora_dx = gemm(poisoned(*x.shape, dtype=x.dtype), g, a, s)  # ... + keep ⊙ s·g·A
        launch_dropout(gemm.lib, dx, lora_dx, *dropout, accumulate=True)
        x_lora = dropped()  # backward's scratch
    da = gemm(poisoned(*a.shape, dtype=x.dtype), g.t(), x_lora, s)  # dA = s·gᵀ·x
    db = gemm(poisoned(*bb.shape, dtype=x.dtype), dy.t(), xa, 1.0)  # dB = dYᵀ·xa
    return xa, y, g, dx, da, db


def check_against_float64(gemm, M, K, N, R, dtype, x=None, n_adapters=0, dropout_p=0.0):
    """Each product against float64 math on the same (rounded) inputs, including the intermediates
    xa and g the kernels produced, so every check isolates one launch. n_adapters > 0: R is
    n_adapters stacked adapters and each row of x has a random one (or none). dropout_p > 0: with
    dropout from a seed, against reference.dropout_keep's mask."""
    x = guarded(torch.randn(M, K, dtype=dtype)) if x is None else x
    w = guarded((torch.randn(N, K) / K**0.5).to(dtype))
    b = guarded(torch.randn(N).to(dtype))
    a = guarded((torch.randn(R, K) / K**0.5).to(dtype))
    bb = guarded((torch.randn(N, R) / R**0.5).to(dtype))
    dy = guarded(torch.randn(M, N).to(dtype))
    s = 2.0
    keep, adapters = torch.ones(M, R, dtype=torch.float64), None
    if n_adapters:
        rank = R // n_adapters
        ids = guarded(torch.randint(-1, n_adapters, (M,), dtype=torch.int32))
        scales = guarded(torch.rand(n_adapters) + 0.5)
        own_columns = (torch.arange(R) // rank)[None, :] == ids[:, None].long()  # never true for id −1
        keep = torch.where(own_columns, scales.double()[ids.long()][:, None], 0.0)
        adapters = (ids, scales, rank)
    mask, dropout = 1.0, None  # the scaled keep-mask of dropout(x)
    if dropout_p:
        seed = 20261123
        mask = dropout_keep(seed, M, K, dropout_p).double() / (1 - dropout_p)
        dropout = (guarded(torch.tensor([seed], dtype=torch.int64)), dropout_p)
    xa, y, g, dx, da, db = run_forward_backward(gemm, x, w, b, a, bb, s, dy, adapters, dropout)
    d = lambda t: t.double()  # noqa: E731
    xl = d(x) * mask
    expected = {
        "xa": (xa, keep * (s * xl @ d(a).t()), keep.abs() * (s * xl.abs() @ d(a).abs().t())),
        "y": (
            y,
            d(x) @ d(w).t() + d(xa) @ d(bb).t() + d(b),
            d(x).abs() @ d(w).abs().t() + d(xa).abs() @ d(bb).abs().t() + d(b).abs(),
        ),
        "g": (g, keep * (d(dy) @ d(bb)), keep.abs() * (d(dy).abs() @ d(bb).abs())),
        "dx": (
            dx,
            d(dy) @ d(w) + mask * (s * d(g) @ d(a)),
            d(dy).abs() @ d(w).abs() + mask * (s * d(g).abs() @ d(a).abs()),
        ),
        "dA": (da, s * d(g).t() @ xl, s * d(g).abs().t() @ xl.abs()),
        "dB": (db, d(dy).t() @ d(xa), d(dy).abs().t() @ d(xa).abs()),
    }
    case = f"{M}×{K}→{N}, r={R}" + (f", dropout {dropout_p}" if dropout_p else "")
    for what, (out, ref, magnitude) in expected.items():
        assert_close(out, ref, dtype, f"{what} ({case})", magnitude=magnitude)


# (M, K, N, R): decode sizes (M ≤ 32), both tensor-core tile configs, ragged edges everywhere,
# K not a multiple of 8 (element-wise staging instead of cp.async), r = 1 and r = 4 (unaligned B).
SHAPES = [
    (1, 136, 72, 8),  # decode; backward products on 64×64 tensor-core tiles
    (3, 50, 33, 1),  # decode with K % 8 ≠ 0 (scalar tails), r = 1
    (16, 264, 40, 16),  # decode, K-split columns (N < 2048)
    (32, 64, 24, 8),  # decode's largest M
    (37, 88, 70, 4),  # tensor cores, 64×64 tiles, every edge ragged, r = 4
    (67, 50, 45, 12),  # tensor cores with element-wise staging (K = 50: rows not 16-byte aligned)
    (300, 72, 264, 16),  # tensor cores, 128×128 tiles (M, N > 256); gᵀ·x and dYᵀ·xa split over M
    (40, 520, 64, 8),  # x·Aᵀ split along K
    (8, 64, 264, 8),  # dX = dY·W₀ + s·g·A split along N, one split crossing into g·A; y on tensor cores
    (8, 64, 128, 128),  # dX split exactly where dY·W₀'s tiles end and g·A's begin (r = 128)
    (2, 520, 270, 4),  # decode on tensor cores (16-bit, N ≥ 256): one x tile, 17 K slices
    (19, 136, 300, 8),  # decode on tensor cores: three x tiles, 128 columns per block, the last K slice 8 wide
    (32, 264, 257, 16),  # decode on tensor cores: four x tiles, a block with one column
    (24, 1040, 264, 8),  # decode on tensor cores at M > 8 split along K over 4 blocks, then split_k_reduce
]


DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def shape_dtype_cases(shapes):
    """(shape, dtype) for every shape in every dtype."""
    return [
        pytest.param(shape, dtype, id=f"{'x'.join(map(str, shape))}-{dtype}") for shape in shapes for dtype in DTYPES
    ]


@pytest.mark.parametrize("shape, dtype", shape_dtype_cases(SHAPES))
def test_emulated_kernels_match_float64(lib, shape, dtype):
    torch.manual_seed(hash((shape, str(dtype))) % 2**31)
    gemm = Gemm(lib)
    check_against_float64(gemm, *shape, dtype)
    M = shape[0]
    # the products meant for each kernel got it: forward decode-sized → decode; 16-bit → tensor cores
    want_forward = DECODE if M <= 32 else (SIMT if dtype == torch.float32 else TENSOR_CORE)
    assert gemm.kernels[:2] == [want_forward] * 2, gemm.kernels
    if M > 32 and dtype != torch.float32:
        assert gemm.kernels == [TENSOR_CORE] * 6, gemm.kernels
    if shape == (40, 520, 64, 8) and dtype != torch.float32:
        assert gemm.split[:2] == [True, True], gemm.split  # x·Aᵀ and y: K = 520
    if shape[0] == 300 and dtype != torch.float32:
        assert gemm.split[4:] == [True, True], gemm.split  # dA, dB: K = M = 300
    if shape[:2] == (8, 64) and dtype != torch.float32:
        assert gemm.split[3], gemm.split  # dX
    if shape == (24, 1040, 264, 8) and dtype != torch.float32:
        assert gemm.split[1], gemm.split  # y: decode on tensor cores, K split over blocks


# (M, K, N, n_adapters · rank, n_adapters): the mask in each kernel's epilogue (both decode variants,
# tensor cores unsplit and in split_k_reduce, SIMT for fp32)
MULTI_ADAPTER_SHAPES = [
    (3, 72, 40, 12, 3),  # decode: xa, y; g and the rest on the tensor cores
    (70, 88, 72, 15, 5),  # tensor cores, ragged tiles; rank 3, so an adapter boundary splits a column pair
    (40, 520, 264, 24, 3),  # x·Aᵀ and dY·B split along K: the mask applied in split_k_reduce
    (6, 72, 40, 256, 32),  # 32 adapters × rank 8: xa (N = 256) on decode's tensor-core variant
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", MULTI_ADAPTER_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_multi_adapter_products_match_float64(lib, shape, dtype):
    """Row m of xa and g keeps only its adapter's columns times its scale (−1: none)."""
    torch.manual_seed(hash((shape, str(dtype))) % 2**31)
    gemm = Gemm(lib)
    *dims, n_adapters = shape
    check_against_float64(gemm, *dims, dtype, n_adapters=n_adapters)
    if shape[0] == 40 and dtype != torch.float32:
        assert gemm.split[0] and gemm.split[2], gemm.split  # the masked xa and g went through split_k_reduce


# (M, K, N, R, emulated SMs): the products of more than 64 rows and at least 256 columns on the wgmma kernel.
WGMMA_SHAPES = [
    (300, 72, 264, 16, 8),  # y: K-major operands, one ragged K tile then the LoRA tile
    (290, 264, 270, 16, 2),  # y over 5 K tiles; dX = dY·W₀ + s·g·A: W₀ and A MN-major (transposed wgmma);
    # a 2-SM GPU: the producer kernel's blocks take 3 tiles each
    (260, 136, 520, 4, 8),  # r = 4: B and A staged element by element; three ragged column tiles
    (300, 520, 264, 8, 64),  # a 64-SM GPU: y and dX split along K, then split_k_reduce
    (130, 264, 300, 16, 64),  # one 128-row tile and a ragged one, split along K across the LoRA tile
    (70, 264, 300, 8, 8),  # 70 rows: one part-padded 128-row tile
]


PRODUCER_THREADS = 384  # wgmma_gemm_producer's block: two consumer warpgroups and a producer one


def check_wgmma_launches(gemm, loads, products, sms):
    """The wgmma products ({index into gemm's calls: whether TMA can copy all its operands}) ran the
    kernel LORA_KERNELS_WGMMA_LOADS asked for: the producer kernel (persistent: one row of at most
    `sms` blocks) where TMA can, else wgmma_gemm (one block per tile and split: grid x, y, z). TMA
    needs 16-byte aligned rows: x, W₀ and A (K), xa, B and g (R), dY (N) a multiple of 8."""
    for i, tma_possible in products.items():
        threads = {launch[3] for launch in gemm.launches[i]}
        if loads == "producer" and tma_possible:
            assert PRODUCER_THREADS in threads, (i, gemm.launches[i])
            for grid_x, grid_y, grid_z, n in gemm.launches[i]:
                assert n != PRODUCER_THREADS or (grid_x <= sms and grid_y == grid_z == 1), gemm.launches[i]
        else:
            assert PRODUCER_THREADS not in threads, (i, gemm.launches[i])


@pytest.mark.parametrize("loads", ["producer", "tma", "cp.async"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", WGMMA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_wgmma_matches_float64(lib, shape, dtype, loads, monkeypatch):
    """LORA_KERNELS_WGMMA=1 (on an sm_90a build running on an H100): the large products on wgmma,
    their tiles copied by TMA where every operand allows it (r = 4 does not: cp.async), from a
    producer warpgroup (the default) or in step with the multiplication (LORA_KERNELS_WGMMA_LOADS=tma),
    or always by cp.async (=cp.async)."""
    monkeypatch.setenv("LORA_KERNELS_WGMMA", "1")
    monkeypatch.setenv("LORA_KERNELS_WGMMA_LOADS", loads)
    *dims, sms = shape
    monkeypatch.setenv("LORA_EMULATED_SMS", str(sms))
    torch.manual_seed(hash((shape, str(dtype))) % 2**31)
    gemm = Gemm(lib)
    check_against_float64(gemm, *dims, dtype)
    M, K, N, R = dims
    assert gemm.kernels[1] == WGMMA, gemm.kernels  # y
    assert gemm.kernels[3] == (WGMMA if K >= 256 else TENSOR_CORE), gemm.kernels  # dX
    aligned = K % 8 == 0 and R % 8 == 0
    check_wgmma_launches(gemm, loads, {1: aligned, 3: aligned and N % 8 == 0} if K >= 256 else {1: aligned}, sms)
    # y's epilogue stores 16 bytes at a time where its rows (N) allow and K is not split
    assert gemm.staged[1] == (N % 8 == 0 and sms < 64), gemm.staged
    if sms == 64:
        assert gemm.split[1] and gemm.split[3], gemm.split


# (M, K, N, R, emulated SMs): at most 64 rows, the backward's dX = dY·W₀ + s·g·A on wgmma computed
# transposed (W₀ on the 128-row side of the tile, dY on the 32-column side).
WGMMA_FEW_ROWS_SHAPES = [
    (1, 300, 520, 16, 2),  # one row: a 32-column tile with 31 of padding; ragged K; 3 tiles on 2 SMs
    (24, 520, 264, 8, 64),  # split along K on a 64-SM GPU, then split_k_reduce (C transposed)
    (50, 300, 136, 4, 8),  # two column tiles; r = 4: g staged element by element (cp.async path)
]


@pytest.mark.parametrize("loads", ["producer", "tma", "cp.async"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", WGMMA_FEW_ROWS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_wgmma_few_rows_transposed(lib, shape, dtype, loads, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_WGMMA", "1")
    monkeypatch.setenv("LORA_KERNELS_WGMMA_LOADS", loads)
    *dims, sms = shape
    monkeypatch.setenv("LORA_EMULATED_SMS", str(sms))
    torch.manual_seed(hash((shape, str(dtype), loads)) % 2**31)
    gemm = Gemm(lib)
    check_against_float64(gemm, *dims, dtype)
    assert gemm.kernels[3] == WGMMA, gemm.kernels  # dX
    M, K, N, R = dims
    check_wgmma_launches(gemm, loads, {3: K % 8 == 0 and R % 8 == 0 and N % 8 == 0}, sms)
    # y: the decode kernel up to 8 rows, then wgmma where N ≥ 256
    assert gemm.kernels[1] == (DECODE if M <= 8 else WGMMA if N >= 256 else TENSOR_CORE), gemm.kernels
    if sms == 64:
        assert gemm.split[3], gemm.split
    # the forward at 33-64 rows: its bias indexes the caller's columns (this C's rows)
    gemm = Gemm(lib)
    check_against_float64(gemm, 40, dims[1], 264, dims[3], dtype)
    assert gemm.kernels[1] == WGMMA, gemm.kernels  # y


@pytest.mark.parametrize("M", [40, 70])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_emulated_wgmma_multi_adapter_mask(lib, dtype, M, monkeypatch):
    """32 adapters × rank 8: xa (N = 256) on wgmma keeps, per row of x, only its adapter's columns;
    at 40 rows computed transposed (a row of x is a column of the product), at 70 on 128×256 tiles
    through the staged epilogue."""
    monkeypatch.setenv("LORA_KERNELS_WGMMA", "1")
    torch.manual_seed(7 + M)
    gemm = Gemm(lib)
    check_against_float64(gemm, M, 72, 264, 256, dtype, n_adapters=32)
    assert gemm.kernels[0] == WGMMA, gemm.kernels  # xa
    assert gemm.staged[0] == (M == 70), gemm.staged


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_emulated_wgmma_staged_epilogue_edges(lib, dtype, monkeypatch):
    """The wgmma epilogue's 16-byte stores at C's edges: C a column slice of a wider tensor (row
    stride 280, N = 270, so each row ends in a part chunk written element by element), ragged rows
    and bias; nothing outside the slice is written. Starting 3 elements in (rows not 16-byte
    aligned) the pairs are stored as they are."""
    monkeypatch.setenv("LORA_KERNELS_WGMMA", "1")
    torch.manual_seed(11)
    M, K, N, R = 200, 72, 270, 8
    p, w = guarded(torch.randn(M, K, dtype=dtype)), guarded((torch.randn(N, K) / K**0.5).to(dtype))
    p2, q2 = guarded(torch.randn(M, R, dtype=dtype)), guarded((torch.randn(R, N) / R**0.5).to(dtype))
    bias = guarded(torch.randn(N).to(dtype))
    d = lambda t: t.double()  # noqa: E731
    expected = 0.5 * d(p) @ d(w).t() + 2.0 * d(p2) @ d(q2) + d(bias)
    magnitude = 0.5 * d(p).abs() @ d(w).abs().t() + 2.0 * d(p2).abs() @ d(q2).abs() + d(bias).abs()
    for start, staged in ((8, True), (3, False)):
        wide = poisoned(M, 280, dtype=dtype)
        gemm = Gemm(lib)
        out = gemm(wide[:, start : start + N], p, w.t(), 0.5, p2, q2, 2.0, bias=bias)
        assert gemm.kernels == [WGMMA] and gemm.staged == [staged], (gemm.kernels, gemm.staged)
        assert_close(out, expected, dtype, f"wgmma into C[:, {start}:{start + N}]", magnitude=magnitude)
        outside = torch.cat([wide[:, :start], wide[:, start + N :]], dim=1)
        assert outside.isnan().all(), "the epilogue wrote outside C's columns"
        assert_guards_intact(wide)


def test_emulated_wgmma_transposed_operands(lib, monkeypatch):
    """P and Q both MN-major (i contiguous), with a LoRA term in the same layouts, on wgmma."""
    monkeypatch.setenv("LORA_KERNELS_WGMMA", "1")
    M, K, N, R = 270, 100, 300, 8
    for dtype in (torch.bfloat16, torch.float16):
        pt, q = guarded(torch.randn(K, M, dtype=dtype)), guarded(torch.randn(K, N, dtype=dtype))
        p2t, q2 = guarded(torch.randn(R, M, dtype=dtype)), guarded(torch.randn(R, N, dtype=dtype))
        gemm = Gemm(lib)
        out = gemm(poisoned(M, N, dtype=dtype), pt.t(), q, 0.5, p2t.t(), q2, 2.0)
        assert gemm.kernels == [WGMMA]
        d = lambda t: t.double()  # noqa: E731
        assert_close(
            out,
            0.5 * d(pt).t() @ d(q) + 2.0 * d(p2t).t() @ d(q2),
            dtype,
            "Pᵀ-major wgmma",
            magnitude=0.5 * d(pt).abs().t() @ d(q).abs() + 2.0 * d(p2t).abs().t() @ d(q2).abs(),
        )
    bias = guarded(torch.randn(N, dtype=torch.bfloat16))
    zero_k = gemm(
        poisoned(M, N, dtype=torch.bfloat16),
        torch.empty(M, 0, dtype=torch.bfloat16),
        torch.empty(0, N, dtype=torch.bfloat16),
        1.0,
        bias=bias,
    )
    assert gemm.kernels[-1] == WGMMA and torch.equal(zero_k, bias.expand(M, N))  # K = 0: bias alone


def test_strided_input_and_transposed_output(lib):
    """x a column slice of a wider tensor (row stride ≠ K, misaligned start) in every kernel path."""
    for M in (2, 40):
        for dtype in (torch.bfloat16, torch.float32):
            wide = guarded(torch.randn(M, 100, dtype=dtype))
            check_against_float64(Gemm(lib), M, 48, 72, 8, dtype, x=wide[:, 3:51])


def test_zero_sized_and_empty_lora(lib):
    gemm = Gemm(lib)
    x = guarded(torch.randn(5, 24, dtype=torch.bfloat16))
    w = guarded(torch.randn(40, 24, dtype=torch.bfloat16))
    out = gemm(poisoned(5, 40, dtype=torch.bfloat16), x, w.t(), 1.0)  # no second product, no bias
    assert_close(
        out,
        x.double() @ w.double().t(),
        torch.bfloat16,
        "no LoRA term",
        magnitude=x.double().abs() @ w.double().abs().t(),
    )
    empty = torch.empty(0, 24, dtype=torch.bfloat16)
    assert gemm(poisoned(0, 40, dtype=torch.bfloat16), empty, w.t(), 1.0).shape == (0, 40)
    zero_k = gemm(
        poisoned(37, 40, dtype=torch.bfloat16),
        torch.empty(37, 0, dtype=torch.bfloat16),
        torch.empty(0, 40, dtype=torch.bfloat16),
        1.0,
        bias=torch.ones(40, dtype=torch.bfloat16),
    )
    assert torch.equal(zero_k, torch.ones(37, 40, dtype=torch.bfloat16))  # K = 0: bias alone


def test_random_shapes_strides_and_adapters(lib):
    """A dozen random problems per run (a new seed each time, printed on failure): sizes around the
    tile, vector and decode boundaries, strided x, every dtype, with and without adapters."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for _ in range(12):
        M = rng.choice([1, 2, 5, 16, 31, 32, 33, 47, 64, 65, 100, 129, 257, 300])
        K = rng.choice([1, 7, 8, 15, 16, 24, 33, 64, 72, 100, 136, 257, 520])
        N = rng.choice([1, 3, 8, 9, 40, 64, 65, 130, 257, 300])
        R = rng.choice([1, 2, 3, 4, 8, 12, 16, 17, 32, 64])
        dtype = rng.choice([torch.bfloat16, torch.float16, torch.float32])
        n_adapters = rng.choice([n for n in (0, 0, 1, 2, 3, 4) if R % max(n, 1) == 0])
        x = None
        if rng.random() < 0.25:  # a column slice of a wider tensor, possibly misaligned
            offset = rng.choice([0, 1, 3, 8])
            x = guarded(torch.randn(M, K + offset + rng.choice([0, 5, 8]), dtype=dtype))[:, offset : offset + K]
        case = f"seed {seed}: M={M} K={K} N={N} R={R} {dtype} adapters={n_adapters} strided={x is not None}"
        try:
            check_against_float64(Gemm(lib), M, K, N, R, dtype, x=x, n_adapters=n_adapters)
        except AssertionError as e:
            raise AssertionError(f"{case}: {e}") from e


@pytest.mark.parametrize("seed", [0, 1234, 2**31 - 2, 2**40 + 7])
@pytest.mark.parametrize("M, K, p", [(1, 1, 0.5), (37, 70, 0.25), (3, 300, 0.1), (300, 5, 0.9)])
def test_emulated_dropout_draws_the_reference_mask(lib, seed, M, K, p):
    """The CUDA kernel keeps exactly the elements reference.dropout_keep keeps (the Triton kernels'
    mask, tests/triton), scaled by 1/(1 − p), for any strides of its input."""
    keep = dropout_keep(seed, M, K, p)
    seed_t = guarded(torch.tensor([seed], dtype=torch.int64))
    x = guarded(torch.randn(M, K + 3))[:, 2 : 2 + K]  # a misaligned column slice
    out = launch_dropout(lib, poisoned(M, K, dtype=torch.float32), x, seed_t, p)
    assert torch.equal(out != 0, keep & (x != 0))
    assert torch.equal(out, torch.where(keep, x * torch.tensor(1 / (1 - p), dtype=torch.float32), 0.0))
    xt = guarded(torch.randn(K, M)).t()  # column-major
    out = launch_dropout(lib, poisoned(M, K, dtype=torch.float32), xt, seed_t, p)
    assert torch.equal(out != 0, keep & (xt != 0))


@pytest.mark.parametrize(
    "shape, dtype", shape_dtype_cases([(3, 50, 33, 1), (19, 136, 300, 8), (37, 88, 70, 4), (300, 72, 264, 16)])
)
def test_emulated_dropout_forward_backward_match_float64(lib, shape, dtype):
    """bindings.cpp's forward and backward with dropout_p > 0, launch by launch (run_forward_backward),
    against float64 with reference.dropout_keep's mask."""
    torch.manual_seed(hash((shape, str(dtype))) % 2**31)
    check_against_float64(Gemm(lib), *shape, dtype, dropout_p=0.3)


# What the emulator must report for each fault of tests/cuda_emulation/faulty_kernels.cpp.
FAULTS = {
    0: "still in flight from a cp.async",  # ldmatrix of a copy never waited for
    1: "barrier (__syncthreads or a warp's) never completes: 63 of 64 threads arrived",  # a deadlock
    2: "mbarrier wait at shared offset 0 never completes (1 arrivals",  # one arrival short: a deadlock
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_emulator_reports_each_fault_and_passes_its_fix(lib, fault):
    lib.emulation_error()  # forget what earlier tests left
    lib.run_faulty_kernel(fault, False)
    assert lib.emulation_error().decode() == "", "the correct twin must pass"
    lib.run_faulty_kernel(fault, True)
    assert FAULTS[fault] in lib.emulation_error().decode()


def test_blocks_on_several_worker_threads_keep_their_own_index(lib):
    out = torch.full((37,), -1, dtype=torch.int32)
    lib.run_block_index(out.data_ptr(), 37)
    assert out.tolist() == list(range(37))
    assert lib.emulation_error().decode() == ""
