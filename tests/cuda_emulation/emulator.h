// Runs the unchanged CUDA kernel sources of csrc/ on a CPU, so the CUDA backend's index math,
// tiling, tails and tensor-core fragment layouts are checked on machines without a GPU (CI).
//
// Every CUDA thread of a block is a fiber (its own stack, switched in user space) and the block's
// fibers take turns on one OS thread: a thread runs until it waits (__syncthreads, a warp barrier,
// an mbarrier), then the next one runs. The warp-collective instructions of csrc/device.cuh
// (ldmatrix, mma.sync, the warp sum) exchange operands through a per-warp buffer between two warp
// barriers and compute exactly what the PTX ISA specifies for each lane. The blocks of a grid run
// on one OS thread per CPU core, in parallel (blocks of one launch never share memory they write
// in these kernels; the split-K partial sums are reduced by a second launch). A round in which
// every thread of a block waits and none can go on is a deadlock: reported, and the block's waits
// then return. Shared memory starts as 0xFF bytes (NaN in every float type), so a read of a slot
// the kernel never wrote shows up in the result.
//
// cp.async is emulated as late as the PTX memory model allows: a copy lands only when the issuing
// thread's cp.async.wait_group retires its group, so a wait that lets too many groups stay in
// flight leaves stale data in the tile. Shared memory is also checked like compute-sanitizer
// would, per 16-byte chunk, for the accesses that go through device.cuh (cp.async writes and
// ldmatrix reads); each finding is recorded (emu::first_error) and the test fails on it:
//   - bounds and alignment: cp.async destinations and ldmatrix rows 16-byte aligned inside the
//     block's dynamic shared memory, cp.async sources 16-byte aligned;
//   - read-after-write: a chunk read in the same barrier interval in which its copy landed, or
//     while it is still in flight (a missing wait or __syncthreads);
//   - write-after-read: a copy issued into a chunk another warp reads in the same interval (the
//     copy may land before that read; a missing __syncthreads before refilling a stage);
//   - launch limits: threads per block, grid y/z, and dynamic shared memory over 48 KiB without
//     allow_dynamic_smem (over 227 KiB at all).
//
// wgmma (sm_90a) is computed per thread from the shared memory its matrix descriptors describe (the
// PTX ISA's canonical 128-byte-swizzled layouts), when the wgmma.wait_group that retires it runs.
// Bulk tensor copies (TMA) land, swizzled and zero-filled past the tensor's edges, at the first
// wait on their mbarrier's phase. An mbarrier wait blocks until the phase's arrivals (other
// threads: a producer warp's copies, consumer warps' releases) have come. Reported: a wgmma read of
// a cp.async copy not fenced for the async proxy (fence.proxy.async) before a barrier, or of a TMA
// box whose phase no one has waited for; a copy (cp.async or TMA) into a chunk a wgmma still reads;
// an expect_tx that does not match the bytes copied; more arrivals than a barrier's count; a wait
// that never completes (a deadlock). setmaxnreg is a no-op here.
//
// What this cannot see: plain loads and stores to shared memory (element-wise staging, the
// decode and SIMT kernels' reductions) in the race check, timing, registers. compute-sanitizer
// on a GPU covers the first; nvcc --resource-usage the last. For wgmma and TMA it encodes our
// reading of the PTX ISA; only a GPU can confirm that reading.
#pragma once
#define LORA_KERNELS_EMULATE 1

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cmath>
#include <cuda.h>              // CUtensorMap (type only)
#include <cuda_runtime_api.h>  // dim3, cudaError_t, cudaStream_t (types only; nothing is called)

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define __grid_constant__

