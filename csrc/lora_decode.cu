// Decode-sized products (M ≤ 32 rows of x), where the cost is reading W₀ once from memory:
//     C = alpha·P·Q + alpha2·P2·Q2 + bias,    Q's columns contiguous in k (Q = W₀ᵀ or Aᵀ)
// Two kernels: decode_gemm below (SIMT; any dtype, layout and width) and, further down,
// decode_mma_gemm (tensor cores; 16-bit, aligned rows, N ≥ 256), which launch_decode prefers.
//
// decode_gemm: each output column n is one row of W₀, K contiguous elements. A warp streams that row with
// 16-byte loads (8 bf16/fp16 or 4 fp32 per lane, 32 lanes side by side, so a warp reads 512
// contiguous bytes per step) and multiplies every chunk with the same chunk of all M rows of x
// (read through L1, shared by the block's warps), keeping one fp32 sum per row. The LoRA term
// P2·Q2 (r terms per output) is added in the same sums before the warp's butterfly reduction, and
// each output is written once.
//
// In the forward, y's kernel is launched to overlap the xa kernel before it (programmatic dependent
// launch on sm_90+, GemmParams::overlap_prior): it streams W₀ while xa is computed and waits for
// xa only before the LoRA term.
//
// A block has 8 warps. For wide outputs each warp owns its own column (8 columns per block); for
// narrow ones (N < 2048, e.g. x·Aᵀ with N = r) the 8 warps split the K range of one column and
// add their partial sums through shared memory, so even N = 16 keeps 128 warps busy.
#include "device.cuh"
#include "lora_gemm.h"

namespace lora_kernels {
namespace decode {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int64_t kSplitBelowColumns = 2048;

struct Params {
  GemmParams g;
  bool w_vec, x_vec;  // 16-byte loads of Q's columns / P's rows are aligned
};

// Launches one of this file's kernels (kThreads per block): as a programmatic dependent launch that
// overlaps the kernel before it where the product allows it (GemmParams::overlap_prior) and the GPU
// has it (sm_90+), else as an ordinary launch.
template <typename KernelParams>
cudaError_t launch_block_kernel(void (*kernel)(KernelParams), dim3 grid, size_t smem_bytes, bool overlap_prior,
                                cudaStream_t stream, const KernelParams& params) {
  if (overlap_prior && dev::supports_overlapping_launch()) {
    return dev::launch_overlapping_prior(kernel, grid, dim3(kThreads), smem_bytes, stream, params);
  }
  LORA_LAUNCH(kernel, grid, kThreads, smem_bytes, stream, params);
  return dev::last_launch_error();
}

// v[0..VEC) = row[k..k+VEC) (element stride `stride`), zeros past `extent`.
template <typename T, int VEC>
__device__ __forceinline__ void load_chunk(float (&v)[VEC], const T* row, int64_t k, int64_t extent, int64_t stride,
                                           bool vec) {
  if (vec && k + VEC <= extent) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + k);
    T e[VEC];
    memcpy(e, &raw, 16);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = dev::to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = k + i < extent ? dev::to_float(row[(k + i) * stride]) : 0.0f;
  }
}

