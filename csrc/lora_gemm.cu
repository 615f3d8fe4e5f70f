// The dispatcher launch_gemm, the portable SIMT kernel it uses for float32, and split_k_reduce.
//
// SIMT kernel: each 256-thread block owns a 64×64 tile of C and walks K in steps of 16, staging a
// 64×16 slab of P and a 16×64 slab of Q in shared memory (as fp32) and accumulating 4×4 outputs per
// thread in registers. The second product P2·Q2 (the LoRA term, K2 = r) runs through the same loop
// into a second accumulator, and the epilogue writes keep·(alpha·acc + alpha2·acc2) + bias once. Correct
// for any strides and size (64-bit indexing); templated on the element type, launched for float32
// only (float16/bfloat16 products run on the tensor cores).

#include "device.cuh"
#include "lora_gemm.h"
#include "switches.h"

namespace lora_kernels {
namespace simt {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kThreads = 256;  // 16×16 threads, each owning a 4×4 block of the tile
constexpr int kPerThread = 4;
using PSlab = float[kTileK][kTileM + 1];
using QSlab = float[kTileK][kTileN + 1];
constexpr int kSmemBytes = sizeof(PSlab) + sizeof(QSlab);

// Stage a kTileK × kTile slab of a K-major operand view into shared memory: slab[k][i] =
// src(i0 + i, k0 + k) with zeros outside. Threads step along whichever index is contiguous in
// memory so that global loads coalesce for both plain and transposed operands.
template <typename T, int kTile>
__device__ __forceinline__ void stage(float (&slab)[kTileK][kTile + 1], const T* src, int64_t stride_i,
                                      int64_t stride_k, int64_t i0, int64_t k0, int64_t extent_i, int64_t extent_k) {
  const bool i_fastest = stride_i == 1;
  for (int e = threadIdx.x; e < kTileK * kTile; e += kThreads) {
    const int i = i_fastest ? e % kTile : e / kTileK;
    const int k = i_fastest ? e / kTile : e % kTileK;
    const int64_t gi = i0 + i, gk = k0 + k;
    slab[k][i] = (gi < extent_i && gk < extent_k) ? dev::to_float(src[gi * stride_i + gk * stride_k]) : 0.0f;
  }
}

// acc += P[m0:m0+64, :K] · Q[:K, n0:n0+64] for this thread's 4×4 outputs.
template <typename T>
__device__ void tile_product(const Operand& P, const Operand& Q, int64_t M, int64_t N, int64_t K, int64_t m0,
                             int64_t n0, float (&acc)[kPerThread][kPerThread], PSlab& p_slab, QSlab& q_slab) {
  const T* p = static_cast<const T*>(P.ptr);
  const T* q = static_cast<const T*>(Q.ptr);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    stage<T, kTileM>(p_slab, p, P.stride_row, P.stride_col, m0, k0, M, K);
    stage<T, kTileN>(q_slab, q, Q.stride_col, Q.stride_row, n0, k0, N, K);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      float a[kPerThread], b[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) a[i] = p_slab[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) b[j] = q_slab[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // the slabs are overwritten by the next step
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) simt_gemm(GemmParams p) {
  LORA_DYNAMIC_SMEM(smem);
  PSlab& p_slab = *reinterpret_cast<PSlab*>(smem);
  QSlab& q_slab = *reinterpret_cast<QSlab*>(smem + sizeof(PSlab));
  // Row tiles on grid x (up to 2^31 - 1 blocks), column tiles on grid y.
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  float acc[kPerThread][kPerThread] = {};
  float acc2[kPerThread][kPerThread] = {};
  tile_product<T>(p.P, p.Q, p.M, p.N, p.K, m0, n0, acc, p_slab, q_slab);
  if (p.K2 > 0) tile_product<T>(p.P2, p.Q2, p.M, p.N, p.K2, m0, n0, acc2, p_slab, q_slab);

  T* c = static_cast<T*>(p.C);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= p.M) continue;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n >= p.N) continue;
      const float v = dev::keep_and_bias<T>(p, m, n, p.alpha * acc[i][j] + p.alpha2 * acc2[i][j]);
      c[m * p.stride_cm + n * p.stride_cn] = dev::from_float<T>(v);
    }
  }
}

}  // namespace simt

