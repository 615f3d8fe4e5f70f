// Tensor-core GEMM on wgmma (sm_90a: H100, H200), for float16 and bfloat16; what it computes, and
// the helpers it shares with the mma.sync kernel of lora_tensor_core.cu, are in tensor_core.cuh.
// launch_gemm picks it where the device runs it and LORA_KERNELS_WGMMA=1 asks for it, for products
// of at least 256 columns: from 65 rows on 128×256 tiles, up to 64 rows computed transposed
// (transposed_problem below).
//
// Tiling. A block of two warpgroups (256 threads) owns a 128×BN tile of C; warpgroup w computes
// rows 64w..64w+63 with wgmma m64nBNk16, its BN/2 fp32 accumulators per thread in registers. BN is
// 256 (WideTiles), or 32 for the transposed few-row products (NarrowTiles). A wgmma reads both
// operands from shared memory itself (no ldmatrix, no per-warp fragments): one m64n256k16 does the
// work of 128 mma.sync.
//
// Pipeline. K is walked in steps of BK = 64 (one 128-byte row of 16-bit elements per tile row),
// the K tiles of P·Q and then those of P2·Q2 as one stream (tensor_core.cuh). The wgmmas of tile t
// run while those of tile t - 1 may still be in flight, so a stage is refilled only once the
// wgmmas that read it have been waited for. Two kernels:
//   wgmma_gemm_producer (the default where all operands allow TMA: unit stride, 16-byte aligned
//     rows): warp-specialized. A producer warpgroup, of which one thread starts the bulk tensor
//     copies (TMA) of each stage, runs up to STAGES tiles ahead; the two consumer warpgroups only
//     wait and multiply. Stages change hands through mbarriers, with no block-wide barrier, and the
//     blocks are persistent (one per SM, each walking several tiles), so the next tile loads during
//     this one's epilogue.
//   wgmma_gemm: one block per tile, all 256 threads multiply; STAGES buffers are filled STAGES - 2
//     tiles ahead, in step with the multiplication (the refill at step t goes into the buffer of
//     tile t - 2, after a barrier): by TMA started by one thread (LORA_KERNELS_WGMMA_LOADS=tma), or
//     by every thread with cp.async chunks or element stores as in the mma.sync kernel. Those are
//     generic-proxy writes, so each thread fences them (fence.proxy.async) before the barrier after
//     which the tensor cores read.
//
// Epilogue. Keep and bias in fp32, then C written once: through 2 KiB of shared memory per warp
// as 16-byte stores of whole 128-byte row segments where C's rows are 16-byte aligned, else as the
// 32-bit pairs of the accumulator layout (store_tile).
//
// Layouts. Every tile is stored with the 128-byte swizzle that wgmma's matrix descriptors read
// (device.cuh, sw128_descriptor) and TMA writes: K-major operands as rows of 64 k; MN-major ones (W₀
// in dY·W₀) as 64-wide column blocks of BK rows, read with wgmma's transpose bit.

#include "switches.h"
#include "tensor_core.cuh"

