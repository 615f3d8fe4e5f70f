// Tensor-core GEMM with the fused LoRA term, for float16 and bfloat16:
//     C = alpha·P·Q + alpha2·P2·Q2 + bias      (P2·Q2: the rank-r product, K2 = r)
// (times the multi-adapter mask of lora_gemm.h, where one is given).
//
// Tiling. A block owns a BM×BN tile of C; its warps form a WARPS_M × WARPS_N grid and each warp
// owns a (BM/WARPS_M) × (BN/WARPS_N) piece, computed with mma.sync m16n8k16 (fp32 accumulators in
// registers). K is walked in steps of BK = 32; the K steps of P·Q and then those of P2·Q2 form one
// stream of tiles, so the LoRA product is just a few more steps of the same pipeline into the same
// accumulators (rescaled by alpha/alpha2 at the switch, and by alpha2 at the end).
//
// Pipeline. STAGES shared-memory buffers are filled by cp.async (16-byte copies, zero-filled past
// the edges of the matrices) STAGES - 1 tiles ahead of the tile being multiplied.
//
// Split-K. A product with too few output tiles to fill the GPU (the skinny x·Aᵀ, dY·B, gᵀ·x,
// dYᵀ·xa, whose K can be the batch size; dY·W₀ at decode sizes) has its stream of K tiles split
// over blockIdx.z; each split writes its scaled fp32 partial sums and split_k_reduce (lora_gemm.cu)
// adds them in a fixed order (deterministic) and writes sum + bias.
//
// Layouts. Each operand tile is stored in shared memory the way it lies in global memory, so every
// copy is a contiguous 16-byte chunk: "k-major" ([i][k], the k index contiguous, e.g. x or W₀ for
// x·W₀ᵀ) or "i-major" ([k][i], e.g. W₀ for dY·W₀ or gᵀ for gᵀ·x). ldmatrix reads k-major tiles
// and ldmatrix.trans i-major ones into the same fragments. The 16-byte chunks of a row are
// XOR-swizzled with the row index so that the eight rows one ldmatrix phase reads hit eight
// different bank groups. An operand whose layout or alignment does not allow 16-byte copies
// (say B with r = 4, or a strided view) is staged element by element into the same layout.
#include "device.cuh"
#include "lora_gemm.h"