namespace emu {

// A barrier across `count` fibers of one block (__syncthreads: the block's threads; a warp's 32).
struct Barrier {
  explicit Barrier(int count) : count(count) {}
  void arrive_and_wait();  // defined with the fibers, below
  int count, arrived = 0;
  uint64_t generation = 0;
};

struct Warp {
  Barrier sync{32};
  const unsigned char* address[32];
  uint32_t regs[32][6];
  float value[32];
};

// The first problem any check found since the test last asked (emulated_gemm.cpp's emulation_error).
inline std::mutex error_mutex;
inline std::string first_error;
template <typename... Args>
void report(const char* format, Args... args) {
  char message[512];
  std::snprintf(message, sizeof message, format, args...);
  std::lock_guard<std::mutex> lock(error_mutex);
  if (first_error.empty()) first_error = message;
}

// What the race check knows of one 16-byte chunk of shared memory. Epochs count a thread's
// __syncthreads since its block started (the same count in every thread between two barriers).
struct Chunk {
  int writer = -1;            // thread that issued the last cp.async into it
  int landed = -1;            // epoch in which that copy landed; kInFlight until its wait
  int read_epoch = -1;        // last epoch it was read in, and by which warps (bit per warp)
  uint64_t readers = 0;
  int fenced = -1;            // epoch of the writer's fence.proxy.async after the copy landed
  int wgmma_pending = 0;      // wgmmas issued that read it and have not been waited for
};
constexpr int kInFlight = INT_MAX;
constexpr int kTmaWriter = -2;  // Chunk::writer of a bulk tensor copy

// A tensor map as encode_tensor_map_2d fills it (inside the opaque CUtensorMap), and a bulk tensor
// copy waiting to land.
struct TensorMap {
  const unsigned char* base;
  uint64_t inner, outer, row_bytes;
  uint32_t box_inner, box_outer;
  uint32_t box_bytes() const { return box_inner * box_outer * 2; }  // 16-bit elements
};
struct BoxCopy {
  uint32_t dst;
  TensorMap map;
  int32_t inner, outer;
};
// An mbarrier: a phase completes when all its arrivals have come and its copies have landed (at the
// first wait on it, as late as the PTX memory model allows), and the expected bytes are all there.
struct Mbarrier {
  int arrivals = 0, arrivals_left = 0;
  int64_t tx = 0;
  uint32_t phase = 0;  // completed phases, mod 2
  std::vector<BoxCopy> copies;
};

struct Block {
  Block(int threads, size_t smem_bytes)
      : sync(threads), warps(threads / 32), smem(smem_bytes + 128, 0xFF), smem_bytes(smem_bytes),
        chunks(smem_bytes / 16 + 1) {}
  Barrier sync;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem;
  size_t smem_bytes;
  std::mutex chunks_mutex;
  std::vector<Chunk> chunks;
  std::map<uint32_t, Mbarrier> mbarriers;  // by shared offset (guarded by chunks_mutex)
  // Waits passed and arrivals made: a round of the block's fibers that changes neither is a deadlock.
  uint64_t progress = 0;
  bool hung = false;  // a deadlock (reported): every wait of the block returns at once
  unsigned char* shared() {  // 128-byte aligned, like __align__(128) extern __shared__
    return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem.data()) + 127) & ~uintptr_t(127));
  }
};

inline thread_local Block* block = nullptr;
inline thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;
inline thread_local int epoch = 0;

inline int lane() { return static_cast<int>(thread_idx.x % 32); }
inline Warp& warp() { return block->warps[thread_idx.x / 32]; }

// The chunk index of a 16-byte shared-memory access at p, or -1 (reported) if it is misaligned or
// outside the block's dynamic shared memory.
inline int chunk_of(const void* p, const char* what) {
  const auto* byte = static_cast<const unsigned char*>(p);
  const ptrdiff_t offset = byte - block->shared();
  if (offset < 0 || offset + 16 > static_cast<ptrdiff_t>(block->smem_bytes)) {
    report("%s at shared offset %td, outside the %zu bytes of dynamic shared memory (thread %u, block %u,%u,%u)",
           what, offset, block->smem_bytes, thread_idx.x, block_idx.x, block_idx.y, block_idx.z);
    return -1;
  }
  if (offset % 16 != 0) {
    report("%s at shared offset %td is not 16-byte aligned", what, offset);
    return -1;
  }
  return static_cast<int>(offset / 16);
}

// Asynchronous operations a thread issued (cp.async copies, wgmmas): the open group, then the
// committed groups oldest first. A wait that allows `pending` groups in flight retires the older
// ones, in order, each through `retire` (which lands a copy or computes a wgmma).
template <typename Op>
struct AsyncGroups {
  std::vector<Op> open;
  std::deque<std::vector<Op>> committed;
  void commit() {
    committed.push_back(std::move(open));
    open.clear();
  }
  template <typename Retire>
  void wait(size_t pending, Retire retire) {
    while (committed.size() > pending) {
      retire(committed.front());
      committed.pop_front();
    }
  }
  void clear() {
    open.clear();
    committed.clear();
  }
};

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes, chunk;
};
inline thread_local AsyncGroups<Copy> cp_asyncs;  // this thread's cp.async copies
inline thread_local std::vector<int> unfenced;  // chunks this thread's copies landed in since its last fence.proxy.async

