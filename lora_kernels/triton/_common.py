"""What the Triton forward and backward share: interpreter detection, dtype flags, block sizes."""

from __future__ import annotations

import functools
import statistics
import time

import torch
import triton
import triton.language as tl

from .. import _env
from ..precision import KERNEL_DTYPES

# The interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors with numpy; it computes bf16
# tl.dot and bf16 arithmetic wrongly, so kernels upcast dot operands to fp32 only when interpreting.
INTERPRETING = _env.enabled("TRITON_INTERPRET")

SUPPORTED_DTYPES = KERNEL_DTYPES

# Where no GPU can be asked (the interpreter, meta tensors when compiling for a target) the wrappers
# size their grids for the GPU the tile tables were measured on: an H100's 132 SMs.
DEFAULT_SM_COUNT = 132


@functools.lru_cache(maxsize=None)
def _device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (asked once per GPU), or DEFAULT_SM_COUNT off a GPU."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return _device_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def on_tensor_device(wrapper):
    """``wrapper`` (a host wrapper whose first argument is a tensor) run with that tensor's GPU as the
    current device. A Triton launch goes to the current device and its current stream, not to the
    tensors' (JITFunction.run asks the driver): in a model spread over GPUs (device_map="auto"), a
    layer on cuda:1 called while cuda:0 is current would run on cuda:0's stream, racing cuda:1's work
    or faulting. The CUDA backend's ops hold a CUDAGuard for the same reason. Where the tensor's
    device is current (or it is on the CPU: the interpreter) this costs one comparison."""

    @functools.wraps(wrapper)
    def on_device(x, *args, **kwargs):
        index = x.get_device()
        if index < 0 or index == torch.cuda.current_device():
            return wrapper(x, *args, **kwargs)
        with torch.cuda.device(index):
            return wrapper(x, *args, **kwargs)

    return on_device


# LORA_KERNELS_AUTOTUNE=1: time the table's tile config against a few neighbours on first use of
# each shape key and keep the fastest (see tuned()). Off by default: a launch then costs no search.
AUTOTUNE = _env.enabled("LORA_KERNELS_AUTOTUNE")
_TUNED = {}


def _tiles(block_m, block_n, block_k, group_m, num_warps, num_stages):
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages
    )


# Tile sizes per kernel for M ≤ 16, M ≤ 128 and larger M (bf16/fp16), chosen by
# scripts/sweep_tiles.py on an H100 (bf16, r = 16, the benchmark's shapes; triton 3.6, 2026-11-22;
# log in bench/results/sweep-h100.log). Small M is a weight-streaming GEMV: thin row tiles, narrow
# output tiles and long K steps, so the programs cover the 132 SMs and keep many loads in flight.
# Large M uses the usual 128×128 Hopper GEMM tile. "forward" tiles y (BLOCK_M × BLOCK_N, K walked
# in BLOCK_K steps); "dx" tiles dX (BLOCK_M × BLOCK_K, N walked in BLOCK_N steps), and the dA/dB
# kernel reuses its BLOCK_K and BLOCK_N as output tile sizes. Where the best K step at r = 16 is
# long, wider rank tiles (A or B) shorten it (_K_STEP_BY_RANK), or it would spill registers or pass
# an A100's shared memory (tests/triton/gpu_compile.py checks both for every launch).
_TILES = {
    "forward": (_tiles(16, 32, 256, 1, 4, 4), _tiles(64, 64, 128, 4, 4, 3), _tiles(128, 128, 64, 8, 8, 3)),
    "dx": (_tiles(16, 128, 32, 1, 4, 4), _tiles(64, 64, 64, 4, 4, 4), _tiles(128, 64, 256, 8, 8, 3)),
}
_K_STEP_BY_RANK = {  # (kernel, M bucket): ((largest BLOCK_R, BLOCK_K), ...)
    ("forward", 0): ((16, 256), (128, 128)),
    ("forward", 1): ((16, 128), (128, 64)),
    ("dx", 2): ((16, 256), (64, 128), (128, 64)),
}
# IEEE fp32 dots run on FMA units with far more registers per tile: smaller tiles, (BLOCK_N,
# BLOCK_K) for M ≤ 16 and for larger M (sizes checked by tests/triton/gpu_compile.py).
_FP32_TILES = {"forward": ((32, 32), (64, 32)), "dx": ((32, 32), (32, 64))}