namespace lora_kernels {
namespace wgmma {

using namespace tensor_core;

constexpr int kBM = 128, kBK = 64;
constexpr int kThreads = 256;          // two warpgroups, one per 64 rows of the tile
constexpr int kProducerThreads = 128;  // wgmma_gemm_producer: one more warpgroup, which starts the copies
// ... and registers per thread there: launched with 168 (65536 / 384), the producer warpgroup gives
// back all but 40 and the consumers take up to 232 (40·128 + 232·256 ≤ 65536), so that their 128
// accumulators (128×256 tiles) and the addressing fit without spilling.
constexpr int kProducerRegisters = 40, kConsumerRegisters = 232;
constexpr int kMinTilesPerSplit = 2;  // 128 of K
constexpr int kGroupM = 8;            // row tiles per group of the launch order

// The epilogue's staging (store_tile_staged): per consumer warp, its 16 rows of the tile, 64 columns
// (one 128-byte row of 16-bit elements) at a time.
constexpr int kStagedColumns = 64;
constexpr int kStagingBytes = (kThreads / 32) * 16 * kStagedColumns * 2;  // 16 KiB
// Tiles of BN columns stage their epilogue (and have the staging in shared memory) where BN is
// whole staged column blocks: the 128×256 tiles, not the transposed 128×32 ones.
constexpr bool staged_epilogue(int BN) { return BN % kStagedColumns == 0; }

template <int BN_, int STAGES_>
struct Config {
  static constexpr int kBN = BN_, kStages = STAGES_;
  static constexpr int kStageElems = (kBM + BN_) * kBK, kStageBytes = kStageElems * 2;
  // The stages, room to align them to 1024 bytes, two mbarriers per stage and the epilogue's
  // staging where it runs (see Stages).
  static constexpr int kEpilogueBytes = staged_epilogue(BN_) ? kStagingBytes : 0;
  static constexpr int kSmemBytes = STAGES_ * kStageBytes + 1024 + 2 * STAGES_ * 8 + kEpilogueBytes;
};
// 128×256 tiles, 4 stages (192 KiB, 209 KiB in all): products of more than 64 rows.
using WideTiles = Config<256, 4>;
// 128×32 tiles, 8 stages (160 KiB; pairs stored, no staging): products of at most 64 rows computed transposed (see
// transposed_problem), W₀ on the 128-row side; memory-bound, so 6 tiles of W₀ in flight per block.
using NarrowTiles = Config<32, 8>;

// A TILE_I × kBK operand tile in the 128-byte-swizzled layout (tensor_core.cuh's Layout).
template <int TILE_I, bool K_MAJOR>
struct Sw128Tile {
  static constexpr int kTileI = TILE_I, kTileK = kBK;
  static constexpr bool kKMajor = K_MAJOR;
  static constexpr int kColumnBlockElems = 64 * kBK;  // MN-major: one 64-wide block of all kBK rows
  __host__ __device__ __forceinline__ static int offset(int i, int k) {
    if (K_MAJOR) {  // row i = 64 k (128 bytes), chunk k/8 swizzled with i % 8
      return i * kBK + (((k >> 3) ^ (i & 7)) << 3) + (k & 7);
    } else {  // column block i/64, row k = 64 i (128 bytes), chunk (i % 64)/8 swizzled with k % 8
      return (i >> 6) * kColumnBlockElems + k * 64 + ((((i & 63) >> 3) ^ (k & 7)) << 3) + (i & 7);
    }
  }
  // TMA: the tile (i0.., k0..) of the operand `map` describes (K-major: boxes of 64 k × TILE_I
  // rows; MN-major: boxes of 64 columns × kBK rows, one per column block). A tile starts inside the
  // operand, but an MN-major column block can lie wholly past its extent_i: that box is not copied
  // (its stale columns only feed outputs past the edge, which are not written).
  __device__ __forceinline__ static int boxes(int64_t i0, int64_t extent_i) {
    if (K_MAJOR) return 1;
    const int64_t blocks = (extent_i - i0 + 63) / 64;
    return blocks < TILE_I / 64 ? static_cast<int>(blocks) : TILE_I / 64;
  }
  __device__ __forceinline__ static uint32_t box_bytes() { return 2 * (K_MAJOR ? TILE_I * kBK : kColumnBlockElems); }
  __device__ __forceinline__ static void copy(void* tile, const CUtensorMap* map, int64_t i0, int64_t k0, int count,
                                              uint64_t* bar) {
    if (K_MAJOR) {
      dev::tma_load_2d(tile, map, static_cast<int32_t>(k0), static_cast<int32_t>(i0), bar);
    } else {
#pragma unroll
      for (int b = 0; b < TILE_I / 64; ++b)
        if (b < count)
          dev::tma_load_2d(static_cast<char*>(tile) + 2 * b * kColumnBlockElems, map, static_cast<int32_t>(i0 + 64 * b),
                           static_cast<int32_t>(k0), bar);
    }
  }
  // Descriptor of the 16 k from kk on of the rows (or columns) from i0 on; i0 a multiple of 64.
  __device__ __forceinline__ static uint64_t descriptor(uint32_t tile_address, int i0, int kk) {
    if (K_MAJOR) return dev::sw128_descriptor(tile_address + 2 * (i0 * kBK + kk), 16, 1024);
    return dev::sw128_descriptor(tile_address + 2 * ((i0 >> 6) * kColumnBlockElems + kk * 64), 2 * kColumnBlockElems,
                                 1024);
  }
};

// The operands' tensor maps, for the TMA variants (kernel parameters: the copy engine reads them there).
struct TensorMaps {
  CUtensorMap P, Q, P2, Q2;
};

// The kernels run only on sm_90a: the device code for other architectures (sm_80) leaves their
// bodies out. (The CPU emulation and the host pass compile them.)
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LORA_WGMMA_KERNEL_BODY 1
#endif

// Shared memory: kStages stages of a P tile then a Q tile, each starting on a 1024-byte boundary
// (the swizzle repeats every 1024 bytes of the shared address space), then one mbarrier per stage
// that its TMA copies complete on (`landed`) and, in the producer kernel, one per stage that the
// consumers arrive on when they are done with it (`freed`), then the epilogue's staging.
template <typename T, typename Cfg>
struct Stages {
  T* tiles;
  uint32_t address;
  uint64_t *landed, *freed;
  T* staging;  // 16-byte aligned: the stages are whole KiB, the barriers 16 bytes per stage
  __device__ __forceinline__ explicit Stages(unsigned char* smem) {
    tiles = reinterpret_cast<T*>(smem + (1024 - dev::smem_address(smem) % 1024) % 1024);
    address = dev::smem_address(tiles);
    landed = reinterpret_cast<uint64_t*>(tiles + Cfg::kStages * Cfg::kStageElems);
    freed = landed + Cfg::kStages;
    staging = reinterpret_cast<T*>(freed + Cfg::kStages);
  }
  __device__ __forceinline__ T* p_tile(int s) const { return tiles + s * Cfg::kStageElems; }
  __device__ __forceinline__ uint32_t p_address(int s) const { return address + 2 * s * Cfg::kStageElems; }
};

// One block's share of the work: a 128×BN output tile, and its split's K tiles.
struct Work {
  int64_t m0, n0;
  int split;
  TileRange range;
};
// Work unit `unit` of tiles × splits, split-major, the tiles in grouped order (tensor_core.cuh).
template <int BN>
__device__ __forceinline__ Work work_of(const Params& params, int64_t unit) {
  const int64_t tiles_m = dev::cdiv(params.g.M, kBM), tiles_n = dev::cdiv(params.g.N, BN);
  const int split = static_cast<int>(unit / (tiles_m * tiles_n));
  const TileCoord tile = grouped_tile(unit % (tiles_m * tiles_n), tiles_m, tiles_n, kGroupM);
  return {tile.m * kBM, tile.n * BN, split, tile_range<kBK>(params, split)};
}

// One thread: start the bulk tensor copies of K tile `local` of the work into a stage, announcing
// their bytes on `bar` (boxes count whole, the parts past the tensor's edges zero-filled).
template <typename PTile, typename QTile, typename T>
__device__ __forceinline__ void copy_stage(T* p_tile, const TensorMaps& maps, const GemmParams& g, const Work& w,
                                           int local, uint64_t* bar) {
  const int t = w.range.first + local;
  const bool main = t < w.range.k_tiles;
  const int64_t k0 = int64_t(main ? t : t - w.range.k_tiles) * kBK;
  const int p_boxes = PTile::boxes(w.m0, g.M), q_boxes = QTile::boxes(w.n0, g.N);
  dev::mbarrier_arrive_expect_tx(bar, p_boxes * PTile::box_bytes() + q_boxes * QTile::box_bytes());
  PTile::copy(p_tile, main ? &maps.P : &maps.P2, w.m0, k0, p_boxes, bar);
  QTile::copy(p_tile + kBM * kBK, main ? &maps.Q : &maps.Q2, w.n0, k0, q_boxes, bar);
}

// acc (this warpgroup's 64 rows of the tile) += the product of the K tile staged at p_address, as
// one committed group of kBK/16 wgmmas; at the first tile (first) acc = that product instead.
template <typename T, int BN, bool P_K_MAJOR, bool Q_K_MAJOR>
__device__ __forceinline__ void multiply_stage(float (&acc)[BN / 2], uint32_t p_address, bool first) {
  using PTile = Sw128Tile<kBM, P_K_MAJOR>;
  using QTile = Sw128Tile<BN, Q_K_MAJOR>;
  const uint32_t q_address = p_address + 2 * kBM * kBK;
  const int warpgroup = threadIdx.x / 128;
  dev::wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 16) {
    dev::wgmma_m64nNk16<T, BN, !P_K_MAJOR, !Q_K_MAJOR>(acc, PTile::descriptor(p_address, 64 * warpgroup, kk),
                                                       QTile::descriptor(q_address, 0, kk), !first || kk > 0);
  }
  dev::wgmma_commit();
}

// acc = 0, for a tile with no K tiles at all (K = 0: bias alone). Otherwise the accumulators are
// never written by anything but wgmma before the epilogue: the first K tile's first wgmma overwrites
// them (multiply_stage, first), rather than acc being zeroed before the K loop. ptxas serializes
// every wgmma of a kernel whose accumulators other instructions define where a wgmma may be in
// flight (C7515; zeroing before the loop did that, nvcc 13.0), or whose waits it must insert on a
// conditional path (C7518; zeroing at the first tile inside the loop did that).
template <int N>
__device__ __forceinline__ void zero(float (&acc)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = 0.0f;
}

// Before the first K tile of P2·Q2, after some of P·Q, where alpha ≠ alpha2 (TileRange::rescale_before):
// acc = alpha/alpha2 · P·Q, so that alpha2 scales the sum at the end. (Its wait drains the wgmma
// pipeline once per tile; y, with alpha = alpha2 = 1, does not need it.)
template <int N>
__device__ __forceinline__ void rescale_before_lora(float (&acc)[N], const GemmParams& g) {
  dev::wgmma_wait<0>();
  dev::fence_accumulators(acc);
  const float ratio = g.alpha / g.alpha2;
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] *= ratio;
}