inline void land(const std::vector<Copy>& group) {
  std::lock_guard<std::mutex> lock(block->chunks_mutex);
  for (const Copy& c : group) {
    if (c.bytes > 0) std::memcpy(c.dst, c.src, c.bytes);
    std::memset(c.dst + c.bytes, 0, 16 - c.bytes);
    block->chunks[c.chunk].landed = epoch;
    block->chunks[c.chunk].fenced = -1;
    unfenced.push_back(c.chunk);
  }
}

inline void record_read(int chunk) {
  const int my_warp = static_cast<int>(thread_idx.x / 32);
  std::lock_guard<std::mutex> lock(block->chunks_mutex);
  Chunk& c = block->chunks[chunk];
  if (c.writer >= 0 && c.landed >= epoch)
    report("ldmatrix by warp %d reads shared offset %d, %s by thread %d (missing cp.async wait or __syncthreads)",
           my_warp, chunk * 16,
           c.landed == kInFlight ? "still in flight from a cp.async"
                                 : "written by a cp.async that landed in this barrier interval",
           c.writer);
  if (c.read_epoch != epoch) c.read_epoch = epoch, c.readers = 0;
  c.readers |= uint64_t(1) << my_warp;
}

inline void record_write(int chunk) {
  const int me = static_cast<int>(thread_idx.x), my_warp = me / 32;
  std::lock_guard<std::mutex> lock(block->chunks_mutex);
  Chunk& c = block->chunks[chunk];
  if (c.read_epoch == epoch && (c.readers & ~(uint64_t(1) << my_warp)) != 0)
    report("cp.async by thread %d overwrites shared offset %d that another warp reads in the same barrier interval "
           "(missing __syncthreads before refilling a stage)", me, chunk * 16);
  if (c.wgmma_pending > 0)
    report("cp.async by thread %d overwrites shared offset %d that a wgmma still reads (missing wgmma.wait_group)",
           me, chunk * 16);
  if (c.writer >= 0 && c.writer != me && c.landed >= epoch)
    report("cp.async by threads %d and %d write shared offset %d in the same barrier interval", c.writer, me,
           chunk * 16);
  c.writer = me;
  c.landed = kInFlight;
}

// wgmma: issued, then computed when the issuing thread's wgmma.wait_group retires its group (as late
// as the PTX ISA allows), so a missing wait leaves stale accumulators or reads a refilled buffer.
struct WgmmaOp {
  float* d;
  uint64_t desc_a, desc_b;
  int n;  // columns of d
  bool trans_a, trans_b, bf16;
  bool accumulate;  // false: d = A·B (the PTX scale-d operand 0)
  std::vector<int> chunks;  // what it reads; kept by the warpgroup's first thread, which does the bookkeeping
};
inline thread_local AsyncGroups<WgmmaOp> wgmmas;  // this thread's share of its warpgroup's wgmmas

// Launch limits a GPU would refuse (cudaErrorInvalidConfiguration / launch out of resources).
inline std::mutex attributes_mutex;
inline std::map<const void*, int> max_dynamic_smem;  // what allow_dynamic_smem opted each kernel into
inline bool launch_allowed(const void* kernel, dim3 grid, dim3 threads, size_t smem_bytes) {
  const int n = static_cast<int>(threads.x * threads.y * threads.z);
  int allowed = 48 * 1024;
  {
    std::lock_guard<std::mutex> lock(attributes_mutex);
    auto it = max_dynamic_smem.find(kernel);
    if (it != max_dynamic_smem.end()) allowed = it->second;
  }
  if (n < 1 || n > 1024 || n % 32 != 0) return report("launch with %d threads per block", n), false;
  if (grid.x < 1 || grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535)
    return report("launch with grid (%u, %u, %u)", grid.x, grid.y, grid.z), false;
  if (smem_bytes > static_cast<size_t>(allowed) || smem_bytes > 227 * 1024)
    return report("launch with %zu bytes of dynamic shared memory, %d allowed", smem_bytes, allowed), false;
  return true;
}

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

// Every launch's grid and block size since the test last asked (emulated_gemm.cpp's emulated_launches).
struct LaunchShape {
  dim3 grid;
  int threads;
};
inline std::mutex launches_mutex;
inline std::vector<LaunchShape> launches;

// ---- Fibers: one per CUDA thread; the thread-locals above are the running fiber's. ----