def tile_config(kernel: str, M: int, R: int, dtype: torch.dtype, dropout: bool = False) -> dict:
    """Tile sizes for ``kernel`` ("forward" or "dx") by problem size: a table, so a launch costs no
    search (LORA_KERNELS_AUTOTUNE=1 times neighbours of these once per shape instead, see tuned).
    ``dropout``: the dX kernel redraws the mask of its (BLOCK_M, BLOCK_K) tile, which spilled
    2.8 KB of registers at BLOCK_K = 256 (sm_90 cubin, triton 3.8, 2026-11-22), so K steps stay ≤ 128 there.
    The dict returned is shared between calls (worked out once per size class): do not modify it."""
    bucket = 0 if M <= 16 else 1 if M <= 128 else 2
    return _tile_config(kernel, bucket, rank_block(R), dtype, dropout and kernel == "dx")


@functools.lru_cache(maxsize=None)
def _tile_config(kernel: str, bucket: int, block_r: int, dtype: torch.dtype, dropout_dx: bool) -> dict:
    if INTERPRETING:  # few programs × few K-steps keeps the numpy interpreter fast
        return _tiles(16, 32, 32, 4, 4, 1)
    if dtype == torch.float32:
        wide_rank = block_r >= 64  # 8 warps spread the FMA-dot operands over more threads
        block_n, block_k = _FP32_TILES[kernel][bucket > 0]
        if bucket == 0:  # ≤ 16 rows: one row tile, so no grouping of row tiles
            block_m, group_m = 16, 1
        else:
            block_m, group_m = (32 if wide_rank else 64), 8
        return _tiles(block_m, block_n, block_k, group_m, 8 if wide_rank else 4, 3)
    cfg = dict(_TILES[kernel][bucket])
    steps = _K_STEP_BY_RANK.get((kernel, bucket))
    if steps:
        cfg["BLOCK_K"] = next(block_k for max_r, block_k in steps if block_r <= max_r)
    if dropout_dx:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 128)
    return cfg