template <typename T, int ROWS, int WARPS_PER_COLUMN>
__global__ void __launch_bounds__(kThreads, 2) decode_gemm(Params params) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int kColumns = kWarps / WARPS_PER_COLUMN;
  static_assert(kColumns * ROWS <= kThreads, "one thread per output of the block writes it");
  LORA_DYNAMIC_SMEM(smem);
  float* partial = reinterpret_cast<float*>(smem);  // [kWarps][ROWS]

  dev::allow_dependents_early();  // y's decode kernel may start streaming W₀ while this one (xa) runs
  const GemmParams& g = params.g;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int part = warp % WARPS_PER_COLUMN;  // which slice of K (and of r) this warp sums
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kColumns + warp / WARPS_PER_COLUMN;
  const T* x = static_cast<const T*>(g.P.ptr);
  const int rows = static_cast<int>(g.M);

  float sum[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) sum[r] = 0.0f;
  if (n < g.N) {
    const T* w = static_cast<const T*>(g.Q.ptr) + n * g.Q.stride_col;  // Q(k, n) = w[k]
    const int64_t chunks = dev::cdiv(g.K, VEC);
    // several 16-byte loads of W₀ in flight per lane, as far as registers allow
#pragma unroll(ROWS <= 16 ? 4 : 1)
    for (int64_t c = part * 32 + lane; c < chunks; c += 32 * WARPS_PER_COLUMN) {
      float wv[VEC];
      load_chunk<T, VEC>(wv, w, c * VEC, g.K, 1, params.w_vec);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r >= rows) break;
        float xv[VEC];
        load_chunk<T, VEC>(xv, x + r * g.P.stride_row, c * VEC, g.K, g.P.stride_col, params.x_vec);
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) s = fmaf(xv[i], wv[i], s);
        sum[r] = fmaf(g.alpha, s, sum[r]);
      }
    }
  }
  // P2 (xa) may come from the kernel still running before this one (overlap_prior). Every thread
  // waits for it, so this grid cannot end before that one.
  dev::wait_for_prior_grid();
  if (n < g.N) {
    // The LoRA term: alpha2 · Σ_j P2(r, j)·Q2(j, n), j < r_lora (a few dozen terms).
    const T* p2 = static_cast<const T*>(g.P2.ptr);
    const T* q2 = static_cast<const T*>(g.Q2.ptr);
    for (int64_t j = part * 32 + lane; j < g.K2; j += 32 * WARPS_PER_COLUMN) {
      const float q = g.alpha2 * dev::to_float(q2[j * g.Q2.stride_row + n * g.Q2.stride_col]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r >= rows) break;
        sum[r] = fmaf(dev::to_float(p2[r * g.P2.stride_row + j * g.P2.stride_col]), q, sum[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) sum[r] = dev::warp_sum(sum[r]);  // every lane holds the warp's sums
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) partial[warp * ROWS + r] = sum[r];
  }
  __syncthreads();
  // One thread per (column, row) adds the K slices, applies the adapter mask and the bias, and writes.
  const int t = threadIdx.x;
  if (t < kColumns * ROWS) {
    const int column = t / ROWS, r = t % ROWS;
    const int64_t out_n = static_cast<int64_t>(blockIdx.x) * kColumns + column;
    if (r < rows && out_n < g.N) {
      float v = 0.0f;
#pragma unroll
      for (int s = 0; s < WARPS_PER_COLUMN; ++s) v += partial[(column * WARPS_PER_COLUMN + s) * ROWS + r];
      const float out = dev::keep_and_bias<T>(g, r, out_n, v);
      static_cast<T*>(g.C)[r * g.stride_cm + out_n * g.stride_cn] = dev::from_float<T>(out);
    }
  }
}

template <typename T, int ROWS, int WARPS_PER_COLUMN>
cudaError_t launch_with(const Params& params, cudaStream_t stream) {
  constexpr int kColumns = kWarps / WARPS_PER_COLUMN;
  const int64_t blocks = dev::cdiv(params.g.N, kColumns);
  if (blocks > 2147483647LL) return cudaErrorInvalidConfiguration;
  const size_t smem_bytes = kWarps * ROWS * sizeof(float);
  return launch_block_kernel(decode_gemm<T, ROWS, WARPS_PER_COLUMN>, dim3(static_cast<unsigned>(blocks)), smem_bytes,
                             params.g.overlap_prior, stream, params);
}

template <typename T, int ROWS>
cudaError_t launch_rows(const Params& params, cudaStream_t stream) {
  return params.g.N < kSplitBelowColumns ? launch_with<T, ROWS, kWarps>(params, stream)
                                         : launch_with<T, ROWS, 1>(params, stream);
}

template <typename T>
cudaError_t launch_typed(const Params& params, cudaStream_t stream) {
  const int64_t M = params.g.M;  // accumulators for the next power of two ≥ M rows
  if (M <= 1) return launch_rows<T, 1>(params, stream);
  if (M <= 2) return launch_rows<T, 2>(params, stream);
  if (M <= 4) return launch_rows<T, 4>(params, stream);
  if (M <= 8) return launch_rows<T, 8>(params, stream);
  if (M <= 16) return launch_rows<T, 16>(params, stream);
  if (M <= 32) return launch_rows<T, 32>(params, stream);
  return cudaErrorInvalidValue;
}

