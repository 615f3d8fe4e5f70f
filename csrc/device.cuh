// The few GPU instructions the kernels use beyond plain CUDA C++, each behind one small function:
// tensor-core mma.sync and wgmma, ldmatrix, cp.async, bulk tensor copies (TMA) and mbarriers, a
// warp sum and programmatic dependent launch. Kernels call only these (and __syncthreads), so
// tests/cuda_emulation/emulator.h can give the same names a CPU meaning and run the unchanged kernel
// sources on a machine without a GPU (see that file).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cuda.h>  // CUtensorMap and its enums (types only)

#include "lora_gemm.h"  // GemmParams, adapter_keep (keep_and_bias)

#ifndef LORA_KERNELS_EMULATE
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_runtime.h>

namespace lora_kernels {
namespace dev {

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8×8 tiles of 16-bit elements from shared memory: lane 8·i + j gives the address of row j of
// tile i; lane t receives in r[i] the elements (t/4, 2·(t%4)) and (t/4, 2·(t%4) + 1) of tile i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
}

// The same, each tile transposed: lane t receives elements (2·(t%4), t/4) and (2·(t%4) + 1, t/4).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
}

// c (16×8, fp32) += a (16×16) · b (16×8) on the tensor cores, fragments in PTX's m16n8k16 layout.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Warpgroup MMA (wgmma, sm_90a only; lora_wgmma.cu). Four consecutive warps, starting at a warp
// index divisible by 4, issue it together: d (64×N, fp32, N/2 registers per thread) += A (64×16)
// · B (16×N), both read by the tensor cores straight from shared memory as described by 64-bit
// matrix descriptors (sw128_descriptor). It runs asynchronously: wgmma_commit closes a group of
// them, wgmma_wait<n> waits until at most n groups are in flight, and only then may d be read or
// the shared memory be overwritten. TRANS_A / TRANS_B: the operand is stored MN-major (m or n
// contiguous) rather than K-major. Register layout of d: d[4j + e] is row 16·(warp % 4) + lane/4 +
// 8·(e/2), column 8j + 2·(lane % 4) + e % 2 (mma.sync's C fragment, one per 8 columns).
//
// Elsewhere (sm_80, plain sm_90) these compile to nothing; supports_wgmma() keeps the host from
// launching a kernel that uses them there.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LORA_KERNELS_WGMMA_ASM 1
#endif

// Orders this thread's ordinary (generic-proxy) writes to shared memory, cp.async's included, before
// later reads by the tensor cores (the async proxy); a __syncthreads must follow for other threads.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_fence() {
#ifdef LORA_KERNELS_WGMMA_ASM
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef LORA_KERNELS_WGMMA_ASM
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int pending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef LORA_KERNELS_WGMMA_ASM
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(pending) : "memory");
#endif
}
// After wgmma_wait: the compiler must not move reads of the accumulators above the wait (nothing
// in the wait names them), so each gets a new definition here, after it.
template <int N>
__device__ __forceinline__ void fence_accumulators(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#ifdef LORA_KERNELS_WGMMA_ASM
#define LORA_WGMMA_M64N256K16(TYPE)                                                                                  \
  asm volatile(                                                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                                                  \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE                                                   \
      " {"                                                                                                           \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                       \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                             \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                             \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "                             \
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "                             \
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                             \
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "                 \
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"               \
      "}, %128, %129, p, 1, 1, %131, %132;\n}\n"                                                                     \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),  \
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),       \
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),      \
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),      \
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),      \
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),      \
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),      \
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]),      \
        "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]),      \
        "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]),      \
        "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]),      \
        "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]),      \
        "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), \
        "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),            \
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]),            \
        "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]),            \
        "+f"(d[126]), "+f"(d[127])                                                                                   \
      : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(int(TRANS_A)), "n"(int(TRANS_B)))
#define LORA_WGMMA_M64N32K16(TYPE)                                                                                  \
  asm volatile(                                                                                                     \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                                                  \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE                                                   \
      " {"                                                                                                          \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"                                        \
      "}, %16, %17, p, 1, 1, %19, %20;\n}\n"                                                                        \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), \
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])                    \
      : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(int(TRANS_A)), "n"(int(TRANS_B)))
#endif

// d (64×N, fp32, N/2 registers per thread) += A (64×16) · B (16×N), or (accumulate 0) d = A·B,
// whatever d held; N = 256 or 32.
template <typename T, int N, bool TRANS_A, bool TRANS_B>
__device__ __forceinline__ void wgmma_m64nNk16(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  static_assert(N == 256 || N == 32, "wgmma shapes instantiated: m64n256k16, m64n32k16");
#ifdef LORA_KERNELS_WGMMA_ASM
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  if constexpr (N == 256) {
    if constexpr (kBf16) {
      LORA_WGMMA_M64N256K16("bf16");
    } else {
      LORA_WGMMA_M64N256K16("f16");
    }
  } else {
    if constexpr (kBf16) {
      LORA_WGMMA_M64N32K16("bf16");
    } else {
      LORA_WGMMA_M64N32K16("f16");
    }
  }
#endif
}

