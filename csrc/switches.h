// The CUDA backend's run-time switches, read here and nowhere else (lora_kernels/_env.py lists every
// switch of the package, with its default). Read per call, so one process can compare both settings.
#pragma once
#include <cstdlib>
#include <cstring>

namespace lora_kernels::switches {

inline bool is(const char* name, const char* value) {
  const char* env = std::getenv(name);
  return env != nullptr && std::strcmp(env, value) == 0;
}

// LORA_KERNELS_WGMMA=1: the sm_90a wgmma GEMM takes the large products where it can run.
inline bool wgmma_requested() { return is("LORA_KERNELS_WGMMA", "1"); }

// LORA_KERNELS_WGMMA_LOADS: how the wgmma kernel fills its stages ("producer", the default; "tma"; "cp.async").
inline bool wgmma_loads_are(const char* mode) { return is("LORA_KERNELS_WGMMA_LOADS", mode); }

// LORA_KERNELS_PDL=0: the forward's y kernel does not overlap the xa kernel before it.
inline bool pdl_allowed() { return !is("LORA_KERNELS_PDL", "0"); }

}  // namespace lora_kernels::switches