// ---- The same products on the tensor cores: float16/bfloat16, 16-byte aligned rows, N ≥ 256 ----
//
// At M > 1 the loop above re-reads every 16-byte chunk of x once per column, so x's traffic
// through L1 grows with M·N and the fp32 FMAs with it. Here C's transpose is computed with
// mma.sync m16n8k16 instead: A is 16 rows of W₀ (16 columns of C), B is 8 rows of x (up to 4 such
// tiles for M ≤ 32), and each lane loads its fragments straight from global memory, no shared
// memory staging. An mma's sum over its 16 k may take the k in any order as long as A and B agree,
// so two k-steps (32 of K) are arranged for 16-byte loads: lane (g = lane/4, t = lane%4) loads
// elements [8t, 8t+8) of the 32-wide slice of W₀ rows g and g+8 and of x row g (+8 per x tile),
// and step s feeds it elements 4s..4s+3 of each chunk in the places of k = 2t, 2t+1, 2t+8, 2t+9.
//
// A block's 8 warps are WARPS_K slices of K × 8/WARPS_K tiles of 16 columns, in two arrangements:
// - M ≤ 8 (WARPS_K = 8): a block owns 16 columns and its warps take every 8th slice of K. Measured
//   on an H100 at M = 1 and 4 (torch 2.11, CUDA 13.0, 2026-11-22): 0.99–1.13× cuBLAS's x·W₀ᵀ.
// - M > 8 (WARPS_K = 1): a block owns 128 columns, one A tile per warp, and all 8 warps read the
//   same x fragments at the same time, so L1 can serve 7 of the 8 reads. K is split over
//   blockIdx.y instead (where a workspace is given), so that enough blocks stream W₀. The first
//   arrangement re-read x from L2 once per 16 columns (at M = 32 and 4096², twice W₀'s bytes)
//   and measured 1.25–2.9× cuBLAS at M = 16–32 (same run); this one is not measured yet.
// The warps' sums meet in shared memory; one thread per output then adds the LoRA term, the mask
// and the bias and writes C, or, when K is split, writes its split's fp32 partial sum (the LoRA
// term in split 0) for split_k_reduce.
constexpr int kMmaTile = 16;             // rows of W₀ per A tile
constexpr int kMmaSlice = 32;            // K per load: two mma k-steps
constexpr int64_t kMmaMinColumns = 256;  // below, the K-split SIMT kernel keeps more SMs busy
constexpr int kMmaMinSlicesPerSplit = 8;
constexpr int kMmaMaxSplits = 16;

struct MmaParams {
  GemmParams g;
  int64_t slices_per_split;  // K slices of blockIdx.y's share
};

// Elements [k, k+8) of a row whose 16-byte chunks are aligned, zeros past `extent` or if !valid.
template <typename T>
__device__ __forceinline__ uint4 load_eight(const T* row, int64_t k, int64_t extent, bool valid) {
  uint4 v = {0u, 0u, 0u, 0u};
  if (!valid || k >= extent) return v;
  if (k + 8 <= extent) return *reinterpret_cast<const uint4*>(row + k);
  T e[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) e[i] = k + i < extent ? row[k + i] : dev::from_float<T>(0.0f);
  memcpy(&v, e, 16);
  return v;
}

