"""How the benchmark measures time.

GPU: CUDA events around each call after warm-up; the median (and mean ± std) of many calls; each
call uses the next of several input sets whose bytes together exceed twice the L2 cache, so no
call finds its weights still cached from the previous one. The CUDA-graph column captures one call
per input set in a graph and times replays: GPU time with no launch overhead.
CPU (no GPU): time.perf_counter around each call; there is no graph column.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Timing:
    """A measurement's samples summarised: the median and its spread (the interquartile range,
    q1..q3), mean ± std (what the LoRA paper reports), and how many samples."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    mean_ms: float
    std_ms: float
    n: int

    @classmethod
    def of(cls, samples_ms):
        q1, _, q3 = statistics.quantiles(samples_ms, n=4) if len(samples_ms) > 1 else (samples_ms[0],) * 3
        return cls(
            statistics.median(samples_ms),
            q1,
            q3,
            statistics.fmean(samples_ms),
            statistics.stdev(samples_ms) if len(samples_ms) > 1 else 0.0,
            len(samples_ms),
        )

    def as_dict(self) -> dict:
        return dict(median=self.median_ms, q1=self.q1_ms, q3=self.q3_ms, mean=self.mean_ms, std=self.std_ms, n=self.n)


def l2_bytes(device) -> int:
    if torch.device(device).type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return 32 << 20


def input_sets_needed(bytes_per_set: int, device, cap: int = 16) -> int:
    """Enough input sets that cycling through them moves more than twice the L2 cache."""
    return max(2, min(cap, -(-2 * l2_bytes(device) // max(bytes_per_set, 1)) + 1))


def time_eager(fn: Callable[[int], object], n_sets: int, reps: int, warmup: int, device) -> Timing:
    """``fn(i)`` runs one call on input set ``i % n_sets``."""
    for i in range(warmup):
        fn(i % n_sets)
    if torch.device(device).type != "cuda":
        samples = []
        for i in range(reps):
            t0 = time.perf_counter()
            fn(i % n_sets)
            samples.append((time.perf_counter() - t0) * 1e3)
        return Timing.of(samples)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn(i % n_sets)
        ends[i].record()
    torch.cuda.synchronize()
    return Timing.of([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_graph(fn: Callable[[int], object], n_sets: int, reps: int, device) -> Optional[Timing]:
    """GPU time per call from CUDA-graph replay (one captured call per input set); None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile kernels, settle the allocator) off the capture stream
        for i in range(n_sets):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_sets):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    result = Timing.of([s.elapsed_time(e) / n_sets for s, e in zip(starts, ends)])
    del graph
    return result


def peak_memory_mb(fn: Callable[[], object], device) -> Optional[float]:
    """Peak memory allocated while running ``fn`` once, above what was allocated before; None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20