namespace lora_kernels {
namespace tensor_core {

constexpr int kBK = 32;

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct Config {
  static constexpr int kBM = BM_, kBN = BN_, kWarpsM = WARPS_M_, kWarpsN = WARPS_N_, kStages = STAGES_;
  static constexpr int kThreads = 32 * WARPS_M_ * WARPS_N_;
  static constexpr int kWarpM = BM_ / WARPS_M_, kWarpN = BN_ / WARPS_N_;
  static constexpr int kFragsM = kWarpM / 16, kFragsN = kWarpN / 8;  // mma tiles per warp
  static constexpr int kSmemBytes = STAGES_ * (BM_ + BN_) * kBK * 2;
  static_assert(kFragsN % 2 == 0, "B fragments are loaded 16 columns at a time");
  static_assert(BM_ >= 64 && BN_ >= 64, "i-major tiles swizzle over 8 chunks per row");
};
// Large problems: 128×128 tiles, 8 warps of 64×32, 4 stages (64 KiB of shared memory).
using LargeTiles = Config<128, 128, 2, 4, 4>;
// Few rows or columns (decode-sized backward products): 64×64 tiles, 4 warps of 32×32, so the
// grid still spreads over the SMs.
using SmallTiles = Config<64, 64, 2, 2, 3>;

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
  bool vec[4];     // P, Q, P2, Q2 can be staged with aligned 16-byte copies
  bool pair_store;  // two neighbouring outputs of a row can be written as one 32-bit store
  int splits, tiles_per_split;  // split-K: blockIdx.z takes K tiles [z·tiles_per_split, +tiles_per_split)
};

constexpr int kMinTilesPerSplit = 4;  // 128 of K: enough steps to fill the pipeline
constexpr int kMaxSplits = 64;

// Element offset of (i, k) inside one operand tile of TILE_I × kBK elements.
template <int TILE_I, bool K_MAJOR>
__host__ __device__ __forceinline__ int tile_offset(int i, int k) {
  if (K_MAJOR) {  // [i][k]: 4 chunks of 8 per row; rows 2j and 2j+1 share a swizzle
    return (i * (kBK / 8) + ((k >> 3) ^ ((i >> 1) & 3))) * 8 + (k & 7);
  } else {        // [k][i]: TILE_I / 8 chunks per row
    return (k * (TILE_I / 8) + ((i >> 3) ^ (k & 7))) * 8 + (i & 7);
  }
}

// Stage tile (i0.., k0..) of `v` into `tile`: 16-byte cp.async chunks if `vec`, else element by
// element. Outside the matrix the tile holds zeros, so edge tiles need no other care.
template <typename T, int TILE_I, bool K_MAJOR, int THREADS>
__device__ __forceinline__ void load_tile(T* tile, const View& v, int64_t i0, int64_t k0, bool vec) {
  const T* src = static_cast<const T*>(v.ptr);
  if (vec) {
    constexpr int kChunksPerRow = K_MAJOR ? kBK / 8 : TILE_I / 8;
    for (int c = threadIdx.x; c < TILE_I * kBK / 8; c += THREADS) {
      const int i = K_MAJOR ? c / kChunksPerRow : (c % kChunksPerRow) * 8;
      const int k = K_MAJOR ? (c % kChunksPerRow) * 8 : c / kChunksPerRow;
      const int64_t gi = i0 + i, gk = k0 + k;
      int64_t valid = K_MAJOR ? (gi < v.extent_i ? v.extent_k - gk : 0) : (gk < v.extent_k ? v.extent_i - gi : 0);
      valid = valid < 0 ? 0 : (valid > 8 ? 8 : valid);
      const T* from = valid > 0 ? src + gi * v.stride_i + gk * v.stride_k : src;
      dev::cp_async_16(tile + tile_offset<TILE_I, K_MAJOR>(i, k), from, static_cast<int>(valid) * 2);
    }
  } else {
    for (int e = threadIdx.x; e < TILE_I * kBK; e += THREADS) {
      const int i = K_MAJOR ? e / kBK : e % TILE_I;  // the contiguous index fastest, to coalesce
      const int k = K_MAJOR ? e % kBK : e / TILE_I;
      const int64_t gi = i0 + i, gk = k0 + k;
      tile[tile_offset<TILE_I, K_MAJOR>(i, k)] =
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

template <typename T, typename Cfg, bool P_K_MAJOR, bool Q_K_MAJOR>
__global__ void __launch_bounds__(Cfg::kThreads) tensor_core_gemm(Params params) {
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kStages = Cfg::kStages, kThreads = Cfg::kThreads;
  constexpr int kFragsM = Cfg::kFragsM, kFragsN = Cfg::kFragsN;
  constexpr int kTileP = kBM * kBK, kTileQ = kBN * kBK;
  LORA_DYNAMIC_SMEM(smem);
  T* stages = reinterpret_cast<T*>(smem);

  const GemmParams& g = params.g;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const Views ops = views_of(g);
  const int k_tiles = static_cast<int>(dev::cdiv(g.K, kBK));
  const int all_tiles = k_tiles + static_cast<int>(dev::cdiv(g.K2, kBK));
  const int first_tile = blockIdx.z * params.tiles_per_split;  // this split's share of the tiles
  const int total_tiles =
      all_tiles - first_tile < params.tiles_per_split ? all_tiles - first_tile : params.tiles_per_split;

  auto load = [&](int local) {
    const int t = first_tile + local;
    T* p_tile = stages + (local % kStages) * (kTileP + kTileQ);
    T* q_tile = p_tile + kTileP;
    if (t < k_tiles) {
      load_tile<T, kBM, P_K_MAJOR, kThreads>(p_tile, ops.P, m0, int64_t(t) * kBK, params.vec[0]);
      load_tile<T, kBN, Q_K_MAJOR, kThreads>(q_tile, ops.Q, n0, int64_t(t) * kBK, params.vec[1]);
    } else {
      load_tile<T, kBM, P_K_MAJOR, kThreads>(p_tile, ops.P2, m0, int64_t(t - k_tiles) * kBK, params.vec[2]);
      load_tile<T, kBN, Q_K_MAJOR, kThreads>(q_tile, ops.Q2, n0, int64_t(t - k_tiles) * kBK, params.vec[3]);
    }
  };

  // Prologue: the first STAGES - 1 tiles in flight (an empty group where there are fewer, so that
  // the group count in the main loop's wait stays right).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < total_tiles) load(s);
    dev::cp_async_commit();
  }

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warp_m0 = (warp / Cfg::kWarpsN) * Cfg::kWarpM, warp_n0 = (warp % Cfg::kWarpsN) * Cfg::kWarpN;
  float acc[kFragsM][kFragsN][4] = {};

  for (int t = 0; t < total_tiles; ++t) {
    dev::cp_async_wait<kStages - 2>();  // tile t has landed ...
    __syncthreads();                     // ... for every thread, and tile t - 1's buffer is free
    if (t + kStages - 1 < total_tiles) load(t + kStages - 1);
    dev::cp_async_commit();
    if (first_tile + t == k_tiles && g.K2 > 0) {  // from here on P2·Q2: acc = alpha/alpha2 · P·Q, scaled by alpha2 at the end
      const float ratio = g.alpha / g.alpha2;
#pragma unroll
      for (int i = 0; i < kFragsM; ++i)
#pragma unroll
        for (int j = 0; j < kFragsN; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][j][e] *= ratio;
    }
    const T* p_tile = stages + (t % kStages) * (kTileP + kTileQ);
    const T* q_tile = p_tile + kTileP;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t a[kFragsM][4], b[kFragsN][2];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) {
        // A fragment = four 8×8 tiles: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (0-7, 8-15), (8-15, 8-15).
        const int row = warp_m0 + i * 16;
        if (P_K_MAJOR) {
          dev::ldmatrix_x4(a[i], p_tile + tile_offset<kBM, true>(row + lane % 16, kk + (lane / 16) * 8));
        } else {
          dev::ldmatrix_x4_trans(a[i], p_tile + tile_offset<kBM, false>(row + ((lane / 8) % 2) * 8,
                                                                          kk + lane % 8 + (lane / 16) * 8));
        }
      }
#pragma unroll
      for (int j = 0; j < kFragsN; j += 2) {
        // Two B fragments (columns 0-7 and 8-15), each k 0-7 then k 8-15.
        const int col = warp_n0 + j * 8;
        uint32_t r[4];
        if (Q_K_MAJOR) {
          dev::ldmatrix_x4(r, q_tile + tile_offset<kBN, true>(col + lane % 8 + (lane / 16) * 8,
                                                              kk + ((lane / 8) % 2) * 8));
        } else {
          dev::ldmatrix_x4_trans(r, q_tile + tile_offset<kBN, false>(col + (lane / 16) * 8,
                                                                     kk + lane % 8 + ((lane / 8) % 2) * 8));
        }
        b[j][0] = r[0];
        b[j][1] = r[1];
        b[j + 1][0] = r[2];
        b[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < kFragsM; ++i)
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) dev::mma_16816<T>(acc[i][j], a[i], b[j]);
    }
  }

  // Epilogue: accumulator element e of fragment (i, j) is row g + 8·(e / 2), column 2t + e % 2.
  // acc holds alpha/alpha2·P·Q + P2·Q2 if this block's tiles reached P2·Q2, else P·Q.
  const float out_scale = g.K2 > 0 && first_tile + total_tiles > k_tiles ? g.alpha2 : g.alpha;
  if (params.splits > 1) {  // scaled fp32 partial sums, [split][M][N]; split_k_reduce finishes
    float* partial = g.workspace + static_cast<int64_t>(blockIdx.z) * g.M * g.N;
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < kFragsN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t m = m0 + warp_m0 + i * 16 + lane / 4 + 8 * (e / 2);
          const int64_t n = n0 + warp_n0 + j * 8 + 2 * (lane % 4) + e % 2;
          if (m < g.M && n < g.N) partial[m * g.N + n] = out_scale * acc[i][j][e];
        }
    return;
  }
  const T* bias = static_cast<const T*>(g.bias);
  T* c = static_cast<T*>(g.C);
#pragma unroll
  for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t m = m0 + warp_m0 + i * 16 + lane / 4 + 8 * half;
      if (m >= g.M) continue;
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        const int64_t n = n0 + warp_n0 + j * 8 + 2 * (lane % 4);
        float v[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          v[e] = out_scale * adapter_keep(g.adapters, m, n + e) * acc[i][j][2 * half + e];
          if (bias != nullptr && n + e < g.N) v[e] += dev::to_float(bias[n + e]);
        }
        T* out = c + m * g.stride_cm + n * g.stride_cn;
        if (params.pair_store && n + 1 < g.N) {
          *reinterpret_cast<uint32_t*>(out) = pack_pair<T>(v[0], v[1]);
        } else {
          if (n < g.N) out[0] = dev::from_float<T>(v[0]);
          if (n + 1 < g.N) out[g.stride_cn] = dev::from_float<T>(v[1]);
        }
      }
    }
  }
}