// Warp specialization (sm_90a): this warpgroup's registers per thread become REGS (a multiple of 8,
// 24-256), handed back to (dec) or taken from (inc) the block's pool; every warp of the warpgroup
// executes it. A block is given registers for whole warpgroups at launch (its __launch_bounds__),
// so a producer warpgroup that needs few can give them to the consumers that hold accumulators.
template <int REGS>
__device__ __forceinline__ void release_registers() {
#ifdef LORA_KERNELS_WGMMA_ASM
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
#endif
}
template <int REGS>
__device__ __forceinline__ void claim_registers() {
#ifdef LORA_KERNELS_WGMMA_ASM
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
#endif
}

// All lanes of the warp reach this point before any goes on (__syncwarp).
__device__ __forceinline__ void sync_warp() { __syncwarp(); }

// Bulk tensor copies (TMA, sm_90) completing on an mbarrier. One thread starts a copy of a box of a
// 2-D tensor (a CUtensorMap made on the host by encode_tensor_map_2d) into shared memory; the copy
// engine writes it in the map's swizzle, zero-fills what lies outside the tensor, and counts the
// bytes against the mbarrier's expected transaction count. A thread that has seen the barrier's
// phase complete (mbarrier_wait) may read the box; the tensor cores may too, without a proxy fence
// (both are the async proxy). Phases alternate: the n-th completion has parity n % 2.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(arrivals) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the copy engine
#endif
}
// One of the phase's arrivals, announcing `bytes` of copies that will complete on it.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(bar)), "r"(bytes)
               : "memory");
#endif
}
// One of the phase's arrivals, with no bytes (a consumer that is done with a stage).
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(bar)) : "memory");
#endif
}
// Until the phase of this parity has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t done = 0;
  do {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(smem_address(bar)), "r"(parity)
                 : "memory");
  } while (!done);
#endif
}
// The box of `map` whose first element is (inner, outer) — element coordinates, innermost first —
// into dst (128-byte aligned; 1024 for the 128-byte swizzle to start a new pattern).
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int32_t inner, int32_t outer,
                                            uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(inner), "r"(outer), "r"(smem_address(bar))
      : "memory");
#endif
}

// A tensor map for tma_load_2d: a 2-D tensor of 16-bit elements, `inner` contiguous ones per row,
// `outer` rows `row_bytes` apart (a multiple of 16, like the base address), copied in boxes of
// box_inner × box_outer elements (box_inner·2 ≤ 128) with the 128-byte swizzle. False if the
// driver has no tensor maps or refuses these arguments. (The driver's cuTensorMapEncodeTiled, looked
// up once through the runtime so that the extension needs no -lcuda.)
inline bool encode_tensor_map_2d(CUtensorMap* map, bool bf16, const void* base, uint64_t inner, uint64_t outer,
                                 uint64_t row_bytes, uint32_t box_inner, uint32_t box_outer) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
#if CUDART_VERSION >= 12050
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
#else  // (deprecated in 12.5 and later)
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {inner, outer}, strides[1] = {row_bytes};
  const cuuint32_t box[2] = {box_inner, box_outer}, element_strides[2] = {1, 1};
  return encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
                const_cast<void*>(base), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Asynchronous 16-byte copy global → shared that reads only the first src_bytes (0..16) and
// zero-fills the rest: the tails of a tile cost no branch. With src_bytes = 0 nothing is read.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most `pending` committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Programmatic dependent launch (sm_90+; both are no-ops on older GPUs). A kernel started with
// launch_overlapping_prior may begin while the kernel before it in the stream is still running: it
// must call wait_for_prior_grid() before reading anything that kernel writes. A kernel calling
// allow_dependents_early() lets such a successor start as soon as all its blocks have called it.
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_dependents_early() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
}
template <typename... Params, typename... Args>
inline cudaError_t launch_overlapping_prior(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                                            cudaStream_t stream, Args... args) {
  cudaLaunchAttribute overlap[1];
  overlap[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = overlap;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

// Kernels that need more than 48 KiB of dynamic shared memory must say so once.
template <typename Kernel>
inline cudaError_t allow_dynamic_smem(Kernel kernel, int bytes) {
  return bytes > 48 * 1024 ? cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)
                           : cudaSuccess;
}
inline cudaError_t last_launch_error() { return cudaGetLastError(); }

// Streaming multiprocessors of the current device (looked up once per device).
inline int sm_count() {
  static int cached[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 132;
  if (cached[device] == 0) {
    int count = 0;
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    cached[device] = count > 0 ? count : 132;
  }
  return cached[device];
}

// Programmatic dependent launch needs compute capability 9.0 (looked up once per device).
inline bool supports_overlapping_launch() {
  static int cached[64] = {};  // 0 unknown, 1 no, 2 yes
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return false;
  if (cached[device] == 0) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cached[device] = major >= 9 ? 2 : 1;
  }
  return cached[device] == 2;
}

// wgmma kernels exist in this build (setup.py defines LORA_KERNELS_HAS_SM90A when it compiles for
// sm_90a and not plain sm_90) and the device is a compute capability 9.0 GPU, which then runs them.
inline bool supports_wgmma() {
#ifdef LORA_KERNELS_HAS_SM90A
  static int cached[64] = {};  // 0 unknown, 1 no, 2 yes
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return false;
  if (cached[device] == 0) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cached[device] = major == 9 && minor == 0 ? 2 : 1;
  }
  return cached[device] == 2;
#else
  return false;
#endif
}

}  // namespace dev
}  // namespace lora_kernels

