// Kernels with one known fault each, for tests/test_cuda_emulation.py to check that the emulator's
// checks (emulator.h) find what they claim to: a check that never fires would pass every kernel.
// Each case has a correct twin that must report nothing.
#include "emulator.h"

using namespace lora_kernels::dev;

namespace {

// Warp 0 copies 32 chunks of 16 bytes into shared memory, then reads them with ldmatrix;
// `wait` false: without retiring the copies first (the read sees them in flight).
void copy_then_read(const unsigned char* src, bool wait) {
  LORA_DYNAMIC_SMEM(smem);
  const int t = static_cast<int>(threadIdx.x);
  if (t < 32) cp_async_16(smem + 16 * t, src + 16 * t, 16);
  cp_async_commit();
  if (wait) cp_async_wait<0>();
  __syncthreads();
  if (t < 32) {
    uint32_t r[4];
    ldmatrix_x4(r, smem + 16 * t);
  }
}

// `skip` true: thread 0 leaves without reaching the barrier the others wait at.
void barrier_all_but_one(bool skip) {
  if (skip && threadIdx.x == 0) return;
  __syncthreads();
}

// An mbarrier that expects two arrivals; `arrivals` of them come before everyone waits.
void mbarrier_arrivals(int arrivals) {
  LORA_DYNAMIC_SMEM(smem);
  auto* bar = reinterpret_cast<uint64_t*>(smem);
  if (threadIdx.x == 0) mbarrier_init(bar, 2);
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < arrivals) mbarrier_arrive(bar);
  mbarrier_wait(bar, 0);
}

// Every block writes its own index at out[block], after a barrier: the blocks of a grid, run on
// several OS threads, each still see their own blockIdx.
void block_index(int* out) {
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<int>(blockIdx.x);
}

}  // namespace

extern "C" {

// Runs fault `which` (0 copy read in flight, 1 barrier missed by one thread, 2 mbarrier one arrival
// short), or with `faulty` false its correct twin, on one block of 64 threads.
void run_faulty_kernel(int which, bool faulty) {
  static unsigned char src[512] __attribute__((aligned(16)));
  switch (which) {
    case 0:
      emu::launch(copy_then_read, dim3(1), dim3(64), 512, static_cast<const unsigned char*>(src), !faulty);
      break;
    case 1:
      emu::launch(barrier_all_but_one, dim3(1), dim3(64), 0, faulty);
      break;
    case 2:
      emu::launch(mbarrier_arrivals, dim3(1), dim3(64), 16, faulty ? 1 : 2);
      break;
  }
}

// A grid of `blocks` blocks writing their index into out.
void run_block_index(int* out, int blocks) { emu::launch(block_index, dim3(blocks), dim3(64), 0, out); }
}