// Epilogue (after the last wgmma_wait): acc[4j + e] is row 16·(warp % 4) + lane/4 + 8·(e/2),
// column 8j + 2·(lane % 4) + e % 2 of this warpgroup's 64 rows, so warp w of the block holds rows
// 16w..16w+15 of the tile.
//
// Where C's rows take aligned 16-byte stores (Params::vector_store) and this tile is not a split's
// fp32 partial sum, each warp writes its 16 rows through its 2 KiB of `staging`, 64 columns at a
// time: keep and bias applied in fp32, the pairs of the accumulator layout written to shared
// memory, then read back and stored as 16-byte chunks, 8 lanes per 128-byte row segment, instead
// of 32-bit pairs spread over 8 rows and 4 half-used sectors per store. Chunk c of staged row r sits
// at chunk c ^ (r % 8), so that neither the pair writes nor the chunk reads of a warp meet a
// shared-memory bank twice. Elsewhere (C transposed or strided, split-K) the pairs are stored as
// they are (store_pair).
template <typename T, int BN>
__device__ __forceinline__ void store_tile_staged(const Params& params, const Work& w, const float (&acc)[BN / 2],
                                                  T* staging) {
  const GemmParams& g = params.g;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  T* const rows = staging + warp * 16 * kStagedColumns;  // this warp's 16 × 64 staging tile
  const T* const bias = static_cast<const T*>(g.bias);
  T* const C = static_cast<T*>(g.C);
  const int64_t m_warp = w.m0 + 16 * warp;
  const float out_scale = w.range.out_scale(g);
#pragma unroll
  for (int c = 0; c < BN / kStagedColumns; ++c) {
    const int64_t n_staged = w.n0 + c * kStagedColumns;
    if (n_staged >= g.N) break;  // (the same for the whole block)
    // Inside C and with no multi-adapter mask (the common case), bias alone, with no checks.
    const bool inside = m_warp + 16 <= g.M && n_staged + kStagedColumns <= g.N;
    const bool plain = inside && g.adapters.ids == nullptr;
#pragma unroll
    for (int j = 0; j < kStagedColumns / 8; ++j) {
      const int column = 8 * j + 2 * (lane % 4);
      const int64_t n = n_staged + column;
      float b0 = 0.0f, b1 = 0.0f;
      if (plain && bias != nullptr) {
        b0 = dev::to_float(bias[n]);
        b1 = dev::to_float(bias[n + 1]);
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = lane / 4 + 8 * half;
        const int64_t m = m_warp + r;
        const int a = 4 * (c * kStagedColumns / 8 + j) + 2 * half;
        float v0 = out_scale * acc[a], v1 = out_scale * acc[a + 1];
        if (plain) {
          v0 += b0;
          v1 += b1;
        } else if (m < g.M) {
          if (n < g.N) v0 = dev::keep_and_bias<T>(g, m, n, v0);
          if (n + 1 < g.N) v1 = dev::keep_and_bias<T>(g, m, n + 1, v1);
        }
        *reinterpret_cast<uint32_t*>(rows + r * kStagedColumns + ((j ^ (r & 7)) << 3) + column % 8) =
            pack_pair<T>(v0, v1);
      }
    }
    dev::sync_warp();  // every lane's pairs are staged
#pragma unroll
    for (int i = 0; i < 16 * kStagedColumns / 8 / 32; ++i) {
      const int chunk = 32 * i + lane, r = chunk / 8, c8 = chunk % 8;
      const int64_t m = m_warp + r, n = n_staged + 8 * c8;
      const uint4 v = *reinterpret_cast<const uint4*>(rows + r * kStagedColumns + ((c8 ^ (r & 7)) << 3));
      T* const out = C + m * g.stride_cm + n;
      if (inside || (m < g.M && n + 8 <= g.N)) {
        *reinterpret_cast<uint4*>(out) = v;
      } else if (m < g.M && n < g.N) {  // the last columns of C
        const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const uint16_t bits = static_cast<uint16_t>(words[k / 2] >> (16 * (k % 2)));
          if (n + k < g.N) memcpy(out + k, &bits, 2);
        }
      }
    }
    dev::sync_warp();  // every lane has read the staged rows before the next columns overwrite them
  }
}