// Shared memory is dynamic everywhere (one buffer per block, carved by the kernel), which is also
// what the CPU emulation can provide.
#define LORA_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define LORA_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<grid, block, smem_bytes, stream>>>(__VA_ARGS__)
#endif  // LORA_KERNELS_EMULATE

namespace lora_kernels {
namespace dev {

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ⌈a / b⌉ for tile and block counts.
__host__ __device__ __forceinline__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Split-K: `steps` steps of K shared among as many splits as `wanted`, at most max_splits and each
// at least min_steps long, none left empty; {1, steps} (at least 1 step) when that is one split.
struct KSplit {
  int64_t splits, steps_per_split;
};
inline KSplit split_steps(int64_t steps, int64_t wanted, int64_t min_steps, int64_t max_splits) {
  int64_t splits = wanted < steps / min_steps ? wanted : steps / min_steps;
  splits = splits < max_splits ? splits : max_splits;
  if (splits <= 1) return {1, steps > 0 ? steps : 1};
  const int64_t per_split = cdiv(steps, splits);
  return {cdiv(steps, per_split), per_split};
}

__host__ __device__ __forceinline__ float to_float(float v) { return v; }
__host__ __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__host__ __device__ __forceinline__ T from_float(float v);
template <>
__host__ __device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// LoRA dropout's uniform draws for columns 4·group … 4·group + 3 of row m of x: Philox-4×32-10
// (Triton's tl.rand4x) at counter (group, m), key seed; element (m, k) is kept iff u[k % 4] ≥ p
// (lora_kernels/reference.py, dropout_keep, has the same in torch), so the CUDA and Triton backends
// drop the same elements.
__host__ __device__ __forceinline__ void dropout_draws(uint64_t seed, uint64_t m, uint64_t group, float (&u)[4]) {
  uint32_t c[4] = {static_cast<uint32_t>(group), static_cast<uint32_t>(m), 0, 0};
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t a = static_cast<uint64_t>(0xD2511F53u) * c[0], b = static_cast<uint64_t>(0xCD9E8D57u) * c[2];
    c[0] = static_cast<uint32_t>(b >> 32) ^ c[1] ^ k0;
    c[2] = static_cast<uint32_t>(a >> 32) ^ c[3] ^ k1;
    c[1] = static_cast<uint32_t>(b);
    c[3] = static_cast<uint32_t>(a);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int32_t x = static_cast<int32_t>(c[i]);
    u[i] = static_cast<float>(x < 0 ? ~x : x) * 4.6566127342e-10f;
  }
}

// What every kernel's epilogue does to element (m, n) of C before writing it: keep ⊙ v + bias
// (lora_gemm.h). Where this C is the transpose of the caller's (c_transposed, the wgmma path's
// few-row products), the mask and the bias index the caller's row and column. (m, n) must lie
// inside C: the mask reads the adapter id of the caller's row.
template <typename T>
__host__ __device__ __forceinline__ float keep_and_bias(const GemmParams& g, int64_t m, int64_t n, float v) {
  const int64_t row = g.c_transposed ? n : m, column = g.c_transposed ? m : n;
  v *= adapter_keep(g.adapters, row, column);
  if (g.bias != nullptr) v += to_float(static_cast<const T*>(g.bias)[column]);
  return v;
}

// Matrix descriptor of a wgmma operand in shared memory laid out with the 128-byte swizzle (what
// wgmma's "swizzle mode 1" reads): rows of 128 bytes in atoms of 8 rows (1024 bytes, which must start
// on a 1024-byte boundary of the shared address space), the 16-byte chunk c of row r stored at
// chunk c ^ (r % 8). `address` is the shared-memory byte address of the operand's first element;
// the byte offsets are the distances between neighbouring atoms along the two dimensions:
// leading = along the contiguous dimension (unused by K-major operands, whose 16 k fit in a row),
// stride = along the other (the next 8 rows).
__host__ __device__ __forceinline__ uint64_t sw128_descriptor(uint32_t address, uint32_t leading_bytes,
                                                              uint32_t stride_bytes) {
  return static_cast<uint64_t>((address & 0x3FFFF) >> 4) | static_cast<uint64_t>((leading_bytes & 0x3FFFF) >> 4) << 16 |
         static_cast<uint64_t>((stride_bytes & 0x3FFFF) >> 4) << 32 | static_cast<uint64_t>(1) << 62;
}

}  // namespace dev
}  // namespace lora_kernels