// 32-bit word i of a 16-byte chunk: elements 2i and 2i + 1.
__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename T, int X_TILES, int WARPS_K>
__global__ void __launch_bounds__(kThreads) decode_mma_gemm(MmaParams params) {
  constexpr int kRows = 8 * X_TILES;
  constexpr int kTiles = kWarps / WARPS_K;       // A tiles (16 columns each) per block
  constexpr int kUnroll = X_TILES <= 2 ? 4 : 2;  // K slices loaded before any is multiplied
  LORA_DYNAMIC_SMEM(smem);
  float* partial = reinterpret_cast<float*>(smem);  // [kWarps][kMmaTile][kRows]

  dev::allow_dependents_early();
  const GemmParams& g = params.g;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, gid = lane / 4, tid = lane % 4;
  const int tile = warp / WARPS_K, k_part = warp % WARPS_K;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTiles * kMmaTile + tile * kMmaTile;
  const T* w = static_cast<const T*>(g.Q.ptr);  // Q(k, n) = w[n·stride_col + k]
  const T* x = static_cast<const T*>(g.P.ptr);
  const bool has_lo = n0 + gid < g.N, has_hi = n0 + gid + 8 < g.N;
  const T* w_lo = w + (has_lo ? n0 + gid : 0) * g.Q.stride_col;
  const T* w_hi = w + (has_hi ? n0 + gid + 8 : 0) * g.Q.stride_col;
  const T* x_row[X_TILES];
  bool has_x[X_TILES];
#pragma unroll
  for (int xt = 0; xt < X_TILES; ++xt) {
    has_x[xt] = gid + 8 * xt < g.M;
    x_row[xt] = x + (has_x[xt] ? gid + 8 * xt : 0) * g.P.stride_row;
  }

  float acc[X_TILES][4] = {};
  const int64_t slices = dev::cdiv(g.K, kMmaSlice), begin = blockIdx.y * params.slices_per_split;
  const int64_t end = begin + params.slices_per_split < slices ? begin + params.slices_per_split : slices;
  // the same trip count in a warp; a slice past `end` loads zeros
  for (int64_t first = begin + k_part; first < end; first += WARPS_K * kUnroll) {
    uint4 lo[kUnroll], hi[kUnroll], xv[kUnroll][X_TILES];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t slice = first + u * WARPS_K, k = slice * kMmaSlice + 8 * tid;
      const bool in = slice < end;
      lo[u] = load_eight(w_lo, k, g.K, in && has_lo);
      hi[u] = load_eight(w_hi, k, g.K, in && has_hi);
#pragma unroll
      for (int xt = 0; xt < X_TILES; ++xt) xv[u][xt] = load_eight(x_row[xt], k, g.K, in && has_x[xt]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const uint32_t a[4] = {word(lo[u], 2 * s), word(hi[u], 2 * s), word(lo[u], 2 * s + 1), word(hi[u], 2 * s + 1)};
#pragma unroll
        for (int xt = 0; xt < X_TILES; ++xt) {
          const uint32_t b[2] = {word(xv[u][xt], 2 * s), word(xv[u][xt], 2 * s + 1)};
          dev::mma_16816<T>(acc[xt], a, b);
        }
      }
  }
  // acc[xt][e]: column n0 + gid + 8·(e/2) of C, row 8·xt + 2·tid + e%2.
#pragma unroll
  for (int xt = 0; xt < X_TILES; ++xt)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      partial[(warp * kMmaTile + gid + 8 * (e / 2)) * kRows + 8 * xt + 2 * tid + e % 2] = acc[xt][e];
  __syncthreads();
  dev::wait_for_prior_grid();  // P2 (xa) may come from the kernel still running before this one
  const T* p2 = static_cast<const T*>(g.P2.ptr);
  const T* q2 = static_cast<const T*>(g.Q2.ptr);
  const bool lora_here = blockIdx.y == 0;  // split 0 (or the only one) adds the LoRA term
  for (int o = threadIdx.x; o < kTiles * kMmaTile * kRows; o += kThreads) {
    const int column = o % (kTiles * kMmaTile), m = o / (kTiles * kMmaTile);  // neighbouring threads, neighbouring n
    const int64_t n = static_cast<int64_t>(blockIdx.x) * kTiles * kMmaTile + column;
    if (m >= g.M || n >= g.N) continue;
    const int col_tile = column / kMmaTile, in_tile = column % kMmaTile;
    float base = 0.0f, lora = 0.0f;
#pragma unroll
    for (int s = 0; s < WARPS_K; ++s) base += partial[((col_tile * WARPS_K + s) * kMmaTile + in_tile) * kRows + m];
    for (int64_t j = 0; lora_here && j < g.K2; ++j)
      lora = fmaf(dev::to_float(p2[m * g.P2.stride_row + j * g.P2.stride_col]),
                  dev::to_float(q2[j * g.Q2.stride_row + n * g.Q2.stride_col]), lora);
    const float v = g.alpha * base + g.alpha2 * lora;
    if (gridDim.y > 1) {  // [split][M][N] partial sums; split_k_reduce applies the mask and the bias
      g.workspace[(static_cast<int64_t>(blockIdx.y) * g.M + m) * g.N + n] = v;
      continue;
    }
    static_cast<T*>(g.C)[m * g.stride_cm + n * g.stride_cn] = dev::from_float<T>(dev::keep_and_bias<T>(g, m, n, v));
  }
}

struct MmaPlan {
  int warps_k, splits;  // warps_k: kWarps at M ≤ 8, else 1
  int64_t slices_per_split;
};