template <typename T, int BN>
__device__ __forceinline__ void store_tile(const Params& params, const Work& w, const float (&acc)[BN / 2],
                                           T* staging) {
  if constexpr (staged_epilogue(BN)) {
    if (params.vector_store && params.splits == 1) {
      store_tile_staged<T, BN>(params, w, acc, staging);
      return;
    }
  }
  const int lane = threadIdx.x % 32, warp_in_group = (threadIdx.x / 32) % 4, warpgroup = threadIdx.x / 128;
  const int64_t row0 = w.m0 + 64 * warpgroup + 16 * warp_in_group + lane / 4;
  const float out_scale = w.range.out_scale(params.g);
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int half = 0; half < 2; ++half)
      store_pair<T>(params, w.split, row0 + 8 * half, w.n0 + 8 * j + 2 * (lane % 4), out_scale * acc[4 * j + 2 * half],
                    out_scale * acc[4 * j + 2 * half + 1]);
}

// One block per tile and split; all 256 threads multiply, and the stages are filled in step with
// the multiplication: TMA started by one thread, or (TMA false) cp.async by every thread.
template <typename T, typename Cfg, bool P_K_MAJOR, bool Q_K_MAJOR, bool TMA>
__global__ void __launch_bounds__(kThreads, 1)
    wgmma_gemm(const __grid_constant__ Params params, const __grid_constant__ TensorMaps maps) {
#ifdef LORA_WGMMA_KERNEL_BODY
  constexpr int kBN = Cfg::kBN, kStages = Cfg::kStages;
  using PTile = Sw128Tile<kBM, P_K_MAJOR>;
  using QTile = Sw128Tile<kBN, Q_K_MAJOR>;
  LORA_DYNAMIC_SMEM(smem);
  const Stages<T, Cfg> stages(smem);
  if (TMA && threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) dev::mbarrier_init(&stages.landed[s], 1);
  }
  if (TMA) __syncthreads();  // the barriers are initialised before anyone waits on them

  const GemmParams& g = params.g;
  const int64_t unit = blockIdx.x + static_cast<int64_t>(gridDim.x) * (blockIdx.y + int64_t(gridDim.y) * blockIdx.z);
  const Work w = work_of<kBN>(params, unit);
  const Views ops = views_of(g);

  auto load = [&](int local) {
    T* p_tile = stages.p_tile(local % kStages);
    T* q_tile = p_tile + kBM * kBK;
    const int t = w.range.first + local;
    if (TMA) {
      if (threadIdx.x == 0) copy_stage<PTile, QTile>(p_tile, maps, g, w, local, &stages.landed[local % kStages]);
    } else if (t < w.range.k_tiles) {
      load_tile<T, PTile, kThreads>(p_tile, ops.P, w.m0, int64_t(t) * kBK, params.vec[0]);
      load_tile<T, QTile, kThreads>(q_tile, ops.Q, w.n0, int64_t(t) * kBK, params.vec[1]);
    } else {
      load_tile<T, PTile, kThreads>(p_tile, ops.P2, w.m0, int64_t(t - w.range.k_tiles) * kBK, params.vec[2]);
      load_tile<T, QTile, kThreads>(q_tile, ops.Q2, w.n0, int64_t(t - w.range.k_tiles) * kBK, params.vec[3]);
    }
  };

  constexpr int kAhead = kStages - 2;  // tiles in flight ahead of the one multiplied
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < w.range.count) load(s);
    if (!TMA) dev::cp_async_commit();  // (an empty group where there are fewer tiles: the wait count stays right)
  }

  float acc[kBN / 2];
  for (int t = 0; t < w.range.count; ++t) {
    if (!TMA) {
      dev::cp_async_wait<kAhead - 1>();  // tile t has landed ...
      dev::fence_proxy_async();          // ... is visible to the tensor cores, after the barrier
    }
    __syncthreads();  // (every thread's copies of tile t;) both warpgroups have waited for the wgmmas of tile t - 2
    if (t + kAhead < w.range.count) load(t + kAhead);  // into tile t - 2's buffer
    if (!TMA) dev::cp_async_commit();
    if (TMA) dev::mbarrier_wait(&stages.landed[t % kStages], (t / kStages) & 1);  // tile t has landed
    if (w.range.rescale_before(t, g)) rescale_before_lora(acc, g);
    multiply_stage<T, kBN, P_K_MAJOR, Q_K_MAJOR>(acc, stages.p_address(t % kStages), t == 0);
    dev::wgmma_wait<1>();  // tile t - 1's wgmmas are done: its buffer may be refilled after the next barrier
  }
  dev::wgmma_wait<0>();
  dev::fence_accumulators(acc);
  if (w.range.count == 0) zero(acc);
  store_tile<T, kBN>(params, w, acc, stages.staging);
