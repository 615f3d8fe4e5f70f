// Host interface of the CUDA kernels. Plain C++ and CUDA runtime types only, so the kernels
// (csrc/*.cu) compile without torch headers; bindings.cpp turns tensors into these structs.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace lora_kernels {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// A matrix operand: element (i, j) is at ptr[i * stride_row + j * stride_col]. Transposes are
// strides, so every LoRA product (x·W₀ᵀ, dY·W₀, gᵀ·x, dYᵀ·xa, ...) is one GemmParams.
struct Operand {
  const void* ptr;
  int64_t stride_row;
  int64_t stride_col;
};

// Multi-adapter batches: n adapters of rank `rank` stacked along C's columns (adapter a owns
// columns [a·rank, (a+1)·rank)); row m belongs to adapter ids[m] (−1 or out of range: none). Row m
// keeps its own adapter's columns, times scales[ids[m]], and is 0 in all others. ids null: off.
struct RowAdapters {
  const int32_t* ids;
  const float* scales;
  int64_t count, rank;
};

// C (M×N) = keep ⊙ (alpha·P(M×K)·Q(K×N) + alpha2·P2(M×K2)·Q2(K2×N)) + bias, accumulated in fp32
// and written once in the operands' dtype. K2 = 0 disables the second product; bias may be null;
// keep is 1 unless `adapters` is set.
struct GemmParams {
  int64_t M, N, K, K2;
  Operand P, Q, P2, Q2;
  const void* bias;
  void* C;
  int64_t stride_cm, stride_cn;
  float alpha, alpha2;
  // fp32 scratch of workspace_elems(...) elements for split-K partial sums (null when that is 0).
  float* workspace;
  RowAdapters adapters;
  // P2 was written by the previous kernel in the stream, and nothing else of this product was: the
  // decode kernel may then start before that kernel ends (programmatic dependent launch, on sm_90+)
  // and stream P·Q meanwhile, waiting for it only before it reads P2.
  bool overlap_prior;
  // Set inside the wgmma path only (lora_wgmma.cu, transposed_problem): this product is the
  // transpose of the caller's, so bias and keep index the caller's columns, i.e. this C's rows.
  bool c_transposed;
};

// The factor `keep` of element (m, n) of C, applied by every kernel's epilogue: column n belongs to
// adapter n / rank, tested as a range (a 64-bit division is a ~50-instruction routine on the GPU,
// and this runs per element).
__host__ __device__ inline float adapter_keep(const RowAdapters& a, int64_t m, int64_t n) {
  if (a.ids == nullptr) return 1.0f;
  const int64_t id = a.ids[m], first = id * a.rank;
  return id >= 0 && id < a.count && n >= first && n < first + a.rank ? a.scales[id] : 0.0f;
}

// LoRA dropout with the mask drawn on the device from *seed (an int64 in device memory, so no host
// sync and CUDA-graph safe): out (M×K, row stride stride_out, unit column stride) = keep ⊙ src ·
// keep_scale (1/(1 − p), rounded once from double), plus out's previous value when `accumulate`,
// computed in fp32 and written once. Element (m, k) is kept where its draw (dev::dropout_draws) is
// ≥ p: the mask of the Triton kernels.
struct DropoutParams {
  int64_t M, K;
  Operand src;
  void* out;
  int64_t stride_out;
  const int64_t* seed;
  float p, keep_scale;
  bool accumulate;
};
cudaError_t launch_dropout(DType dtype, const DropoutParams& params, cudaStream_t stream);

// The kernels behind launch_gemm, chosen per call from dtype, sizes and layout:
//   kDecode      M ≤ 32 and Q's columns contiguous in k (x·W₀ᵀ, x·Aᵀ): W₀ streamed once with
//                16-byte loads, on the tensor cores for 16-bit products with N ≥ 256 and aligned
//                rows, else one warp per row of W₀; the LoRA term added before the single write
//                (csrc/lora_decode.cu). Where kWgmma is asked for and fits, only up to 8 rows.
//   kWgmma       float16/bfloat16 with N ≥ 256 (M ≤ 64: computed transposed), on an sm_90a build
//                running on a compute capability 9.0 GPU, when LORA_KERNELS_WGMMA=1: wgmma tensor
//                cores fed by a warp-specialized TMA producer, or cp.async (csrc/lora_wgmma.cu).
//                Opt-in until checked and timed on a GPU.
//   kTensorCore  float16/bfloat16 otherwise: mma.sync tensor cores fed by a cp.async pipeline
//                (csrc/lora_tensor_core.cu)
//   kSimt        float32: the portable fp32 tiled kernel (csrc/lora_gemm.cu)
enum class Kernel { kSimt, kTensorCore, kDecode, kWgmma };
Kernel choose_kernel(DType dtype, const GemmParams& params);

// Scratch (fp32 elements) launch_gemm needs for these arguments: non-zero when a product with few
// output tiles and a long K (x·Aᵀ, dY·B, gᵀ·x, dYᵀ·xa; x·W₀ᵀ at 9–32 rows) is split along K over
// more blocks.
int64_t workspace_elems(DType dtype, const GemmParams& params);

cudaError_t launch_gemm(DType dtype, const GemmParams& params, cudaStream_t stream);

// Whether kWgmma can run here: an sm_90a build on a compute capability 9.0 GPU.
bool wgmma_supported();

namespace detail {
cudaError_t launch_simt(DType dtype, const GemmParams& params, cudaStream_t stream);
cudaError_t launch_tensor_core(DType dtype, const GemmParams& params, cudaStream_t stream);
int64_t tensor_core_workspace_elems(const GemmParams& params);
bool wgmma_fits(const GemmParams& params);  // the shapes and operands kWgmma takes (when requested)
cudaError_t launch_wgmma(DType dtype, const GemmParams& params, cudaStream_t stream);
int64_t wgmma_workspace_elems(const GemmParams& params);
cudaError_t launch_decode(DType dtype, const GemmParams& params, cudaStream_t stream);
int64_t decode_workspace_elems(DType dtype, const GemmParams& params);
// C = keep ⊙ Σ_split workspace[split] + bias: the second pass of a product split along K, whose
// `splits` blocks each wrote scaled fp32 partial sums [split][M][N] into params.workspace.
cudaError_t launch_split_k_reduce(DType dtype, const GemmParams& params, int splits, cudaStream_t stream);
}  // namespace detail

}  // namespace lora_kernels
