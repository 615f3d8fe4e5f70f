"""The Triton kernels through the backend contract (runs under TRITON_INTERPRET=1 without a GPU)."""

import pytest
import torch
from conftest import DEVICE, KERNEL_BACKENDS, backend_contract_vs_float64

import lora_kernels

pytestmark = pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="Triton backend unavailable")

if "triton" in KERNEL_BACKENDS:
    from lora_kernels import triton as tk

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def contract_vs_float64(*args, **kwargs):
    backend_contract_vs_float64(tk, *args, **kwargs)


@pytest.mark.parametrize("r", [1, 2, 16, 17, 64, 100, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_rank_up_to_128(r, dtype, poison):
    contract_vs_float64(21, 48, 40, r, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_tiles_and_split_reduction(dtype, poison):
    # several row, column and K tiles; M spans more than one split of the dA/dB reduction
    contract_vs_float64(131, 100, 90, 8, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_precomputed_xa_and_unfused_dx(dtype, poison):
    contract_vs_float64(23, 40, 36, 8, dtype, fuse_lora_dx=False, x_lora_given=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 40, 24, 8), (37, 70, 50, 12)], ids=str)
def test_fused_dropout_contract(shape, dtype, poison):
    contract_vs_float64(*shape, dtype, dropout_p=0.3)


def test_dropout_mask_is_the_reference_draw():
    """The mask the kernels draw is reference.dropout_keep's (which the CUDA backend also draws)."""
    for seed, M, K, p in [(0, 1, 1, 0.5), (20261123, 37, 70, 0.25), (2**40 + 7, 5, 300, 0.9)]:
        mask = tk.dropout_mask(torch.tensor([seed], dtype=torch.int64, device=DEVICE), M, K, p)
        assert torch.equal(mask > 0, lora_kernels.reference.dropout_keep(seed, M, K, p, device=DEVICE))


@pytest.mark.skipif(DEVICE != "cuda", reason="large shapes need a GPU")
@pytest.mark.parametrize("M", [1, 16, 128, 1024, 8192])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_shapes_on_gpu(M, dtype, poison):
    contract_vs_float64(M, 4096, 11008, 16, dtype)


def test_fused_dropout_mask_statistics_match_nn_dropout():
    p, M, K = 0.1, 300, 200
    seed = torch.tensor([20261122], dtype=torch.int64, device=DEVICE)
    mask = tk.dropout_mask(seed, M, K, p)
    kept = (mask > 0).double().mean().item()
    sigma = (p * (1 - p) / (M * K)) ** 0.5
    assert abs(kept - (1 - p)) < 5 * sigma  # binomial: kept fraction 1 - p
    survivors = mask[mask != 0]
    torch.testing.assert_close(survivors, torch.full_like(survivors, 1 / (1 - p)))  # scaled like nn.Dropout
    assert abs(mask.double().mean().item() - 1.0) < 5 * sigma / (1 - p)  # E[mask] = 1, as nn.Dropout
    rows_kept = (mask > 0).double().mean(1)
    assert rows_kept.std().item() < 3 * (p * (1 - p) / K) ** 0.5  # no row pattern
    other = tk.dropout_mask(seed + 1, M, K, p)
    assert not torch.equal(mask, other) and torch.equal(mask, tk.dropout_mask(seed, M, K, p))


def test_bf16_outputs_round_to_nearest_even():
    """Outputs are rounded as the GPU rounds (the interpreter alone would truncate)."""
    x = torch.randn(256, 1, device=DEVICE).bfloat16()
    w = torch.tensor([[1.0 + 5 * 2**-7]], device=DEVICE).bfloat16()  # x·w needs up to 16 bits: rounding matters
    zero_a, zero_b = torch.zeros(1, 1, device=DEVICE).bfloat16(), torch.zeros(1, 1, device=DEVICE).bfloat16()
    y, _ = tk.forward(x, w, None, zero_a, zero_b, 1.0)
    exact = x.float() * w.float()  # exact in fp32
    want = exact.to(torch.bfloat16)  # torch rounds to nearest-even
    truncated = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert not torch.equal(want, truncated)  # the check below can tell the two apart
    assert torch.equal(y, want)


def test_autotune_picks_a_candidate_once_per_shape_and_stays_correct(monkeypatch):
    from lora_kernels.triton import _common

    monkeypatch.setattr(_common, "AUTOTUNE", True)
    monkeypatch.setattr(_common, "_TUNED", {})
    timed = []
    real_time = _common._time_ms
    monkeypatch.setattr(_common, "_time_ms", lambda fn: timed.append(1) or real_time(fn))
    contract_vs_float64(21, 48, 40, 8, torch.bfloat16)  # results stay right while candidates run
    fwd_default = _common.tile_config("forward", 21, 8, torch.bfloat16)
    dx_default = _common.tile_config("dx", 21, 8, torch.bfloat16)
    assert len(timed) == 2 + len(_common.tile_variants(fwd_default)) + len(_common.tile_variants(dx_default))
    contract_vs_float64(21, 48, 40, 8, torch.bfloat16)  # same shape key: the choice is reused
    assert len(timed) == 2 + len(_common.tile_variants(fwd_default)) + len(_common.tile_variants(dx_default))
    chosen = tk.tuned_configs()
    assert sorted(k[0] for k in chosen) == ["dx", "forward"]
    assert chosen[next(k for k in chosen if k[0] == "forward")] in [fwd_default] + _common.tile_variants(fwd_default)


def test_autotune_falls_back_to_the_table_when_no_candidate_launches(monkeypatch):
    from lora_kernels.triton import _common

    monkeypatch.setattr(_common, "AUTOTUNE", True)
    monkeypatch.setattr(_common, "_TUNED", {})
    default = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2)

    def launch(cfg):
        raise RuntimeError("out of resources")

    assert _common.tuned(("forward", 1), default, launch) == default


# ---- the large-M TMA kernel (tma_gemm.py; opt-in by LORA_KERNELS_TMA_ROWS): forward and dX ----


@pytest.fixture
def tma_from_row_1(monkeypatch):
    """The TMA kernel for every M; returns the jobs it ran ("forward", "dx"). Off a GPU with three
    programs, so that each walks several tiles (on a GPU, one per SM: the large shapes walk many)."""
    from lora_kernels.triton import tma_gemm

    jobs = []
    real = tma_gemm.gemm_low_rank

    def counted(*args, transposed, **kwargs):
        jobs.append("forward" if transposed else "dx")
        return real(*args, transposed=transposed, **kwargs)

    monkeypatch.setattr(tma_gemm, "MIN_ROWS", 1)
    monkeypatch.setattr(tma_gemm, "gemm_low_rank", counted)
    if DEVICE != "cuda":
        monkeypatch.setattr(tma_gemm, "sm_count", lambda device: 3)
    return jobs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape, variant, jobs",
    [
        ((200, 72, 136, 16), {}, ["forward", "dx"]),  # tile edges in M, N and K; 2×2 tiles on 3 programs
        ((300, 64, 264, 64), {}, ["forward", "dx"]),  # 3×3 tiles (forward): every program walks three
        ((1, 8, 8, 8), {}, ["forward", "dx"]),
        ((77, 40, 48, 128), {}, ["forward", "dx"]),  # the largest rank block
        ((150, 56, 144, 16), {"dropout_p": 0.3}, ["forward", "dx"]),  # xa from the dropout pass; dX's mask
        ((200, 264, 136, 8), {"dropout_p": 0.5}, ["forward", "dx"]),  # the mask over 2×3 tiles of dX
        ((150, 56, 144, 24), {"x_lora_given": True, "fuse_lora_dx": False}, ["forward", "dx"]),  # dX = dY·W₀
    ],
    ids=str,
)
def test_tma_kernel_contract(shape, variant, jobs, dtype, tma_from_row_1, poison):
    contract_vs_float64(*shape, dtype, **variant)
    assert tma_from_row_1 == jobs