#endif
}

// Warp-specialized and persistent (TMA only): a block of two consumer warpgroups, which only
// multiply, and one producer warpgroup, one thread of which only starts copies. Each block walks work
// units blockIdx.x, + gridDim.x, ... (at most one block per SM). The producer runs up to kStages K
// tiles ahead, across units, so the next tile's first stages load during this tile's epilogue.
// Stage s is handed over by two mbarriers: `landed[s]` completes when its copies have (TMA counts
// the bytes), `freed[s]` when all 8 consumer warps have waited for the wgmmas that read it. The
// n-th use of a stage (n = 0, 1, ...) waits for phase n of landed and phase n - 1 of freed (parity
// arithmetic: a fresh barrier counts its phase "-1" as complete, so the first use does not wait).
// No __syncthreads after the start, so no block-wide barrier per K tile.
template <typename T, typename Cfg, bool P_K_MAJOR, bool Q_K_MAJOR>
__global__ void __launch_bounds__(kThreads + kProducerThreads, 1)
    wgmma_gemm_producer(const __grid_constant__ Params params, const __grid_constant__ TensorMaps maps) {
#ifdef LORA_WGMMA_KERNEL_BODY
  constexpr int kBN = Cfg::kBN, kStages = Cfg::kStages;
  LORA_DYNAMIC_SMEM(smem);
  const Stages<T, Cfg> stages(smem);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      dev::mbarrier_init(&stages.landed[s], 1);             // the producer's arrival (+ the bytes)
      dev::mbarrier_init(&stages.freed[s], kThreads / 32);  // one per consumer warp
    }
  }
  __syncthreads();  // the barriers are initialised before anyone waits on them

  const GemmParams& g = params.g;
  const int64_t units = dev::cdiv(g.M, kBM) * dev::cdiv(g.N, kBN) * params.splits;
  uint32_t use = 0;               // K tiles this block has staged (producer) or multiplied (consumers) so far
  if (threadIdx.x >= kThreads) {  // the producer warpgroup; one thread is enough to start TMA copies
    dev::release_registers<kProducerRegisters>();
    if (threadIdx.x != kThreads) return;
    for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
      const Work w = work_of<kBN>(params, unit);
      for (int t = 0; t < w.range.count; ++t, ++use) {
        const int s = use % kStages;
        dev::mbarrier_wait(&stages.freed[s], ((use / kStages) & 1) ^ 1);  // its previous tile's wgmmas are done
        copy_stage<Sw128Tile<kBM, P_K_MAJOR>, Sw128Tile<kBN, Q_K_MAJOR>>(stages.p_tile(s), maps, g, w, t,
                                                                         &stages.landed[s]);
      }
    }
    return;
  }
  dev::claim_registers<kConsumerRegisters>();
  // The consumers. A stage is released once the wgmmas reading it are waited for: wgmma_wait<1>
  // after the next tile's group. (The warp barrier before the arrival: every lane's wgmmas have
  // retired — wait_group is warp-synchronous on a GPU, not in the CPU emulation.)
  auto release = [&](uint32_t used) {
    dev::sync_warp();
    if (threadIdx.x % 32 == 0) dev::mbarrier_arrive(&stages.freed[used % kStages]);
  };
  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const Work w = work_of<kBN>(params, unit);
    float acc[kBN / 2];
    for (int t = 0; t < w.range.count; ++t, ++use) {
      const int s = use % kStages;
      dev::mbarrier_wait(&stages.landed[s], (use / kStages) & 1);  // tile t has landed
      if (w.range.rescale_before(t, g)) rescale_before_lora(acc, g);
      multiply_stage<T, kBN, P_K_MAJOR, Q_K_MAJOR>(acc, stages.p_address(s), t == 0);
      dev::wgmma_wait<1>();
      if (t > 0) release(use - 1);  // tile t - 1's wgmmas are done
    }
    dev::wgmma_wait<0>();
    dev::fence_accumulators(acc);
    if (w.range.count > 0) release(use - 1);
    if (w.range.count == 0) zero(acc);
    store_tile<T, kBN>(params, w, acc, stages.staging);
  }
