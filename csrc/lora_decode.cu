// Decode-sized products (M ≤ 32 rows of x), where the cost is reading W₀ once from memory:
//     C = alpha·P·Q + alpha2·P2·Q2 + bias,    Q's columns contiguous in k (Q = W₀ᵀ or Aᵀ)
//
// Each output column n is one row of W₀, K contiguous elements. A warp streams that row with
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
      v *= adapter_keep(g.adapters, r, out_n);
      if (g.bias != nullptr) v += dev::to_float(static_cast<const T*>(g.bias)[out_n]);
      static_cast<T*>(g.C)[r * g.stride_cm + out_n * g.stride_cn] = dev::from_float<T>(v);
    }
  }
}

template <typename T, int ROWS, int WARPS_PER_COLUMN>
cudaError_t launch_with(const Params& params, cudaStream_t stream) {
  constexpr int kColumns = kWarps / WARPS_PER_COLUMN;
  const int64_t blocks = dev::cdiv(params.g.N, kColumns);
  if (blocks > 2147483647LL) return cudaErrorInvalidConfiguration;
  auto kernel = decode_gemm<T, ROWS, WARPS_PER_COLUMN>;
  const size_t smem_bytes = kWarps * ROWS * sizeof(float);
  if (params.g.overlap_prior && dev::supports_overlapping_launch()) {
    return dev::launch_overlapping_prior(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), smem_bytes,
                                         stream, params);
  }
  LORA_LAUNCH(kernel, static_cast<unsigned>(blocks), kThreads, smem_bytes, stream, params);
  return dev::last_launch_error();
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

}  // namespace decode

namespace detail {

cudaError_t launch_decode(DType dtype, const GemmParams& g, cudaStream_t stream) {
  using namespace decode;
  const int64_t vec = dtype == DType::kFloat32 ? 4 : 8;  // elements per 16 bytes
  // Column n of Q starts at Q.ptr + n·stride_col: all of them aligned if the base and stride are.
  const bool w_vec = dev::aligned16(g.Q.ptr) && (g.N <= 1 || g.Q.stride_col % vec == 0);
  const bool x_vec = g.P.stride_col == 1 && dev::aligned16(g.P.ptr) && (g.M <= 1 || g.P.stride_row % vec == 0);
  const Params params{g, w_vec, x_vec};
  switch (dtype) {
    case DType::kFloat32: return launch_typed<float>(params, stream);
    case DType::kFloat16: return launch_typed<__half>(params, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace lora_kernels