// What a fiber swaps into the thread-locals when it runs, and out again when it waits.
struct ThreadState {
  Block* block = nullptr;
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  int epoch = 0;
  AsyncGroups<Copy> cp_asyncs;
  std::vector<int> unfenced;
  AsyncGroups<WgmmaOp> wgmmas;
};
inline void swap_thread_state(ThreadState& s) {
  std::swap(block, s.block);
  std::swap(thread_idx, s.thread_idx);
  std::swap(block_idx, s.block_idx);
  std::swap(block_dim, s.block_dim);
  std::swap(grid_dim, s.grid_dim);
  std::swap(epoch, s.epoch);
  std::swap(cp_asyncs, s.cp_asyncs);
  std::swap(unfenced, s.unfenced);
  std::swap(wgmmas, s.wgmmas);
}

constexpr size_t kFiberStackBytes = 256 * 1024;  // kernels keep their tiles in registers: frames of a few KiB

#if defined(__x86_64__)
// The context switch: push the callee-saved registers (System V ABI), swap stack pointers, pop.
// Plain ucontext (below) makes a signal-mask system call per switch: 566 ns a round trip against 19 ns
// (the 2-core development CPU, g++ 12 -O2, 2026-12-01).
// A naked inline function (no prologue; one copy however many files include this header).
[[gnu::naked, gnu::noinline]] inline void switch_stack(void** /*save_sp: rdi*/, void* /*load_sp: rsi*/) {
  asm(R"(
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
  )");
}
struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { switch_stack(&from.sp, to.sp); }
// A context that starts `entry` on `stack`: the six registers the switch pops, then entry's address
// for its ret, then a null return address for entry (which never returns) at a call's alignment.
inline void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  auto* sp = reinterpret_cast<uintptr_t*>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15));
  *--sp = 0;
  *--sp = reinterpret_cast<uintptr_t>(entry);
  for (int i = 0; i < 6; ++i) *--sp = 0;
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Fiber {
  Context context;
  std::unique_ptr<char[]> stack{new char[kFiberStackBytes]};  // not zeroed: pages are touched as used
  ThreadState state;
  bool done = false;
};

inline thread_local Context scheduler;  // the OS thread's own context, which runs the fibers in turn
inline thread_local Fiber* running = nullptr;
inline thread_local void (*fiber_body)(void*) = nullptr;  // what the fibers of the current block run
inline thread_local void* fiber_body_arg = nullptr;

// A waiting fiber lets the next one run.
inline void yield_fiber() { switch_context(running->context, scheduler); }

inline void fiber_entry() {
  fiber_body(fiber_body_arg);
  running->done = true;
  ++block->progress;
  switch_context(running->context, scheduler);  // never resumed
  std::abort();
}

inline void Barrier::arrive_and_wait() {
  ++block->progress;
  if (++arrived == count) {
    arrived = 0;
    ++generation;
    return;
  }
  const uint64_t mine = generation;
  while (generation == mine) {
    if (block->hung) {
      report("a barrier (__syncthreads or a warp's) never completes: %d of %d threads arrived (thread %u, block %u)",
             arrived, count, thread_idx.x, block_idx.x);
      return;
    }
    yield_fiber();
  }
}

// Runs block `b`: its fibers in turn until all have returned. A round with no progress (every
// fiber waiting on what no other will provide) marks the block hung.
inline void run_block(Block& b, std::vector<Fiber>& fibers, dim3 threads, dim3 block_index, dim3 grid,
                      void (*body)(void*), void* arg) {
  fiber_body = body;
  fiber_body_arg = arg;
  for (size_t t = 0; t < fibers.size(); ++t) {
    Fiber& f = fibers[t];
    f.done = false;
    f.state = ThreadState{};
    f.state.block = &b;
    f.state.thread_idx = dim3(t % threads.x, (t / threads.x) % threads.y, t / (threads.x * threads.y));
    f.state.block_idx = block_index;
    f.state.block_dim = threads;
    f.state.grid_dim = grid;
    make_context(f.context, f.stack.get(), kFiberStackBytes, fiber_entry);
  }
  for (size_t live = fibers.size(); live > 0;) {
    const uint64_t before = b.progress;
    for (Fiber& f : fibers) {
      if (f.done) continue;
      running = &f;
      swap_thread_state(f.state);
      switch_context(scheduler, f.context);
      swap_thread_state(f.state);
      if (f.done) --live;
    }
    if (live > 0 && b.progress == before) b.hung = true;
  }
  running = nullptr;
}

// OS threads that run a launch's blocks (LORA_EMULATED_WORKERS: another number).
inline int worker_count() {
  const char* env = std::getenv("LORA_EMULATED_WORKERS");
  if (env != nullptr && std::atoi(env) > 0) return std::atoi(env);
  return std::max(1u, std::thread::hardware_concurrency());
}