#endif
}

// A block holds an SM (161–209 KiB of shared memory), so K is split only when the tiles leave more
// than half the SMs idle, and into about one block per SM; the splits then add a pass over fp32
// partial sums.
template <typename Cfg>
Split plan(const GemmParams& g) {
  if (2 * dev::cdiv(g.M, kBM) * dev::cdiv(g.N, Cfg::kBN) >= dev::sm_count()) {
    const int all_tiles = static_cast<int>(dev::cdiv(g.K, kBK) + dev::cdiv(g.K2, kBK));
    return {1, all_tiles > 0 ? all_tiles : 1};
  }
  return plan_split(g, kBM, Cfg::kBN, kBK, kMinTilesPerSplit, 1);
}

// The tensor map of one operand's tiles (tile_i rows of the tile; see Sw128Tile::copy).
bool map_of(const View& v, bool k_major, int tile_i, bool bf16, CUtensorMap* map) {
  if (v.extent_i == 0 || v.extent_k == 0) return true;  // never copied (K = 0 or no second product)
  const uint64_t inner = k_major ? v.extent_k : v.extent_i, outer = k_major ? v.extent_i : v.extent_k;
  const uint64_t row_bytes = 2 * static_cast<uint64_t>(k_major ? v.stride_i : v.stride_k);
  const uint64_t least = (2 * inner + 15) / 16 * 16;  // a single row's stride is never used: any valid one
  return dev::encode_tensor_map_2d(map, bf16, v.ptr, inner, outer, outer > 1 ? row_bytes : least, 64,
                                   k_major ? tile_i : kBK);
}

