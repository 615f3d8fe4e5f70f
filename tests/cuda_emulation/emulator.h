// Runs the unchanged CUDA kernel sources of csrc/ on a CPU, so the CUDA backend's index math,
// tiling, tails and tensor-core fragment layouts are checked on machines without a GPU (CI).
//
// Every CUDA thread of a block is an OS thread; __syncthreads is a barrier across them. The
// warp-collective instructions of csrc/device.cuh (ldmatrix, mma.sync, the warp sum) exchange
// operands through a per-warp buffer between two warp barriers and compute exactly what the PTX
// ISA specifies for each lane. cp.async is a synchronous copy with the same zero-fill rule. Blocks
// run one after another; shared memory starts as 0xFF bytes (NaN in every float type), so a read
// of a slot the kernel never wrote shows up in the result.
//
// What this cannot see: races and missing cp.async waits (the copies complete at once), timing,
// register/shared-memory limits. compute-sanitizer on a GPU covers the first; nvcc the last.
#pragma once
#define LORA_KERNELS_EMULATE 1

#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cmath>
#include <cuda_runtime_api.h>  // dim3, cudaError_t, cudaStream_t (types only; nothing is called)

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace emu {

struct Warp {
  std::barrier<> sync{32};
  const unsigned char* address[32];
  uint32_t regs[32][6];
  float value[32];
};

struct Block {
  Block(int threads, size_t smem_bytes) : sync(threads), warps(threads / 32), smem(smem_bytes + 128, 0xFF) {}
  std::barrier<> sync;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem;
  unsigned char* shared() {  // 128-byte aligned, like __align__(128) extern __shared__
    return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem.data()) + 127) & ~uintptr_t(127));
  }
};

inline thread_local Block* block = nullptr;
inline thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;

inline int lane() { return static_cast<int>(thread_idx.x % 32); }
inline Warp& warp() { return block->warps[thread_idx.x / 32]; }

inline float half_bits(uint16_t bits, bool bf16) {
  if (bf16) {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

// Launch: run every block of the grid, each as block_dim OS threads.
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 threads, size_t smem_bytes, Args... args) {
  const int n = static_cast<int>(threads.x * threads.y * threads.z);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b(n, smem_bytes);
        std::vector<std::thread> pool;
        pool.reserve(n);
        for (int t = 0; t < n; ++t)
          pool.emplace_back([&, t] {
            block = &b;
            thread_idx = dim3(t % threads.x, (t / threads.x) % threads.y, t / (threads.x * threads.y));
            block_idx = dim3(bx, by, bz);
            block_dim = threads;
            grid_dim = grid;
            kernel(args...);
          });
        for (auto& th : pool) th.join();
      }
}

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block->sync.arrive_and_wait(); }

#define LORA_DYNAMIC_SMEM(name) unsigned char* name = emu::block->shared()
#define LORA_LAUNCH(kernel, grid, block_, smem_bytes, stream, ...) \
  emu::launch(kernel, dim3(grid), dim3(block_), smem_bytes, __VA_ARGS__)

namespace lora_kernels {
namespace dev {

inline void ldmatrix_x4_impl(uint32_t (&r)[4], const void* p, bool trans) {
  emu::Warp& w = emu::warp();
  const int t = emu::lane();
  w.address[t] = static_cast<const unsigned char*>(p);
  w.sync.arrive_and_wait();
  for (int i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (int h = 0; h < 2; ++h) {
      // Row j of tile i comes from lane 8·i + j; without .trans lane t takes row t/4, columns
      // 2·(t%4) + h; with .trans it takes row 2·(t%4) + h, column t/4.
      const int row = trans ? 2 * (t % 4) + h : t / 4;
      const int col = trans ? t / 4 : 2 * (t % 4) + h;
      std::memcpy(&e[h], w.address[8 * i + row] + 2 * col, 2);
    }
    r[i] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
  w.sync.arrive_and_wait();
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix_x4_impl(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ldmatrix_x4_impl(r, p, true); }

// PTX ISA, mma.m16n8k16 with .f16/.bf16 operands: g = lane/4, t = lane%4.
//   A (16×16): reg 0 (g, 2t..2t+1), reg 1 (g+8, 2t..), reg 2 (g, 2t+8..), reg 3 (g+8, 2t+8..)
//   B (16×8):  reg 0 (k = 2t..2t+1, n = g), reg 1 (k = 2t+8.., n = g)
//   C (16×8):  c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1); the low half of a reg is the first element.
template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  constexpr bool bf16 = std::is_same<T, __nv_bfloat16>::value;
  emu::Warp& w = emu::warp();
  const int lane = emu::lane();
  for (int i = 0; i < 4; ++i) w.regs[lane][i] = a[i];
  for (int i = 0; i < 2; ++i) w.regs[lane][4 + i] = b[i];
  w.sync.arrive_and_wait();
  auto element = [&](int src_lane, int reg, int half) {
    return emu::half_bits(static_cast<uint16_t>(w.regs[src_lane][reg] >> (16 * half)), bf16);
  };
  auto a_at = [&](int row, int k) { return element((row % 8) * 4 + (k % 8) / 2, (row / 8) + 2 * (k / 8), k % 2); };
  auto b_at = [&](int k, int n) { return element(n * 4 + (k % 8) / 2, 4 + k / 8, k % 2); };
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    float sum = c[i];
    for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, col);
    out[i] = sum;
  }
  w.sync.arrive_and_wait();
  for (int i = 0; i < 4; ++i) c[i] = out[i];
}

inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (src_bytes > 0) std::memcpy(dst, src, src_bytes);
  std::memset(static_cast<unsigned char*>(dst) + src_bytes, 0, 16 - src_bytes);
}
inline void cp_async_commit() {}
template <int pending>
inline void cp_async_wait() {}

inline float warp_sum(float v) {
  emu::Warp& w = emu::warp();
  const int lane = emu::lane();
  for (int offset = 16; offset > 0; offset >>= 1) {  // the same butterfly as __shfl_xor_sync
    w.value[lane] = v;
    w.sync.arrive_and_wait();
    const float other = w.value[lane ^ offset];
    w.sync.arrive_and_wait();
    v += other;
  }
  return v;
}

template <typename Kernel>
inline cudaError_t allow_dynamic_smem(Kernel, int) { return cudaSuccess; }
inline cudaError_t last_launch_error() { return cudaSuccess; }
// A small GPU, so that the split-K paths run on the test's small shapes.
inline int sm_count() { return 8; }

}  // namespace dev
}  // namespace lora_kernels