// Launch: run every block of the grid, block_dim fibers each, blocks spread over worker threads.
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 threads, size_t smem_bytes, Args... args) {
  const int n = static_cast<int>(threads.x * threads.y * threads.z);
  if (!launch_allowed(reinterpret_cast<const void*>(kernel), grid, threads, smem_bytes)) return;
  {
    std::lock_guard<std::mutex> lock(launches_mutex);
    launches.push_back({grid, n});
  }
  auto call = [&] { kernel(args...); };
  auto body = [](void* p) { (*static_cast<decltype(call)*>(p))(); };
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  std::atomic<int64_t> next{0};
  auto work = [&] {
    std::vector<Fiber> fibers(n);
    for (int64_t i; (i = next++) < blocks;) {
      const dim3 index(i % grid.x, (i / grid.x) % grid.y, i / (int64_t(grid.x) * grid.y));
      Block b(n, smem_bytes);
      run_block(b, fibers, threads, index, grid, body, &call);
    }
  };
  std::vector<std::thread> workers;
  const int64_t helpers = std::min<int64_t>(worker_count(), blocks) - 1;
  for (int64_t w = 0; w < helpers; ++w) workers.emplace_back(work);
  work();
  for (auto& w : workers) w.join();
}

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() {
  emu::block->sync.arrive_and_wait();
  ++emu::epoch;
}

#define LORA_DYNAMIC_SMEM(name) unsigned char* name = emu::block->shared()
#define LORA_LAUNCH(kernel, grid, block_, smem_bytes, stream, ...) \
  emu::launch(kernel, dim3(grid), dim3(block_), smem_bytes, __VA_ARGS__)

namespace lora_kernels {
namespace dev {

inline void ldmatrix_x4_impl(uint32_t (&r)[4], const void* p, bool trans) {
  emu::Warp& w = emu::warp();
  const int t = emu::lane();
  w.address[t] = static_cast<const unsigned char*>(p);
  const int chunk = emu::chunk_of(p, trans ? "ldmatrix.trans row" : "ldmatrix row");
  if (chunk >= 0) emu::record_read(chunk);
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

// Issued now, landed by the cp_async_wait that retires its group (see the top of this file).
inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  const int chunk = emu::chunk_of(dst, "cp.async destination");
  if (src_bytes < 0 || src_bytes > 16) emu::report("cp.async with src-size %d", src_bytes);
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0)
    emu::report("cp.async source %p is not 16-byte aligned", src);
  if (chunk < 0 || src_bytes < 0 || src_bytes > 16) return;
  emu::record_write(chunk);
  emu::cp_asyncs.open.push_back(
      {static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), src_bytes, chunk});
}
inline void cp_async_commit() { emu::cp_asyncs.commit(); }
template <int pending>
inline void cp_async_wait() {
  emu::cp_asyncs.wait(pending, emu::land);
}

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

inline void sync_warp() { emu::warp().sync.arrive_and_wait(); }
template <int REGS>
inline void release_registers() {}
template <int REGS>
inline void claim_registers() {}

inline uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - emu::block->shared());
}

// This thread's copies that have landed become visible to the tensor cores (wgmma) after the next
// barrier; wgmma_m64nNk16 reports a read of a chunk whose copy was not fenced before a barrier.
inline void fence_proxy_async() {
  std::lock_guard<std::mutex> lock(emu::block->chunks_mutex);
  for (int c : emu::unfenced) emu::block->chunks[c].fenced = emu::epoch;
  emu::unfenced.clear();
}
inline void wgmma_fence() {}
template <int N>
inline void fence_accumulators(float (&)[N]) {}

}  // namespace dev
}  // namespace lora_kernels