// How the stages are filled, LORA_KERNELS_WGMMA_LOADS (read per call, to compare them in one
// process): "producer" (the default) wgmma_gemm_producer, "tma" wgmma_gemm with TMA, "cp.async"
// wgmma_gemm with cp.async. Both TMA kernels need every operand TMA-copyable (make_maps); where one
// is not, cp.async runs.
enum class Loads { kProducer, kTma, kCpAsync };
Loads loads_asked() {
  if (switches::wgmma_loads_are("tma")) return Loads::kTma;
  if (switches::wgmma_loads_are("cp.async")) return Loads::kCpAsync;
  return Loads::kProducer;
}

// Tensor maps of the operands, or false where one cannot be copied by TMA.
bool make_maps(const Params& params, int BN, bool bf16, bool p_k_major, bool q_k_major, TensorMaps* maps) {
  const GemmParams& g = params.g;
  if (!params.vec[0] || !params.vec[1] || (g.K2 > 0 && (!params.vec[2] || !params.vec[3]))) return false;
  const Views v = views_of(g);
  return map_of(v.P, p_k_major, kBM, bf16, &maps->P) && map_of(v.Q, q_k_major, BN, bf16, &maps->Q) &&
         (g.K2 == 0 || (map_of(v.P2, p_k_major, kBM, bf16, &maps->P2) && map_of(v.Q2, q_k_major, BN, bf16, &maps->Q2)));
}

