// The CUDA backend's launch_gemm, built for the CPU with emulator.h: the kernel sources of csrc/
// unchanged. tests/test_cuda_emulation.py compiles this into a shared library and calls it through
// ctypes on CPU tensors.
#include "emulator.h"

#include "../../csrc/lora_decode.cu"
#include "../../csrc/lora_dropout.cu"
#include "../../csrc/lora_gemm.cu"
#include "../../csrc/lora_tensor_core.cu"
#include "../../csrc/lora_wgmma.cu"

using lora_kernels::DType;
using lora_kernels::GemmParams;

namespace {
// dtype: 0 float32, 1 float16, 2 bfloat16. strides[10]: P, Q, P2, Q2 (row, col) then C (row, col).
// adapter_ids null: no multi-adapter mask. overlap_prior: launched as y's kernel is on sm_90+.
GemmParams params_of(int64_t M, int64_t N, int64_t K, int64_t K2, const void* P, const void* Q, const void* P2,
                     const void* Q2, const void* bias, void* C, const int64_t* strides, float alpha, float alpha2,
                     float* workspace, const int32_t* adapter_ids, const float* adapter_scales, int64_t n_adapters,
                     int64_t adapter_rank, bool overlap_prior) {
  return GemmParams{M, N, K, K2, {P, strides[0], strides[1]}, {Q, strides[2], strides[3]},
                    {P2, strides[4], strides[5]}, {Q2, strides[6], strides[7]}, bias, C, strides[8], strides[9],
                    alpha, alpha2, workspace, {adapter_ids, adapter_scales, n_adapters, adapter_rank}, overlap_prior};
}
}  // namespace

#define GEMM_ARGS                                                                                               \
  int64_t M, int64_t N, int64_t K, int64_t K2, const void *P, const void *Q, const void *P2, const void *Q2,  \
      const void *bias, void *C, const int64_t *strides, float alpha, float alpha2, float *workspace,        \
      const int32_t *adapter_ids, const float *adapter_scales, int64_t n_adapters, int64_t adapter_rank,      \
      bool overlap_prior
#define PARAMS                                                                                                  \
  params_of(M, N, K, K2, P, Q, P2, Q2, bias, C, strides, alpha, alpha2, workspace, adapter_ids, adapter_scales, \
            n_adapters, adapter_rank, overlap_prior)

// The first four entry points take the same arguments (those of launch_gemm's GemmParams).
extern "C" {

// Returns the cudaError_t of launch_gemm.
int emulated_gemm(int dtype, GEMM_ARGS) {
  return static_cast<int>(lora_kernels::launch_gemm(static_cast<DType>(dtype), PARAMS, nullptr));
}

// The fp32 scratch launch_gemm wants for these arguments (bindings.cpp allocates it).
int64_t workspace_elems(int dtype, GEMM_ARGS) { return lora_kernels::workspace_elems(static_cast<DType>(dtype), PARAMS); }

// Which kernel launch_gemm picks for these arguments (0 SIMT, 1 tensor cores, 2 decode, 3 wgmma).
int chosen_kernel(int dtype, GEMM_ARGS) {
  return static_cast<int>(lora_kernels::choose_kernel(static_cast<DType>(dtype), PARAMS));
}

// Whether the wgmma kernel, if it runs these arguments, writes C through its staged epilogue
// (16-byte stores; lora_wgmma.cu, store_tile): C's rows 16-byte aligned, one block per tile along K
// (no split-K workspace), not computed transposed.
bool wgmma_staged_epilogue(int dtype, GEMM_ARGS) {
  const GemmParams g = PARAMS;
  return !lora_kernels::wgmma::transposed(g) &&
         lora_kernels::tensor_core::make_params(static_cast<DType>(dtype), g).vector_store &&
         lora_kernels::workspace_elems(static_cast<DType>(dtype), g) == 0;
}

// The emulated launch_dropout (lora_gemm.h), its arguments made as bindings.cpp makes them: out =
// keep ⊙ src / (1 − p) (+ out); returns its cudaError_t.
int emulated_dropout(int dtype, int64_t M, int64_t K, const void* src, int64_t src_stride_row,
                     int64_t src_stride_col, void* out, int64_t out_stride, const int64_t* seed, double p,
                     bool accumulate) {
  const lora_kernels::DropoutParams d{M, K, {src, src_stride_row, src_stride_col}, out, out_stride, seed,
                                      static_cast<float>(p), static_cast<float>(1.0 / (1.0 - p)), accumulate};
  return static_cast<int>(lora_kernels::launch_dropout(static_cast<DType>(dtype), d, nullptr));
}

// The launches since the last call, then forgets them: up to `max` of them into out, as (grid x, y,
// z, threads per block) each; returns how many there were.
int emulated_launches(int64_t* out, int max) {
  std::lock_guard<std::mutex> lock(emu::launches_mutex);
  const int count = static_cast<int>(emu::launches.size());
  for (int i = 0; i < count && i < max; ++i) {
    const emu::LaunchShape& l = emu::launches[i];
    int64_t* row = out + 4 * i;
    row[0] = l.grid.x, row[1] = l.grid.y, row[2] = l.grid.z, row[3] = l.threads;
  }
  emu::launches.clear();
  return count;
}

// The first problem the emulator's memory and launch checks found since the last call ("" if none),
// then forgets it.
const char* emulation_error() {
  static thread_local std::string last;
  std::lock_guard<std::mutex> lock(emu::error_mutex);
  last.swap(emu::first_error);
  emu::first_error.clear();
  return last.c_str();
}
}