namespace emu {

// A wgmma matrix descriptor (PTX ISA, "matrix descriptor"): start address, leading and stride byte
// offsets, each stored >> 4; the kernels use only swizzle mode 1 (128 bytes) with base offset 0.
struct Descriptor {
  uint32_t start, leading, stride;
};
inline Descriptor decode(uint64_t d) {
  if ((d >> 62) != 1 || ((d >> 49) & 7) != 0)
    report("wgmma descriptor %llx: only the 128-byte swizzle with base offset 0 is emulated",
           static_cast<unsigned long long>(d));
  return {static_cast<uint32_t>(d & 0x3FFF) << 4, static_cast<uint32_t>((d >> 16) & 0x3FFF) << 4,
          static_cast<uint32_t>((d >> 32) & 0x3FFF) << 4};
}

// Shared-memory byte offset of element (i, k) (i the row of A or column of B, k < 16) of an operand
// in the canonical 128-byte-swizzled layouts: K-major ((8,m),(8,2)):((64,SBO),(1,8)) and MN-major
// ((8,8,m),(8,k)):((1,8,LBO),(64,SBO)) in elements, then 16-byte chunk bits [4,7) ^= bits [7,10).
inline uint32_t operand_offset(const Descriptor& d, bool mn_major, int i, int k) {
  const uint32_t a = mn_major ? d.start + (i >> 6) * d.leading + (k >> 3) * d.stride + (k & 7) * 128 + (i & 63) * 2
                              : d.start + (i >> 3) * d.stride + (i & 7) * 128 + k * 2;
  return a ^ (((a >> 7) & 7) << 4);
}

inline float smem_element(uint32_t offset, bool bf16) {
  if (offset + 2 > block->smem_bytes) {
    report("wgmma reads shared offset %u, outside the %zu bytes of dynamic shared memory", offset, block->smem_bytes);
    return NAN;
  }
  uint16_t bits;
  std::memcpy(&bits, block->shared() + offset, 2);
  return half_bits(bits, bf16);
}

// d (this thread's n/2 accumulators of the 64×n result) += A·B, as wgmma m64nNk16 defines it.
inline void retire(std::vector<WgmmaOp>& group) {
  const int lane = static_cast<int>(thread_idx.x % 32), warp_in_group = static_cast<int>((thread_idx.x / 32) % 4);
  for (WgmmaOp& op : group) {
    const Descriptor A = decode(op.desc_a), B = decode(op.desc_b);
    float a[2][16];
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k)
        a[h][k] = smem_element(operand_offset(A, op.trans_a, 16 * warp_in_group + lane / 4 + 8 * h, k), op.bf16);
    for (int j = 0; j < op.n / 8; ++j)
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * j + 2 * (lane % 4) + e % 2;
        float sum = 0.0f;
        for (int k = 0; k < 16; ++k) sum += a[e / 2][k] * smem_element(operand_offset(B, op.trans_b, col, k), op.bf16);
        op.d[4 * j + e] = (op.accumulate ? op.d[4 * j + e] : 0.0f) + sum;
      }
    if (!op.chunks.empty()) {
      std::lock_guard<std::mutex> lock(block->chunks_mutex);
      for (int c : op.chunks) --block->chunks[c].wgmma_pending;
    }
  }
}

}  // namespace emu

