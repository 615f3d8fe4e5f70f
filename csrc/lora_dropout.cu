// LoRA dropout for the CUDA backend (launch_dropout, lora_gemm.h): the keep-mask is redrawn from a
// seed on the device wherever it is needed, as the Triton kernels draw it, so nothing M×K outlives
// an op: bindings.cpp drops x into a scratch copy for x·Aᵀ (forward) and gᵀ·x (backward), and
// passes the LoRA share of dX through the mask (accumulate). One pass over the elements: blocks
// stride over rows (y) and each row's groups of 4 columns (x), a thread taking one group per step,
// whose 4 draws come from one Philox call (about 100 integer instructions).
#include <algorithm>

#include "device.cuh"
#include "lora_gemm.h"

namespace lora_kernels {
namespace dropout {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192, kMaxColumnBlocks = 64;

template <typename T>
__global__ void __launch_bounds__(kThreads) apply_dropout(DropoutParams d) {
  const uint64_t seed = static_cast<uint64_t>(*d.seed);
  const T* src = static_cast<const T*>(d.src.ptr);
  T* out = static_cast<T*>(d.out);
  const int64_t groups = dev::cdiv(d.K, 4);
  for (int64_t m = blockIdx.y; m < d.M; m += gridDim.y) {
    for (int64_t group = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; group < groups;
         group += static_cast<int64_t>(gridDim.x) * kThreads) {
      float u[4];
      dev::dropout_draws(seed, static_cast<uint64_t>(m), static_cast<uint64_t>(group), u);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t k = 4 * group + i;
        if (k >= d.K) break;
        float v = u[i] >= d.p ? dev::to_float(src[m * d.src.stride_row + k * d.src.stride_col]) * d.keep_scale : 0.0f;
        T* dst = out + m * d.stride_out + k;
        if (d.accumulate) v += dev::to_float(*dst);
        *dst = dev::from_float<T>(v);
      }
    }
  }
}

}  // namespace dropout

cudaError_t launch_dropout(DType dtype, const DropoutParams& d, cudaStream_t stream) {
  using namespace dropout;
  if (d.M == 0 || d.K == 0) return cudaSuccess;
  const int64_t columns = std::min(dev::cdiv(dev::cdiv(d.K, 4), kThreads), kMaxColumnBlocks);
  const dim3 grid(static_cast<unsigned>(columns), static_cast<unsigned>(std::min(d.M, kMaxBlocks / columns)));
  switch (dtype) {
    case DType::kFloat32: LORA_LAUNCH(apply_dropout<float>, grid, kThreads, 0, stream, d); break;
    case DType::kFloat16: LORA_LAUNCH(apply_dropout<__half>, grid, kThreads, 0, stream, d); break;
    case DType::kBFloat16: LORA_LAUNCH(apply_dropout<__nv_bfloat16>, grid, kThreads, 0, stream, d); break;
  }
  return dev::last_launch_error();
}

}  // namespace lora_kernels
