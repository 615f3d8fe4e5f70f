// What the two tensor-core GEMMs share (lora_tensor_core.cu: mma.sync, every GPU since sm_80;
// lora_wgmma.cu: wgmma, sm_90a): the operands as (i, k) views, the launch parameters, staging a
// tile of an operand into shared memory with cp.async, the split-K plan and the epilogue that
// writes a pair of neighbouring outputs. Both compute
//     C = alpha·P·Q + alpha2·P2·Q2 + bias      (P2·Q2: the rank-r product, K2 = r)
// (times the multi-adapter mask of lora_gemm.h, where one is given), walking the K tiles of P·Q
// and then those of P2·Q2 as one stream into the same accumulators: rescaled by alpha/alpha2 at the
// switch and by alpha2 at the end.
#pragma once
#include <type_traits>

#include "device.cuh"
#include "lora_gemm.h"

namespace lora_kernels {
namespace tensor_core {

// An operand seen as (i, k): i is the row of C it feeds (m for P, n for Q), k the reduction index.
struct View {
  const void* ptr;
  int64_t stride_i, stride_k, extent_i, extent_k;
};

// The four operands as views; Q (k, n) = ptr[k·stride_row + n·stride_col] is seen as (i = n, k).
struct Views {
  View P, Q, P2, Q2;
};
__host__ __device__ __forceinline__ Views views_of(const GemmParams& g) {
  return {{g.P.ptr, g.P.stride_row, g.P.stride_col, g.M, g.K},
          {g.Q.ptr, g.Q.stride_col, g.Q.stride_row, g.N, g.K},
          {g.P2.ptr, g.P2.stride_row, g.P2.stride_col, g.M, g.K2},
          {g.Q2.ptr, g.Q2.stride_col, g.Q2.stride_row, g.N, g.K2}};
}

struct Params {
  GemmParams g;
  DType dtype;
  bool vec[4];                  // P, Q, P2, Q2 can be staged with aligned 16-byte copies
  bool pair_store;              // two neighbouring outputs of a row can be written as one 32-bit store
  bool vector_store;            // C's rows can be written in aligned 16-byte chunks (the wgmma epilogue)
  int splits, tiles_per_split;  // split-K: split z takes K tiles [z·tiles_per_split, +tiles_per_split)
};

// Each operand tile is stored in shared memory the way it lies in global memory, so that every copy
// is a contiguous 16-byte chunk: "k-major" ([i][k], k contiguous, e.g. x or W₀ for x·W₀ᵀ) or
// "i-major" ([k][i], e.g. W₀ for dY·W₀ or gᵀ for gᵀ·x). A Layout names a tile's shape and where
// element (i, k) goes: static constexpr kTileI, kTileK, kKMajor and offset(i, k), in elements; its
// swizzle permutes whole 16-byte chunks, so that 8 contiguous elements stay one chunk.
//
// Stage tile (i0.., k0..) of `v` into `tile`: 16-byte cp.async chunks if `vec`, else element by
// element. Outside the matrix the tile holds zeros, so edge tiles need no other care.
template <typename T, typename Layout, int THREADS>
__device__ __forceinline__ void load_tile(T* tile, const View& v, int64_t i0, int64_t k0, bool vec) {
  constexpr int kTileI = Layout::kTileI, kTileK = Layout::kTileK;
  constexpr bool kKMajor = Layout::kKMajor;
  const T* src = static_cast<const T*>(v.ptr);
  if (vec) {
    constexpr int kChunksPerRow = kKMajor ? kTileK / 8 : kTileI / 8;
    for (int c = threadIdx.x; c < kTileI * kTileK / 8; c += THREADS) {
      const int i = kKMajor ? c / kChunksPerRow : (c % kChunksPerRow) * 8;
      const int k = kKMajor ? (c % kChunksPerRow) * 8 : c / kChunksPerRow;
      const int64_t gi = i0 + i, gk = k0 + k;
      int64_t valid = kKMajor ? (gi < v.extent_i ? v.extent_k - gk : 0) : (gk < v.extent_k ? v.extent_i - gi : 0);
      valid = valid < 0 ? 0 : (valid > 8 ? 8 : valid);
      const T* from = valid > 0 ? src + gi * v.stride_i + gk * v.stride_k : src;
      dev::cp_async_16(tile + Layout::offset(i, k), from, static_cast<int>(valid) * 2);
    }
  } else {
    for (int e = threadIdx.x; e < kTileI * kTileK; e += THREADS) {
      const int i = kKMajor ? e / kTileK : e % kTileI;  // the contiguous index fastest, to coalesce
      const int k = kKMajor ? e % kTileK : e / kTileI;
      const int64_t gi = i0 + i, gk = k0 + k;
      tile[Layout::offset(i, k)] =
          (gi < v.extent_i && gk < v.extent_k) ? src[gi * v.stride_i + gk * v.stride_k] : dev::from_float<T>(0.0f);
    }
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  const T a = dev::from_float<T>(lo), b = dev::from_float<T>(hi);
  uint16_t la, lb;
  memcpy(&la, &a, 2);
  memcpy(&lb, &b, 2);
  return static_cast<uint32_t>(la) | (static_cast<uint32_t>(lb) << 16);
}

// Outputs (m, n) and (m, n + 1), from two accumulators the kernel has already multiplied by its
// scale (both kernels hold their accumulators as mma's C fragments: pairs of neighbouring columns).
// Split into several blocks along K: the fp32 partial sums of split `split` go to the workspace,
// [split][M][N], and split_k_reduce finishes them. Else keep, bias and one write in C's dtype.
template <typename T>
__device__ __forceinline__ void store_pair(const Params& params, int split, int64_t m, int64_t n, float v0, float v1) {
  const GemmParams& g = params.g;
  if (m >= g.M) return;
  if (params.splits > 1) {
    float* partial = g.workspace + static_cast<int64_t>(split) * g.M * g.N + m * g.N;
    if (n < g.N) partial[n] = v0;
    if (n + 1 < g.N) partial[n + 1] = v1;
    return;
  }
  float v[2] = {v0, v1};
#pragma unroll
  for (int e = 0; e < 2; ++e)
    if (n + e < g.N) v[e] = dev::keep_and_bias<T>(g, m, n + e, v[e]);
  T* out = static_cast<T*>(g.C) + m * g.stride_cm + n * g.stride_cn;
  if (params.pair_store && n + 1 < g.N) {
    *reinterpret_cast<uint32_t*>(out) = pack_pair<T>(v[0], v[1]);
  } else {
    if (n < g.N) out[0] = dev::from_float<T>(v[0]);
    if (n + 1 < g.N) out[g.stride_cn] = dev::from_float<T>(v[1]);
  }
}

// This split's share of the stream of K tiles (those of P·Q, then those of P2·Q2), and the scale of
// its accumulators at the end: acc holds alpha/alpha2·P·Q + P2·Q2 if the share reached P2·Q2.
struct TileRange {
  int k_tiles, first, count;
  // (a function, not a member: computed after the main loop, it holds no register during it)
  __device__ __forceinline__ float out_scale(const GemmParams& g) const {
    return g.K2 > 0 && first + count > k_tiles ? g.alpha2 : g.alpha;
  }
  // Before local tile t, are the accumulators to be scaled by alpha/alpha2? Where the share's P·Q
  // tiles end and its P2·Q2 tiles begin, after at least one P·Q tile, if alpha ≠ alpha2.
  __device__ __forceinline__ bool rescale_before(int t, const GemmParams& g) const {
    return t > 0 && first + t == k_tiles && g.alpha != g.alpha2;
  }
};
template <int BK>
__device__ __forceinline__ TileRange tile_range(const Params& params, int split) {
  const GemmParams& g = params.g;
  TileRange r;
  r.k_tiles = static_cast<int>(dev::cdiv(g.K, BK));
  const int all_tiles = r.k_tiles + static_cast<int>(dev::cdiv(g.K2, BK));
  r.first = split * params.tiles_per_split;
  r.count = all_tiles - r.first < params.tiles_per_split ? all_tiles - r.first : params.tiles_per_split;
  return r;
}

// Output tile number `tile` of tiles_m × tiles_n, in groups of group_m rows of tiles taken column by
// column within a group: the blocks running at one time share a few column tiles of Q (W₀) and
// group_m row tiles of P, which then stay in L2.
struct TileCoord {
  int64_t m, n;  // row tile, column tile
};
__device__ __forceinline__ TileCoord grouped_tile(int64_t tile, int64_t tiles_m, int64_t tiles_n, int group_m) {
  const int64_t first_m = tile / (group_m * tiles_n) * group_m;
  const int64_t rows_in_group = tiles_m - first_m < group_m ? tiles_m - first_m : group_m;
  const int64_t in_group = tile - first_m * tiles_n;
  return {first_m + in_group % rows_in_group, in_group / rows_in_group};
}

// Can tile loads of `v` in this layout be 16-byte copies? The contiguous index must have unit
// stride, and every row of the layout must start on a 16-byte boundary.
inline bool vector_loadable(const View& v, bool k_major) {
  const int64_t unit = k_major ? v.stride_k : v.stride_i, step = k_major ? v.stride_i : v.stride_k;
  const int64_t rows = k_major ? v.extent_i : v.extent_k;
  return v.ptr != nullptr && unit == 1 && (rows <= 1 || step % 8 == 0) && dev::aligned16(v.ptr);
}

// Each operand is staged in the layout it has in memory (k contiguous: k-major).
inline bool p_is_k_major(const GemmParams& g) { return !(g.P.stride_row == 1 && g.P.stride_col != 1); }
inline bool q_is_k_major(const GemmParams& g) { return !(g.Q.stride_col == 1 && g.Q.stride_row != 1); }

// The launch parameters for these operands; the LoRA operands share the main product's layouts,
// falling back to element loads where theirs differ.
inline Params make_params(DType dtype, const GemmParams& g) {
  const Views ops = views_of(g);
  const bool p_k = p_is_k_major(g), q_k = q_is_k_major(g);
  const int64_t element_bytes = dtype == DType::kFloat32 ? 4 : 2;
  const uintptr_t c_address = reinterpret_cast<uintptr_t>(g.C);
  Params params{};
  params.g = g;
  params.dtype = dtype;
  params.vec[0] = vector_loadable(ops.P, p_k);
  params.vec[1] = vector_loadable(ops.Q, q_k);
  params.vec[2] = g.K2 > 0 && vector_loadable(ops.P2, p_k);
  params.vec[3] = g.K2 > 0 && vector_loadable(ops.Q2, q_k);
  params.pair_store = g.stride_cn == 1 && g.stride_cm % 2 == 0 && c_address % 4 == 0;
  params.vector_store = g.stride_cn == 1 && (g.stride_cm * element_bytes) % 16 == 0 && c_address % 16 == 0;
  params.splits = 1;  // (launch_tiles sets the split)
  params.tiles_per_split = 0;
  return params;
}

struct Split {
  int splits, tiles_per_split;
};

constexpr int kMaxSplits = 64;

// When the output tiles (BM×BN) fill less than one wave of SMs: enough splits of the BK-deep K tiles
// for about blocks_per_sm blocks per SM, each split at least min_tiles_per_split K steps. (With one
// block per SM the count is rounded down, so that the blocks stay within one wave.)
inline Split plan_split(const GemmParams& g, int BM, int BN, int BK, int min_tiles_per_split, int blocks_per_sm) {
  const int all_tiles = static_cast<int>(dev::cdiv(g.K, BK) + dev::cdiv(g.K2, BK));
  const int64_t blocks = dev::cdiv(g.M, BM) * dev::cdiv(g.N, BN);
  const int64_t slots = static_cast<int64_t>(blocks_per_sm) * dev::sm_count();
  int64_t wanted = 1;
  if (blocks < slots / blocks_per_sm) wanted = blocks_per_sm == 1 ? slots / blocks : dev::cdiv(slots, blocks);
  const dev::KSplit split = dev::split_steps(all_tiles, wanted, min_tiles_per_split, kMaxSplits);
  return {static_cast<int>(split.splits), static_cast<int>(split.steps_per_split)};
}

// Launch `kernel` (params, extra...) over BM×BN tiles of C, split along K as `split` says (where a
// workspace was given; else in one pass), then split_k_reduce if it was split. One block per tile
// and split (grid x: row tiles, y: column tiles, z: splits), or, `persistent`, one block per SM at
// most, each walking the (split, tile) pairs blockIdx.x, + gridDim.x, ... (split-major).
template <typename Kernel, typename... Extra>
cudaError_t launch_tiles(Kernel kernel, Params params, Split split, int BM, int BN, int threads, int smem_bytes,
                         bool persistent, cudaStream_t stream, const Extra&... extra) {
  const GemmParams& g = params.g;
  const int64_t tiles_m = dev::cdiv(g.M, BM), tiles_n = dev::cdiv(g.N, BN);
  if (tiles_m > 2147483647LL || tiles_n > 65535) return cudaErrorInvalidConfiguration;
  const bool split_k = split.splits > 1 && g.workspace != nullptr;
  params.splits = split_k ? split.splits : 1;
  params.tiles_per_split = split_k ? split.tiles_per_split : 2147483647;    // unsplit: one z takes all tiles
  const cudaError_t smem_ok = dev::allow_dynamic_smem(kernel, smem_bytes);  // per call: per device
  if (smem_ok != cudaSuccess) return smem_ok;
  const int64_t units = tiles_m * tiles_n * params.splits;
  const dim3 grid = persistent ? dim3(static_cast<unsigned>(units < dev::sm_count() ? units : dev::sm_count()))
                               : dim3(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_n),
                                      static_cast<unsigned>(params.splits));
  LORA_LAUNCH(kernel, grid, threads, smem_bytes, stream, params, extra...);
  const cudaError_t err = dev::last_launch_error();
  if (err != cudaSuccess || !split_k) return err;
  return detail::launch_split_k_reduce(params.dtype, g, params.splits, stream);
}

// f(p_k_major, q_k_major) with both as std::integral_constant<bool, ...>, so that f can pass them
// on as template arguments: one kernel instance per pair of operand layouts.
template <typename F>
cudaError_t with_layouts(const GemmParams& g, F&& f) {
  using K = std::true_type;
  using I = std::false_type;
  if (p_is_k_major(g)) return q_is_k_major(g) ? f(K{}, K{}) : f(K{}, I{});
  return q_is_k_major(g) ? f(I{}, K{}) : f(I{}, I{});
}

}  // namespace tensor_core
}  // namespace lora_kernels