namespace lora_kernels {
namespace dev {

// Issued now, computed at the wait that retires its group. The first thread of each warpgroup
// checks what the instruction reads: every chunk's copy landed, was fenced (fence.proxy.async) and
// a barrier passed since; until the retiring wait, a cp.async into those chunks is reported.
template <typename T, int N, bool TRANS_A, bool TRANS_B>
inline void wgmma_m64nNk16(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  emu::WgmmaOp op{d, desc_a, desc_b, N, TRANS_A, TRANS_B, std::is_same<T, __nv_bfloat16>::value, accumulate != 0, {}};
  if (emu::thread_idx.x % 128 == 0) {
    if ((emu::thread_idx.x / 128 + 1) * 128 > emu::block_dim.x)
      emu::report("wgmma by thread %u of a block of %u threads: its warpgroup is not whole", emu::thread_idx.x,
                  emu::block_dim.x);
    const emu::Descriptor A = emu::decode(desc_a), B = emu::decode(desc_b);
    for (int i = 0; i < (N > 64 ? N : 64); ++i)
      for (int k = 0; k < 16; k += 8) {  // 8 k of one row: one 16-byte chunk in either layout's K-major rows
        if (i < 64) op.chunks.push_back(static_cast<int>(emu::operand_offset(A, TRANS_A, i, k) / 16));
        if (i < N) op.chunks.push_back(static_cast<int>(emu::operand_offset(B, TRANS_B, i, k) / 16));
      }
    if (TRANS_A || TRANS_B)  // MN-major: every k row is its own chunk
      for (int i = 0; i < (N > 64 ? N : 64); i += 8)
        for (int k = 0; k < 16; ++k) {
          if (TRANS_A && i < 64) op.chunks.push_back(static_cast<int>(emu::operand_offset(A, true, i, k) / 16));
          if (TRANS_B && i < N) op.chunks.push_back(static_cast<int>(emu::operand_offset(B, true, i, k) / 16));
        }
    std::sort(op.chunks.begin(), op.chunks.end());
    op.chunks.erase(std::unique(op.chunks.begin(), op.chunks.end()), op.chunks.end());
    std::lock_guard<std::mutex> lock(emu::block->chunks_mutex);
    for (int chunk : op.chunks) {
      if (chunk < 0 || chunk >= static_cast<int>(emu::block->chunks.size())) continue;  // reported at retire
      emu::Chunk& c = emu::block->chunks[chunk];
      if (c.writer == emu::kTmaWriter && c.landed == emu::kInFlight)
        emu::report("wgmma reads shared offset %d before the bulk tensor copy into it completed (missing mbarrier wait)",
                    chunk * 16);
      else if (c.writer >= 0 && c.landed >= emu::epoch)
        emu::report("wgmma reads shared offset %d %s (missing cp.async wait or __syncthreads)", chunk * 16,
                    c.landed == emu::kInFlight ? "while a cp.async into it is in flight"
                                               : "written by a cp.async that landed in this barrier interval");
      else if (c.writer >= 0 && !(c.fenced >= c.landed && c.fenced < emu::epoch))
        emu::report("wgmma reads shared offset %d written by cp.async without fence.proxy.async before a barrier",
                    chunk * 16);
      ++c.wgmma_pending;
    }
  }
  emu::wgmmas.open.push_back(std::move(op));
}
inline void wgmma_commit() { emu::wgmmas.commit(); }
template <int pending>
inline void wgmma_wait() {
  emu::wgmmas.wait(pending, emu::retire);
}
inline bool supports_wgmma() { return true; }

// Checks what the driver's cuTensorMapEncodeTiled would (for the 128-byte swizzle), then keeps the
// arguments in the map.
inline bool encode_tensor_map_2d(CUtensorMap* map, bool, const void* base, uint64_t inner, uint64_t outer,
                                 uint64_t row_bytes, uint32_t box_inner, uint32_t box_outer) {
  static_assert(sizeof(emu::TensorMap) <= sizeof(CUtensorMap), "the emulated map must fit");
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || row_bytes % 16 != 0 || row_bytes >= (uint64_t(1) << 40) ||
      inner < 1 || outer < 1 || inner > (uint64_t(1) << 32) || outer > (uint64_t(1) << 32) || box_inner < 1 ||
      box_outer < 1 || box_inner > 256 || box_outer > 256 || box_inner * 2 > 128) {
    emu::report("cuTensorMapEncodeTiled would refuse base %p, dims %llu×%llu, row bytes %llu, box %u×%u", base,
                static_cast<unsigned long long>(inner), static_cast<unsigned long long>(outer),
                static_cast<unsigned long long>(row_bytes), box_inner, box_outer);
    return false;
  }
  const emu::TensorMap m{static_cast<const unsigned char*>(base), inner, outer, row_bytes, box_inner, box_outer};
  std::memset(map, 0, sizeof *map);
  std::memcpy(map, &m, sizeof m);
  return true;
}

inline emu::Mbarrier& mbarrier_at(const uint64_t* bar) {  // (under chunks_mutex)
  return emu::block->mbarriers[smem_address(bar)];
}
inline void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  std::lock_guard<std::mutex> lock(emu::block->chunks_mutex);
  emu::Mbarrier& b = mbarrier_at(bar);
  b = emu::Mbarrier{};
  b.arrivals = b.arrivals_left = static_cast<int>(arrivals);
  ++emu::block->progress;
}
// One arrival on the current phase, announcing `bytes` of copies (mbarrier_arrive: none).
inline void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  std::lock_guard<std::mutex> lock(emu::block->chunks_mutex);
  emu::Mbarrier& b = mbarrier_at(bar);
  if (b.arrivals == 0) emu::report("mbarrier at shared offset %u used before mbarrier_init", smem_address(bar));
  if (b.arrivals_left == 0) emu::report("mbarrier at shared offset %u: more arrivals than its count", smem_address(bar));
  b.tx += bytes;
  --b.arrivals_left;
  ++emu::block->progress;
}
inline void mbarrier_arrive(uint64_t* bar) { mbarrier_arrive_expect_tx(bar, 0); }
// Issued now, landed by the first wait on its barrier's phase (see Mbarrier). A copy into a chunk
// that a wgmma has not been waited for is reported, as for cp.async.
inline void tma_load_2d(void* dst, const CUtensorMap* map, int32_t inner, int32_t outer, uint64_t* bar) {
  emu::TensorMap m;
  std::memcpy(&m, map, sizeof m);
  const uint32_t at = smem_address(dst), bytes = m.box_bytes();
  if (at % 128 != 0 || at + bytes > emu::block->smem_bytes) {
    emu::report("bulk tensor copy of %u bytes to shared offset %u (not 128-byte aligned or past the end)", bytes, at);
    return;
  }
  std::lock_guard<std::mutex> lock(emu::block->chunks_mutex);
  for (uint32_t c = at / 16; c < (at + bytes) / 16; ++c) {
    emu::Chunk& chunk = emu::block->chunks[c];
    if (chunk.wgmma_pending > 0)
      emu::report("bulk tensor copy overwrites shared offset %u that a wgmma still reads (missing wgmma.wait_group)",
                  c * 16);
    if (chunk.read_epoch == emu::epoch && chunk.readers != 0)
      emu::report("bulk tensor copy overwrites shared offset %u read in the same barrier interval", c * 16);
    chunk.writer = emu::kTmaWriter;
    chunk.landed = emu::kInFlight;
  }
  mbarrier_at(bar).copies.push_back({at, m, inner, outer});
  ++emu::block->progress;
}
// A phase completes once every arrival has come and copies of at least the expected bytes have been
// started (they land now). Until then the other threads run (a producer may still be arriving or
// starting copies); if none of them can, the wait reports the deadlock and returns, and so do the
// block's later waits, at once.
inline void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(emu::block->chunks_mutex);
      emu::Mbarrier& b = mbarrier_at(bar);
      if (b.phase != parity) {  // that phase has completed
        ++emu::block->progress;
        return;
      }
      int64_t started = 0;
      for (const emu::BoxCopy& c : b.copies) started += c.map.box_bytes();
      if (b.arrivals_left == 0 && started >= b.tx) {  // the copies land now, and the phase completes
        unsigned char* smem = emu::block->shared();
        for (const emu::BoxCopy& c : b.copies) {
          for (uint32_t r = 0; r < c.map.box_outer; ++r)
            for (uint32_t e = 0; e < c.map.box_inner; ++e) {
              const int64_t gi = int64_t(c.outer) + r, ge = int64_t(c.inner) + e;
              uint16_t v = 0;  // zeros outside the tensor
              if (gi >= 0 && ge >= 0 && uint64_t(gi) < c.map.outer && uint64_t(ge) < c.map.inner)
                std::memcpy(&v, c.map.base + gi * c.map.row_bytes + ge * 2, 2);
              const uint32_t a = c.dst + (r * c.map.box_inner + e) * 2;
              std::memcpy(smem + (a ^ (((a >> 7) & 7) << 4)), &v, 2);  // the 128-byte swizzle, on the address
            }
          const uint32_t bytes = c.map.box_bytes();
          for (uint32_t k = c.dst / 16; k < (c.dst + bytes) / 16; ++k)
            emu::block->chunks[k].landed = emu::block->chunks[k].fenced = emu::epoch;
        }
        b.copies.clear();
        if (started != b.tx)
          emu::report("mbarrier phase completes with expect_tx off by %lld bytes from what was copied",
                      static_cast<long long>(b.tx - started));
        b.tx = 0;
        b.phase ^= 1;
        b.arrivals_left = b.arrivals;
        ++emu::block->progress;
        return;
      }
      if (emu::block->hung) {
        emu::report("mbarrier wait at shared offset %u never completes (%d arrivals and %lld bytes of copies missing)",
                    smem_address(bar), b.arrivals_left, static_cast<long long>(b.tx - started));
        return;
      }
    }
    emu::yield_fiber();
  }
}

// Launches run in order, so the prior grid has always finished.
inline void wait_for_prior_grid() {}
inline void allow_dependents_early() {}
template <typename... Params, typename... Args>
inline cudaError_t launch_overlapping_prior(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                                            cudaStream_t, Args... args) {
  emu::launch(kernel, grid, block, smem_bytes, args...);
  return cudaSuccess;
}

template <typename Kernel>
inline cudaError_t allow_dynamic_smem(Kernel kernel, int bytes) {
  if (bytes > 227 * 1024) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(emu::attributes_mutex);
  emu::max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = bytes > 48 * 1024 ? bytes : 48 * 1024;
  return cudaSuccess;
}
inline cudaError_t last_launch_error() { return cudaSuccess; }
// A small GPU, so that the split-K paths run on the test's small shapes (LORA_EMULATED_SMS: another).
inline int sm_count() {
  const char* env = std::getenv("LORA_EMULATED_SMS");
  return env != nullptr && std::atoi(env) > 0 ? std::atoi(env) : 8;
}
inline bool supports_overlapping_launch() { return true; }  // so launch_overlapping_prior runs too

}  // namespace dev
}  // namespace lora_kernels