// Can tile loads of `v` in this layout be 16-byte copies? The contiguous index must have unit
// stride, and every row of the layout must start on a 16-byte boundary.
bool vector_loadable(const View& v, bool k_major) {
  const int64_t unit = k_major ? v.stride_k : v.stride_i, step = k_major ? v.stride_i : v.stride_k;
  const int64_t rows = k_major ? v.extent_i : v.extent_k;
  return v.ptr != nullptr && unit == 1 && (rows <= 1 || step % 8 == 0) && dev::aligned16(v.ptr);
}

// 128×128 tiles only when both sides of C span a few of them; else 64×64.
bool use_large_tiles(const GemmParams& g) { return g.M > 256 && g.N > 256; }

struct Split {
  int splits, tiles_per_split;
};

// When the output tiles fill less than one wave of SMs: enough splits of the K tiles (those of P·Q
// then P2·Q2) for about two blocks per SM, each split at least kMinTilesPerSplit K steps.
template <typename Cfg>
Split plan_split(const GemmParams& g) {
  const int all_tiles = static_cast<int>(dev::cdiv(g.K, kBK) + dev::cdiv(g.K2, kBK));
  const int64_t blocks = dev::cdiv(g.M, Cfg::kBM) * dev::cdiv(g.N, Cfg::kBN);
  const int sms = dev::sm_count();
  const int64_t wanted = blocks >= sms ? 1 : dev::cdiv(2 * sms, blocks);
  int64_t splits = wanted < all_tiles / kMinTilesPerSplit ? wanted : all_tiles / kMinTilesPerSplit;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  if (splits <= 1) return {1, all_tiles > 0 ? all_tiles : 1};
  const int per_split = static_cast<int>(dev::cdiv(all_tiles, splits));
  return {static_cast<int>(dev::cdiv(all_tiles, per_split)), per_split};  // no empty split
}