@pytest.mark.skipif(DEVICE != "cuda", reason="large shapes need a GPU")
@pytest.mark.parametrize("M", [1024, 8192])
@pytest.mark.parametrize("K, N, r", [(4096, 4096, 16), (4096, 11008, 64), (11008, 4096, 128)], ids=str)
def test_tma_kernel_large_shapes_on_gpu(M, K, N, r, tma_from_row_1, poison):
    contract_vs_float64(M, K, N, r, torch.bfloat16)
    assert tma_from_row_1 == ["forward", "dx"]


@pytest.mark.parametrize(
    "shape, dtype, strided_x, jobs",
    [
        ((40, 48, 44, 8), torch.bfloat16, False, []),  # y's and dY's rows: 88 bytes
        ((40, 48, 48, 12), torch.bfloat16, False, []),  # xa's, g's, B's rows: 24 bytes
        ((40, 50, 48, 8), torch.float16, False, []),  # x's and dX's rows: 100 bytes
        ((40, 48, 48, 8), torch.float16, True, ["dx"]),  # x a column slice, 6 bytes off alignment (dX reads dY)
        ((40, 48, 48, 8), torch.float32, False, []),
    ],
    ids=str,
)
def test_tma_kernel_declines_what_tma_cannot_read(shape, dtype, strided_x, jobs, tma_from_row_1, poison):
    """Tensors TMA cannot address (rows not 16-byte aligned, fp32) take the pointer kernels, correctly."""
    contract_vs_float64(*shape, dtype, strided_x=strided_x)
    assert tma_from_row_1 == jobs