// M ≤ 8: 16 columns per block, K split over its warps. M > 8: 128 columns per block and, when a
// workspace for the partial sums exists, K split over blocks: enough splits for about two blocks
// per SM, each at least kMmaMinSlicesPerSplit slices.
MmaPlan plan_mma(const GemmParams& g, bool have_workspace) {
  const int64_t slices = g.K > 0 ? dev::cdiv(g.K, kMmaSlice) : 1;
  if (g.M <= 8) return {kWarps, 1, slices};
  const int64_t blocks = dev::cdiv(g.N, kWarps * kMmaTile), sms = dev::sm_count();
  const int64_t wanted = !have_workspace || blocks >= 2 * sms ? 1 : dev::cdiv(2 * sms, blocks);
  const dev::KSplit split = dev::split_steps(slices, wanted, kMmaMinSlicesPerSplit, kMmaMaxSplits);
  return {1, static_cast<int>(split.splits), split.steps_per_split};
}

template <typename T, int X_TILES, int WARPS_K>
cudaError_t launch_mma_with(const MmaParams& params, int splits, DType dtype, cudaStream_t stream) {
  const GemmParams& g = params.g;
  const int64_t blocks = dev::cdiv(g.N, (kWarps / WARPS_K) * kMmaTile);
  if (blocks > 2147483647LL) return cudaErrorInvalidConfiguration;
  auto kernel = decode_mma_gemm<T, X_TILES, WARPS_K>;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  const size_t smem_bytes = kWarps * kMmaTile * 8 * X_TILES * sizeof(float);
  const cudaError_t err = launch_block_kernel(kernel, grid, smem_bytes, g.overlap_prior, stream, params);
  if (err != cudaSuccess || splits == 1) return err;
  return detail::launch_split_k_reduce(dtype, g, splits, stream);
}

template <typename T, int X_TILES>
cudaError_t launch_mma_rows(const GemmParams& g, DType dtype, cudaStream_t stream) {
  const MmaPlan plan = plan_mma(g, g.workspace != nullptr);
  const MmaParams params{g, plan.slices_per_split};
  if constexpr (X_TILES == 1) {  // M ≤ 8: always the K-split-over-warps arrangement
    return launch_mma_with<T, 1, kWarps>(params, 1, dtype, stream);
  } else {
    return launch_mma_with<T, X_TILES, 1>(params, plan.splits, dtype, stream);
  }
}

template <typename T>
cudaError_t launch_mma(const GemmParams& g, DType dtype, cudaStream_t stream) {
  if (g.M <= 8) return launch_mma_rows<T, 1>(g, dtype, stream);
  if (g.M <= 16) return launch_mma_rows<T, 2>(g, dtype, stream);
  if (g.M <= 24) return launch_mma_rows<T, 3>(g, dtype, stream);
  if (g.M <= 32) return launch_mma_rows<T, 4>(g, dtype, stream);
  return cudaErrorInvalidValue;
}

}  // namespace decode

namespace detail {

int64_t decode_workspace_elems(DType dtype, const GemmParams& g) {
  using namespace decode;
  // The tensor-core variant splits K at M > 8 (plan_mma); whether its alignment rules hold is
  // decided at launch, so the scratch is sized as if they did.
  if (dtype == DType::kFloat32 || g.N < kMmaMinColumns) return 0;
  const MmaPlan plan = plan_mma(g, true);
  return plan.splits > 1 ? plan.splits * g.M * g.N : 0;
}

cudaError_t launch_decode(DType dtype, const GemmParams& g, cudaStream_t stream) {
  using namespace decode;
  const int64_t vec = dtype == DType::kFloat32 ? 4 : 8;  // elements per 16 bytes
  // Column n of Q starts at Q.ptr + n·stride_col: all of them aligned if the base and stride are.
  const bool w_vec = dev::aligned16(g.Q.ptr) && (g.N <= 1 || g.Q.stride_col % vec == 0);
  const bool x_vec = g.P.stride_col == 1 && dev::aligned16(g.P.ptr) && (g.M <= 1 || g.P.stride_row % vec == 0);
  const Params params{g, w_vec, x_vec};
  const bool on_tensor_cores = w_vec && x_vec && g.N >= kMmaMinColumns;
  switch (dtype) {
    case DType::kFloat32: return launch_typed<float>(params, stream);
    case DType::kFloat16:
      return on_tensor_cores ? launch_mma<__half>(g, dtype, stream) : launch_typed<__half>(params, stream);
    case DType::kBFloat16:
      return on_tensor_cores ? launch_mma<__nv_bfloat16>(g, dtype, stream)
                             : launch_typed<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace lora_kernels
