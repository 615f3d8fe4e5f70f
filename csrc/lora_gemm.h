// Host interface of the CUDA kernels. Plain C++ and CUDA runtime types only, so the kernels
// (lora_gemm.cu) compile without torch headers; bindings.cpp turns tensors into these structs.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace lora_kernels {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// A matrix operand: element (i, j) is at ptr[i * stride_row + j * stride_col]. Transposes are
// strides, so every LoRA product (x·W₀ᵀ, dY·W₀, gᵀ·x, dYᵀ·xa, ...) is one GemmParams.
struct Operand {
  const void* ptr;
  int64_t stride_row;
  int64_t stride_col;
};

// C (M×N) = alpha·P(M×K)·Q(K×N) + alpha2·P2(M×K2)·Q2(K2×N) + bias, accumulated in fp32 and
// written once in the operands' dtype. K2 = 0 disables the second product; bias may be null.
struct GemmParams {
  int64_t M, N, K, K2;
  Operand P, Q, P2, Q2;
  const void* bias;
  void* C;
  int64_t stride_cm, stride_cn;
  float alpha, alpha2;
};

cudaError_t launch_gemm(DType dtype, const GemmParams& params, cudaStream_t stream);

}  // namespace lora_kernels