template <typename T, typename Cfg, bool P_K_MAJOR, bool Q_K_MAJOR>
cudaError_t launch_with(Params params, cudaStream_t stream) {
  const GemmParams& g = params.g;
  const int64_t tiles_m = dev::cdiv(g.M, Cfg::kBM), tiles_n = dev::cdiv(g.N, Cfg::kBN);
  if (tiles_m > 2147483647LL || tiles_n > 65535) return cudaErrorInvalidConfiguration;
  const Split split = plan_split<Cfg>(g);
  const bool split_k = split.splits > 1 && g.workspace != nullptr;  // no scratch given: one pass
  params.splits = split_k ? split.splits : 1;
  params.tiles_per_split = split_k ? split.tiles_per_split : 2147483647;  // unsplit: one z takes all tiles
  auto kernel = tensor_core_gemm<T, Cfg, P_K_MAJOR, Q_K_MAJOR>;
  const cudaError_t smem_ok = dev::allow_dynamic_smem(kernel, Cfg::kSmemBytes);  // per call: per device
  if (smem_ok != cudaSuccess) return smem_ok;
  const dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_n), static_cast<unsigned>(params.splits));
  LORA_LAUNCH(kernel, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, params);
  const cudaError_t err = dev::last_launch_error();
  if (err != cudaSuccess || !split_k) return err;
  return detail::launch_split_k_reduce(params.dtype, g, params.splits, stream);
}

