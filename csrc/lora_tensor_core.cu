// Tensor-core GEMM on mma.sync (every GPU since sm_80), for float16 and bfloat16; what it computes,
// and the helpers it shares with the wgmma kernel of lora_wgmma.cu, are in tensor_core.cuh.
//
// Tiling. A block owns a BM×BN tile of C; its warps form a WARPS_M × WARPS_N grid and each warp
// owns a (BM/WARPS_M) × (BN/WARPS_N) piece, computed with mma.sync m16n8k16 (fp32 accumulators in
// registers). K is walked in steps of BK = 32; the K steps of P·Q and then those of P2·Q2 form one
// stream of tiles, so the LoRA product is just a few more steps of the same pipeline into the same
// accumulators.
//
// Pipeline. STAGES shared-memory buffers are filled by cp.async (16-byte copies, zero-filled past
// the edges of the matrices) STAGES - 1 tiles ahead of the tile being multiplied.
//
// Split-K. A product with too few output tiles to fill the GPU (the skinny x·Aᵀ, dY·B, gᵀ·x,
// dYᵀ·xa, whose K can be the batch size; dY·W₀ at decode sizes) has its stream of K tiles split
// over blockIdx.z; each split writes its scaled fp32 partial sums and split_k_reduce (lora_gemm.cu)
// adds them in a fixed order (deterministic) and writes sum + bias.
//
// Layouts. Tiles are stored k-major or i-major as their operand lies in memory (tensor_core.cuh);
// ldmatrix reads k-major tiles and ldmatrix.trans i-major ones into the same fragments. The 16-byte
// chunks of a row are XOR-swizzled with the row index so that the eight rows one ldmatrix phase
// reads hit eight different bank groups. An operand whose layout or alignment does not allow
// 16-byte copies (say B with r = 4, or a strided view) is staged element by element into the same
// layout.
#include "tensor_core.cuh"

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

constexpr int kMinTilesPerSplit = 4;  // 128 of K: enough steps to fill the pipeline