template <typename T, typename Cfg>
cudaError_t launch_with_config(const Params& params, cudaStream_t stream) {
  return with_layouts(params.g, [&](auto p_k_major, auto q_k_major) {
    constexpr bool kPK = decltype(p_k_major)::value, kQK = decltype(q_k_major)::value;
    if constexpr (!kQK && Cfg::kBN % 64 != 0) {
      return cudaErrorInvalidValue;  // an MN-major tile narrower than a swizzle atom (wgmma_fits excludes it)
    } else {
      TensorMaps maps{};
      const Loads loads = loads_asked();
      const bool tma = loads != Loads::kCpAsync &&
                       make_maps(params, Cfg::kBN, std::is_same<T, __nv_bfloat16>::value, kPK, kQK, &maps);
      const Split split = plan<Cfg>(params.g);
      if (tma && loads == Loads::kProducer)
        return launch_tiles(wgmma_gemm_producer<T, Cfg, kPK, kQK>, params, split, kBM, Cfg::kBN,
                            kThreads + kProducerThreads, Cfg::kSmemBytes, true, stream, maps);
      auto kernel = tma ? wgmma_gemm<T, Cfg, kPK, kQK, true> : wgmma_gemm<T, Cfg, kPK, kQK, false>;
      return launch_tiles(kernel, params, split, kBM, Cfg::kBN, kThreads, Cfg::kSmemBytes, false, stream, maps);
    }
  });
}

// Products of at most 64 rows (dY·W₀ in a decode-sized backward; x·W₀ᵀ at 33–64 rows) are computed
// transposed, Cᵀ = Qᵀ·Pᵀ: W₀ then takes the 128-row side of the tile and the few rows of x or dY
// the 32-column side, so little tensor-core work goes to padding and W₀ streams through once per
// 32 rows. The epilogues apply bias and the multi-adapter mask by the caller's columns (c_transposed).
bool transposed(const GemmParams& g) { return g.M <= 64; }

GemmParams transposed_problem(const GemmParams& g) {
  GemmParams t = g;
  t.M = g.N;
  t.N = g.M;
  t.P = {g.Q.ptr, g.Q.stride_col, g.Q.stride_row};
  t.Q = {g.P.ptr, g.P.stride_col, g.P.stride_row};
  t.P2 = {g.Q2.ptr, g.Q2.stride_col, g.Q2.stride_row};
  t.Q2 = {g.P2.ptr, g.P2.stride_col, g.P2.stride_row};
  t.stride_cm = g.stride_cn;
  t.stride_cn = g.stride_cm;
  t.c_transposed = true;  // bias and keep still index the caller's columns
  return t;
}

}  // namespace wgmma

namespace detail {

bool wgmma_fits(const GemmParams& g) {
  // 65 rows and more on wide tiles (under 128 rows the tile is part padding, but W₀ streams once)
  if (!wgmma::transposed(g) && g.N >= wgmma::WideTiles::kBN) return true;
  // transposed: Pᵀ, the 32-wide side, must be K-major (an MN-major tile narrower than a swizzle atom)
  return wgmma::transposed(g) && g.N >= 256 && tensor_core::p_is_k_major(g);
}

int64_t wgmma_workspace_elems(const GemmParams& g) {
  using namespace wgmma;
  const Split split = transposed(g) ? plan<NarrowTiles>(transposed_problem(g)) : plan<WideTiles>(g);
  return split.splits > 1 ? split.splits * g.M * g.N : 0;
}

cudaError_t launch_wgmma(DType dtype, const GemmParams& g, cudaStream_t stream) {
  using namespace wgmma;
  const bool swap = transposed(g);
  const tensor_core::Params params = tensor_core::make_params(dtype, swap ? transposed_problem(g) : g);
  switch (dtype) {
    case DType::kFloat16:
      return swap ? launch_with_config<__half, NarrowTiles>(params, stream)
                  : launch_with_config<__half, WideTiles>(params, stream);
    case DType::kBFloat16:
      return swap ? launch_with_config<__nv_bfloat16, NarrowTiles>(params, stream)
                  : launch_with_config<__nv_bfloat16, WideTiles>(params, stream);
    case DType::kFloat32: break;
  }
  return cudaErrorInvalidValue;  // 16-bit only
}

}  // namespace detail
}  // namespace lora_kernels