template <typename T, typename Cfg>
cudaError_t launch_for_layouts(const Params& params, bool p_k_major, bool q_k_major, cudaStream_t stream) {
  if (p_k_major) {
    return q_k_major ? launch_with<T, Cfg, true, true>(params, stream) : launch_with<T, Cfg, true, false>(params, stream);
  }
  return q_k_major ? launch_with<T, Cfg, false, true>(params, stream) : launch_with<T, Cfg, false, false>(params, stream);
}

template <typename T>
cudaError_t launch_typed(const Params& params, bool p_k_major, bool q_k_major, cudaStream_t stream) {
  return use_large_tiles(params.g) ? launch_for_layouts<T, LargeTiles>(params, p_k_major, q_k_major, stream)
               : launch_for_layouts<T, SmallTiles>(params, p_k_major, q_k_major, stream);
}

}  // namespace tensor_core

namespace detail {

int64_t tensor_core_workspace_elems(const GemmParams& g) {
  using namespace tensor_core;
  const Split split = use_large_tiles(g) ? plan_split<LargeTiles>(g) : plan_split<SmallTiles>(g);
  return split.splits > 1 ? split.splits * g.M * g.N : 0;
}

cudaError_t launch_tensor_core(DType dtype, const GemmParams& g, cudaStream_t stream) {
  using namespace tensor_core;
  const Views ops = views_of(g);
  const View &P = ops.P, &Q = ops.Q;
  // Each operand is staged in the layout it has in memory (k contiguous: k-major); the LoRA
  // operands share the main product's layouts, falling back to element loads where theirs differ.
  const bool p_k_major = !(P.stride_i == 1 && P.stride_k != 1);
  const bool q_k_major = !(Q.stride_i == 1 && Q.stride_k != 1);
  Params params{g, dtype, {vector_loadable(P, p_k_major), vector_loadable(Q, q_k_major),
                    g.K2 > 0 && vector_loadable(ops.P2, p_k_major), g.K2 > 0 && vector_loadable(ops.Q2, q_k_major)},
                g.stride_cn == 1 && g.stride_cm % 2 == 0 && reinterpret_cast<uintptr_t>(g.C) % 4 == 0, 1, 0};
  switch (dtype) {
    case DType::kFloat16: return launch_typed<__half>(params, p_k_major, q_k_major, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(params, p_k_major, q_k_major, stream);
    case DType::kFloat32: break;
  }
  return cudaErrorInvalidValue;  // float32 has no 16-bit tensor-core path (launch_gemm sends it to SIMT)
}

}  // namespace detail
}  // namespace lora_kernels