// An operand tile of TILE_I × kBK elements (tensor_core.cuh's Layout).
template <int TILE_I, bool K_MAJOR>
struct MmaTile {
  static constexpr int kTileI = TILE_I, kTileK = kBK;
  static constexpr bool kKMajor = K_MAJOR;
  __host__ __device__ __forceinline__ static int offset(int i, int k) {
    if (K_MAJOR) {  // [i][k]: 4 chunks of 8 per row; rows 2j and 2j+1 share a swizzle
      return (i * (kBK / 8) + ((k >> 3) ^ ((i >> 1) & 3))) * 8 + (k & 7);
    } else {  // [k][i]: TILE_I / 8 chunks per row
      return (k * (TILE_I / 8) + ((i >> 3) ^ (k & 7))) * 8 + (i & 7);
    }
  }
};

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
  const TileRange range = tile_range<kBK>(params, blockIdx.z);  // this split's share of the K tiles
  const int k_tiles = range.k_tiles, first_tile = range.first, total_tiles = range.count;

  auto load = [&](int local) {
    const int t = first_tile + local;
    T* p_tile = stages + (local % kStages) * (kTileP + kTileQ);
    T* q_tile = p_tile + kTileP;
    if (t < k_tiles) {
      load_tile<T, MmaTile<kBM, P_K_MAJOR>, kThreads>(p_tile, ops.P, m0, int64_t(t) * kBK, params.vec[0]);
      load_tile<T, MmaTile<kBN, Q_K_MAJOR>, kThreads>(q_tile, ops.Q, n0, int64_t(t) * kBK, params.vec[1]);
    } else {
      load_tile<T, MmaTile<kBM, P_K_MAJOR>, kThreads>(p_tile, ops.P2, m0, int64_t(t - k_tiles) * kBK, params.vec[2]);
      load_tile<T, MmaTile<kBN, Q_K_MAJOR>, kThreads>(q_tile, ops.Q2, n0, int64_t(t - k_tiles) * kBK, params.vec[3]);
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
    __syncthreads();                    // ... for every thread, and tile t - 1's buffer is free
    if (t + kStages - 1 < total_tiles) load(t + kStages - 1);
    dev::cp_async_commit();
    if (range.rescale_before(t, g)) {  // from here on P2·Q2: acc = alpha/alpha2 · P·Q, scaled by alpha2 at the end
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
          dev::ldmatrix_x4(a[i], p_tile + MmaTile<kBM, true>::offset(row + lane % 16, kk + (lane / 16) * 8));
        } else {
          dev::ldmatrix_x4_trans(
              a[i], p_tile + MmaTile<kBM, false>::offset(row + ((lane / 8) % 2) * 8, kk + lane % 8 + (lane / 16) * 8));
        }
      }
#pragma unroll
      for (int j = 0; j < kFragsN; j += 2) {
        // Two B fragments (columns 0-7 and 8-15), each k 0-7 then k 8-15.
        const int col = warp_n0 + j * 8;
        uint32_t r[4];
        if (Q_K_MAJOR) {
          dev::ldmatrix_x4(
              r, q_tile + MmaTile<kBN, true>::offset(col + lane % 8 + (lane / 16) * 8, kk + ((lane / 8) % 2) * 8));
        } else {
          dev::ldmatrix_x4_trans(
              r, q_tile + MmaTile<kBN, false>::offset(col + (lane / 16) * 8, kk + lane % 8 + ((lane / 8) % 2) * 8));
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
  const float out_scale = range.out_scale(g);
#pragma unroll
  for (int i = 0; i < kFragsM; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t m = m0 + warp_m0 + i * 16 + lane / 4 + 8 * half;
#pragma unroll
      for (int j = 0; j < kFragsN; ++j)
        store_pair<T>(params, blockIdx.z, m, n0 + warp_n0 + j * 8 + 2 * (lane % 4), out_scale * acc[i][j][2 * half],
                      out_scale * acc[i][j][2 * half + 1]);
    }
}

// 128×128 tiles only when both sides of C span a few of them; else 64×64.
bool use_large_tiles(const GemmParams& g) { return g.M > 256 && g.N > 256; }

template <typename Cfg>
Split plan_split_for(const GemmParams& g) {
  return plan_split(g, Cfg::kBM, Cfg::kBN, kBK, kMinTilesPerSplit, 2);
}

template <typename T, typename Cfg>
cudaError_t launch_typed(const Params& params, cudaStream_t stream) {
  return with_layouts(params.g, [&](auto p_k_major, auto q_k_major) {
    auto kernel = tensor_core_gemm<T, Cfg, decltype(p_k_major)::value, decltype(q_k_major)::value>;
    return launch_tiles(kernel, params, plan_split_for<Cfg>(params.g), Cfg::kBM, Cfg::kBN, Cfg::kThreads,
                        Cfg::kSmemBytes, false, stream);
  });
}

template <typename T>
cudaError_t launch_sized(const Params& params, cudaStream_t stream) {
  return use_large_tiles(params.g) ? launch_typed<T, LargeTiles>(params, stream)
                                   : launch_typed<T, SmallTiles>(params, stream);
}

}  // namespace tensor_core

namespace detail {

int64_t tensor_core_workspace_elems(const GemmParams& g) {
  using namespace tensor_core;
  const Split split = use_large_tiles(g) ? plan_split_for<LargeTiles>(g) : plan_split_for<SmallTiles>(g);
  return split.splits > 1 ? split.splits * g.M * g.N : 0;
}

cudaError_t launch_tensor_core(DType dtype, const GemmParams& g, cudaStream_t stream) {
  using namespace tensor_core;
  const Params params = make_params(dtype, g);
  switch (dtype) {
    case DType::kFloat16: return launch_sized<__half>(params, stream);
    case DType::kBFloat16: return launch_sized<__nv_bfloat16>(params, stream);
    case DType::kFloat32: break;
  }
  return cudaErrorInvalidValue;  // float32 has no 16-bit tensor-core path (launch_gemm sends it to SIMT)
}

}  // namespace detail
}  // namespace lora_kernels