namespace split_k {

// C = keep ⊙ Σ_split partial + bias, the splits added in order: the second pass of the products
// that the tensor-core and decode kernels split along K.
template <typename T>
__global__ void __launch_bounds__(256) split_k_reduce(GemmParams g, int splits) {
  const int64_t count = g.M * g.N;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; idx < count;
       idx += static_cast<int64_t>(gridDim.x) * 256) {
    float sum = 0.0f;
    for (int z = 0; z < splits; ++z) sum += g.workspace[z * count + idx];
    const int64_t m = idx / g.N, n = idx % g.N;
    static_cast<T*>(g.C)[m * g.stride_cm + n * g.stride_cn] = dev::from_float<T>(dev::keep_and_bias<T>(g, m, n, sum));
  }
}

}  // namespace split_k

namespace detail {

cudaError_t launch_split_k_reduce(DType dtype, const GemmParams& g, int splits, cudaStream_t stream) {
  const int64_t blocks = dev::cdiv(g.M * g.N, 256);
  const unsigned grid = static_cast<unsigned>(blocks < 4096 ? blocks : 4096);
  switch (dtype) {
    case DType::kFloat32: LORA_LAUNCH(split_k::split_k_reduce<float>, grid, 256, 0, stream, g, splits); break;
    case DType::kFloat16: LORA_LAUNCH(split_k::split_k_reduce<__half>, grid, 256, 0, stream, g, splits); break;
    case DType::kBFloat16: LORA_LAUNCH(split_k::split_k_reduce<__nv_bfloat16>, grid, 256, 0, stream, g, splits); break;
  }
  return dev::last_launch_error();
}

cudaError_t launch_simt(DType dtype, const GemmParams& params, cudaStream_t stream) {
  using namespace simt;
  const int64_t tiles_m = dev::cdiv(params.M, kTileM), tiles_n = dev::cdiv(params.N, kTileN);
  if (tiles_m > 2147483647LL || tiles_n > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_n));
  if (dtype != DType::kFloat32) return cudaErrorInvalidValue;  // 16-bit products go to the tensor cores
  LORA_LAUNCH(simt_gemm<float>, grid, kThreads, kSmemBytes, stream, params);
  return dev::last_launch_error();
}

}  // namespace detail

// Rows of x up to which the decode kernel runs (its per-thread accumulators are one per row).
constexpr int64_t kDecodeMaxRows = 32;

// wgmma is used only when asked for (LORA_KERNELS_WGMMA=1, read per call so that one process can
// compare both kernels) and where it can run.
bool wgmma_supported() { return dev::supports_wgmma(); }

namespace {
bool wgmma_requested() { return switches::wgmma_requested() && wgmma_supported(); }
}  // namespace

// Rows up to which the decode kernel keeps x·W₀ᵀ even when wgmma is asked for: its arrangement
// for them was measured level with cuBLAS (H100, 2026-11-22); from 9 rows wgmma's transposed
// path competes with the decode kernel's split-K arrangement, neither measured yet.
constexpr int64_t kDecodeFirstRows = 8;

Kernel choose_kernel(DType dtype, const GemmParams& p) {
  const bool decode = p.M <= kDecodeMaxRows && p.Q.stride_row == 1;
  if (decode && p.M <= kDecodeFirstRows) return Kernel::kDecode;
  if (dtype != DType::kFloat32 && detail::wgmma_fits(p) && wgmma_requested()) return Kernel::kWgmma;
  if (decode) return Kernel::kDecode;
  return dtype == DType::kFloat32 ? Kernel::kSimt : Kernel::kTensorCore;
}

namespace {
GemmParams normalized(const GemmParams& params) {
  GemmParams p = params;
  if (p.alpha2 == 0.0f) p.K2 = 0;  // the kernels may divide by alpha2
  return p;
}
}  // namespace

int64_t workspace_elems(DType dtype, const GemmParams& params) {
  const GemmParams p = normalized(params);
  if (p.M == 0 || p.N == 0) return 0;
  switch (choose_kernel(dtype, p)) {
    case Kernel::kTensorCore: return detail::tensor_core_workspace_elems(p);
    case Kernel::kWgmma: return detail::wgmma_workspace_elems(p);
    case Kernel::kDecode: return detail::decode_workspace_elems(dtype, p);
    case Kernel::kSimt: break;
  }
  return 0;
}

cudaError_t launch_gemm(DType dtype, const GemmParams& params, cudaStream_t stream) {
  if (params.M == 0 || params.N == 0) return cudaSuccess;
  const GemmParams p = normalized(params);
  switch (choose_kernel(dtype, p)) {
    case Kernel::kDecode: return detail::launch_decode(dtype, p, stream);
    case Kernel::kTensorCore: return detail::launch_tensor_core(dtype, p, stream);
    case Kernel::kWgmma: return detail::launch_wgmma(dtype, p, stream);
    case Kernel::kSimt: break;
  }
  return detail::launch_simt(dtype, p, stream);
}

}  // namespace lora_kernels