def tile_variants(cfg: dict) -> list:
    """Neighbours of a tile config, one knob at a time: tile sides halved or doubled, warps, stages."""
    out = []
    for knob, values in (
        ("BLOCK_N", (cfg["BLOCK_N"] // 2, cfg["BLOCK_N"] * 2)),
        ("BLOCK_K", (cfg["BLOCK_K"] // 2, cfg["BLOCK_K"] * 2)),
        ("BLOCK_M", (cfg["BLOCK_M"] * 2,)),
        ("num_warps", (4 if cfg["num_warps"] == 8 else 8,)),
        ("num_stages", (cfg["num_stages"] - 1, cfg["num_stages"] + 1)),
    ):
        for v in values:
            if (
                (knob.startswith("BLOCK") and 16 <= v <= 256)
                or (knob == "num_stages" and 1 <= v <= 5)
                or knob == "num_warps"
            ):
                out.append({**cfg, knob: v})
    return out


def _time_ms(fn) -> float:
    if INTERPRETING:  # CPU: a few calls on the wall clock
        fn()
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e3
    return triton.testing.do_bench(fn, warmup=5, rep=25)


def tuned(key, default: dict, launch) -> dict:
    """The tile config to launch for shape ``key`` (a tuple, or a function returning it, called only
    when autotuning, so a plain launch does not build it): the table's ``default`` or, with autotuning on,
    the fastest of it and its :func:`tile_variants`, timed once per key on the call's own inputs
    (``launch(cfg)`` runs the kernel) and remembered for the process. Never tunes during CUDA-graph
    capture; configs that fail to launch (too much shared memory on this GPU) are skipped."""
    if not AUTOTUNE:
        return default
    key = key() if callable(key) else key
    if key not in _TUNED:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return default
        best = None
        for cfg in [default] + tile_variants(default):
            try:
                ms = _time_ms(lambda: launch(cfg))
            except Exception:  # noqa: BLE001  (out of resources and the like: not a candidate)
                continue
            if best is None or ms < best[0]:
                best = (ms, cfg)
        _TUNED[key] = default if best is None else best[1]  # none launched: the default's launch will say why
    return _TUNED[key]


def tuned_configs() -> dict:
    """What autotuning chose so far, {shape key: config}: print it to update the tables."""
    return dict(_TUNED)


def unavailable_reason(x: torch.Tensor):
    """None if the Triton kernels can run on tensors like ``x``, else a sentence saying why not."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32, got {x.dtype}"
    if x.device.type == "cuda" or (INTERPRETING and x.device.type == "cpu"):
        return None
    return f"tensors are on {x.device}; the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors)"


def kernel_flags(dtype: torch.dtype) -> dict:
    """Constexpr flags every kernel takes: upcasting in the interpreter, and fp32 dot precision.

    fp32 follows torch's own matmul setting: IEEE fp32 unless the user allowed TF32.
    """
    upcast = INTERPRETING and dtype != torch.float32
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST": upcast, "DOT_PRECISION": "tf32" if tf32 or dtype != torch.float32 else "ieee"}


def as_activation_dtype(lora_A: torch.Tensor, lora_B: torch.Tensor, dtype: torch.dtype):
    """fp32 adapters on a 16-bit base (lora_kernels.precision), rounded once per call to the
    activation dtype the tensor cores multiply in: r·(in + out) elements. Not inside the K loops:
    there the conversion serialized the sm_90 forward's wgmmas (bench/results/mixed-precision.md)."""
    if lora_A.dtype is not dtype:
        lora_A = lora_A.to(dtype)
    if lora_B.dtype is not dtype:
        lora_B = lora_B.to(dtype)
    return lora_A, lora_B


# Host-side integer helpers. triton.cdiv / triton.next_power_of_2 are ConstexprFunction wrappers
# that cost 1.5 µs a call (triton 3.6 and 3.8, on the 2-core development CPU, 2026-11-22; ~10 calls
# per training step), so the wrappers use these plain versions.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n (n ≥ 1)."""
    return 1 << (n - 1).bit_length()


def rank_block(r: int) -> int:
    """The rank dimension padded to a power of two of at least 16 (tl.dot's smallest GPU tile)."""
    return max(16, next_power_of_2(r))


@triton.jit
def cast_to(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype), rounding to nearest-even as the GPU does. The interpreter truncates fp32 to
    bf16 instead (up to 1 ulp of error where the GPU has 1/2), so when interpreting the bf16 value
    is rounded in fp32 bit arithmetic first and the conversion is then exact."""
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def grouped_tile(pid, num_rows, num_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr):
    """Map a flat program id to (row tile, col tile) in groups of GROUP row tiles, so programs
    running together share column tiles of the (large) weight in L2."""
    tiles_r = tl.cdiv(num_rows, BLOCK_ROWS)
    tiles_c = tl.cdiv(num_cols, BLOCK_COLS)
    per_group = GROUP * tiles_c
    first = (pid // per_group) * GROUP
    size = tl.minimum(tiles_r - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def dropout_uniform(seed, rows, col0, BLOCK_COLS: tl.constexpr):
    """LoRA dropout's uniform draws for x's rows ``rows`` (a vector) and the BLOCK_COLS columns from
    col0 (a multiple of 4): (len(rows), BLOCK_COLS) floats; element (m, k) is kept iff its draw is
    ≥ p. One Philox call gives four draws: counter (k // 4, m) → columns k..k+3 of row m
    (reference.dropout_keep), so every kernel, whatever its tiling, redraws the same mask from the
    seed, nothing M×K is stored, and the draws cost a quarter of one call per element."""
    groups = col0 // 4 + tl.arange(0, BLOCK_COLS // 4)
    counter = rows.to(tl.int64)[:, None] * 4294967296 + groups.to(tl.int64)[None, :]  # c0 = k // 4, c1 = m
    u0, u1, u2, u3 = tl.rand4x(seed, counter)
    # interleave: column 4g + i of the result is u_i[:, g] (join stacks on a new last axis)
    return tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (rows.shape[0], BLOCK_COLS))


@triton.jit
def adapter_rows(acc, ids_ptr, scales_ptr, offs_m, mask_m, offs_r, n_adapters, adapter_rank):
    """Multi-adapter batches: ``acc`` (BLOCK_M, BLOCK_R) holds every row's product with all n stacked
    adapters (column j belongs to adapter j // rank). Keep, per row, only its adapter's columns,
    times that adapter's scale; rows with id −1 (or out of range) keep nothing."""
    ids = tl.load(ids_ptr + offs_m, mask=mask_m, other=-1)
    valid = (ids >= 0) & (ids < n_adapters)
    row_scale = tl.load(scales_ptr + ids, mask=valid, other=0.0)
    keep = valid[:, None] & ((offs_r // adapter_rank)[None, :] == ids[:, None])
    return tl.where(keep, acc * row_scale[:, None], 0.0)


@triton.jit
def _dropout_mask_kernel(seed_ptr, out_ptr, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    keep = dropout_uniform(tl.load(seed_ptr), rows, col0, BLOCK_K) >= p
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], tl.where(keep, 1.0 / (1.0 - p), 0.0), mask=mask)


@on_tensor_device
def dropout_mask(seed: torch.Tensor, M: int, K: int, p: float, dtype=torch.float32) -> torch.Tensor:
    """The scaled keep-mask (0 or 1/(1-p)) the fused kernels apply for ``seed``: for tests and
    debugging; the kernels themselves never materialise it."""
    from ._launch import launch  # not at the top: _launch imports this module

    out = torch.empty((M, K), device=seed.device, dtype=torch.float32)
    launch(_dropout_mask_kernel, (cdiv(M, 32), cdiv(K, 32)), seed, out, M, K, p, BLOCK_M=32, BLOCK_K=32)
    return out.to(dtype)
