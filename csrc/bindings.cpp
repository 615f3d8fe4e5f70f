// torch binding: the ops torch.ops.lora_kernels.cuda_forward / cuda_backward, registered with TORCH_LIBRARY
// so the dispatcher (and torch.compile) sees them. Each op turns tensors into GemmParams and
// launches the kernels through launch_gemm (csrc/lora_gemm.cu picks decode, tensor-core or SIMT)
// on the current stream; no Python runs per call.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "lora_gemm.h"
#include "switches.h"

namespace {

using lora_kernels::DType;
using lora_kernels::GemmParams;
using lora_kernels::Operand;
using lora_kernels::RowAdapters;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "lora_kernels: CUDA ops take float16, bfloat16 or float32, got ", t.scalar_type());
  }
}

Operand plain(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }
Operand transposed(const at::Tensor& t) { return {t.data_ptr(), t.stride(1), t.stride(0)}; }
constexpr Operand kNone{nullptr, 0, 0};
constexpr RowAdapters kNoAdapters{nullptr, nullptr, 0, 0};

void check(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), "lora_kernels: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "lora_kernels: ", name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "lora_kernels: ", name, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type());
  TORCH_CHECK(t.dim() == dim, "lora_kernels: ", name, " must be ", dim, "-D, got ", t.dim(), "-D");
}

// lora_A / lora_B as the kernels multiply them: in x's dtype. Adapters may also be float32 on a 16-bit x
// (PEFT's default; lora_kernels/precision.py): those are rounded to x's dtype here, once per call
// (r·(K + N) elements), and their gradients are widened back to float32 on return.
at::Tensor adapter_operand(const at::Tensor& t, const char* name, const at::Tensor& like, const at::Tensor& other) {
  TORCH_CHECK(t.is_cuda(), "lora_kernels: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "lora_kernels: ", name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.dim() == 2, "lora_kernels: ", name, " must be 2-D, got ", t.dim(), "-D");
  const bool half = like.scalar_type() == at::kHalf || like.scalar_type() == at::kBFloat16;
  TORCH_CHECK(t.scalar_type() == other.scalar_type() &&
                  (t.scalar_type() == like.scalar_type() || (half && t.scalar_type() == at::kFloat)),
              "lora_kernels: ", name, " has dtype ", t.scalar_type(), " (the other adapter ", other.scalar_type(),
              "); adapters take x's dtype ", like.scalar_type(), ", or float32 on a 16-bit x");
  return t.scalar_type() == like.scalar_type() ? t : t.to(like.scalar_type());
}

// What a product adds to alpha·P·Q, each field set by name where a call uses it (most set none).
struct GemmExtras {
  Operand P2 = kNone, Q2 = kNone;  // + alpha2·P2(M×K2)·Q2(K2×N); K2 = 0: no second product
  int64_t K2 = 0;
  float alpha2 = 0.0f;
  const void* bias = nullptr;          // + bias (N,)
  RowAdapters adapters = kNoAdapters;  // multi-adapter rows: keep ⊙ (...) (lora_gemm.h)
  bool overlap_prior = false;          // GemmParams::overlap_prior
};

// The extras of a second product: + alpha2·P2·Q2.
GemmExtras plus_product(Operand P2, Operand Q2, int64_t K2, float alpha2) {
  GemmExtras e;
  e.P2 = P2;
  e.Q2 = Q2;
  e.K2 = K2;
  e.alpha2 = alpha2;
  return e;
}

// The extras of a multi-adapter product: row m keeps only its adapter's columns, times its scale.
GemmExtras masked_rows(RowAdapters adapters) {
  GemmExtras e;
  e.adapters = adapters;
  return e;
}

// out = alpha·P·Q (+ extras); the inner size K is passed explicitly.
void gemm(at::Tensor& out, Operand P, Operand Q, int64_t K, float alpha, const GemmExtras& extras = {}) {
  GemmParams p{};  // filled field by field; c_transposed stays false (set inside the wgmma path only)
  p.M = out.size(0);
  p.N = out.size(1);
  p.K = K;
  p.K2 = extras.K2;
  p.P = P;
  p.Q = Q;
  p.P2 = extras.P2;
  p.Q2 = extras.Q2;
  p.bias = extras.bias;
  p.C = out.data_ptr();
  p.stride_cm = out.stride(0);
  p.stride_cn = out.stride(1);
  p.alpha = alpha;
  p.alpha2 = extras.alpha2;
  p.workspace = nullptr;  // set below where the product is split along K
  p.adapters = extras.adapters;
  p.overlap_prior = extras.overlap_prior;
  // Split-K scratch from the caching allocator: freed below, reused only after this stream's kernels.
  const int64_t scratch = lora_kernels::workspace_elems(dtype_of(out), p);
  at::Tensor workspace;
  if (scratch > 0) {
    workspace = at::empty({scratch}, out.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr<float>();
  }
  const cudaError_t err = lora_kernels::launch_gemm(dtype_of(out), p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lora_kernels: kernel launch failed: ", cudaGetErrorString(err));
}

// Multi-adapter batches (lora_kernels/multi.py): lora_A (n·rank, K) and lora_B (N, n·rank) stack n
// adapters; row m uses adapter ids[m] (int32, −1: none) with scale scales[id] (float32). The rank-r
// products xa and g keep, per row, only that adapter's columns times its scale (lora_gemm.h).
RowAdapters row_adapters(const std::optional<at::Tensor>& ids, const std::optional<at::Tensor>& scales, int64_t rank,
                         const at::Tensor& like, int64_t M, int64_t R) {
  if (!ids) return kNoAdapters;
  TORCH_CHECK(scales && rank >= 1, "lora_kernels: adapter_ids needs adapter_scales and adapter_rank >= 1");
  TORCH_CHECK(ids->is_cuda() && ids->device() == like.device() && ids->scalar_type() == at::kInt && ids->dim() == 1 &&
                  ids->size(0) == M && ids->is_contiguous(),
              "lora_kernels: adapter_ids must be a contiguous int32 (M,) tensor on ", like.device());
  TORCH_CHECK(scales->is_cuda() && scales->device() == like.device() && scales->scalar_type() == at::kFloat &&
                  scales->dim() == 1 && scales->is_contiguous() && scales->size(0) * rank == R,
              "lora_kernels: adapter_scales must be a contiguous float32 (n,) tensor with n·adapter_rank = r = ", R);
  return {ids->data_ptr<int32_t>(), scales->data_ptr<float>(), scales->size(0), rank};
}

// May y's kernel overlap the xa kernel before it (programmatic dependent launch, where the GPU has
// it)? Yes unless LORA_KERNELS_PDL=0 (csrc/switches.h).
bool overlap_allowed() { return lora_kernels::switches::pdl_allowed(); }

// LoRA dropout (forward and backward below): the seed the kernels draw the mask from, checked; null when p = 0.
const int64_t* dropout_seed(double dropout_p, const std::optional<at::Tensor>& seed, const at::Tensor& like,
                            const char* op) {
  if (dropout_p == 0.0) return nullptr;
  TORCH_CHECK(dropout_p > 0.0 && dropout_p < 1.0, "lora_kernels.", op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  TORCH_CHECK(seed && seed->is_cuda() && seed->device() == like.device() && seed->scalar_type() == at::kLong &&
                  seed->numel() == 1,
              "lora_kernels.", op, ": dropout_p > 0 needs seed, a one-element int64 tensor on ", like.device());
  return seed->data_ptr<int64_t>();
}

// out = keep ⊙ src / (1 − p) (+ out when accumulate), the mask drawn from *seed (lora_dropout.cu).
void dropout(at::Tensor& out, const at::Tensor& src, const int64_t* seed, double p, bool accumulate) {
  lora_kernels::DropoutParams d{};
  d.M = src.size(0);
  d.K = src.size(1);
  d.src = plain(src);
  d.out = out.data_ptr();
  d.stride_out = out.stride(0);
  d.seed = seed;
  d.p = static_cast<float>(p);
  d.keep_scale = static_cast<float>(1.0 / (1.0 - p));
  d.accumulate = accumulate;
  const cudaError_t err = lora_kernels::launch_dropout(dtype_of(out), d, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lora_kernels: kernel launch failed: ", cudaGetErrorString(err));
}

// dropout(x), in a scratch tensor that lives only as long as the op (nothing M×K is kept for backward).
at::Tensor dropped(const at::Tensor& x, const int64_t* seed, double p) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  dropout(out, x, seed, p, false);
  return out;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                           const at::Tensor& lora_B, double scale,
                                           const std::optional<at::Tensor>& x_lora, double dropout_p,
                                           const std::optional<at::Tensor>& seed,
                                           const std::optional<at::Tensor>& adapter_ids,
                                           const std::optional<at::Tensor>& adapter_scales, int64_t adapter_rank) {
  check(x, "x", x, 2);
  check(weight, "weight", x, 2);
  const at::Tensor A = adapter_operand(lora_A, "lora_A", x, lora_B);
  const at::Tensor B = adapter_operand(lora_B, "lora_B", x, lora_A);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(0);
  TORCH_CHECK(weight.size(1) == K && lora_A.size(1) == K && lora_B.size(0) == N && lora_B.size(1) == R,
              "lora_kernels.cuda_forward: inconsistent shapes");
  if (bias) {
    check(*bias, "bias", x, 1);
    TORCH_CHECK(bias->size(0) == N && bias->stride(0) == 1, "lora_kernels.cuda_forward: bias must be contiguous (N,)");
  }
  const int64_t* drop_seed = dropout_seed(dropout_p, seed, x, "cuda_forward");
  TORCH_CHECK(!(x_lora && drop_seed), "lora_kernels.cuda_forward: pass x_lora or dropout_p > 0, not both");
  if (x_lora) {
    check(*x_lora, "x_lora", x, 2);
    TORCH_CHECK(x_lora->sizes() == x.sizes(), "lora_kernels.cuda_forward: x_lora must have x's shape");
  }
  const RowAdapters adapters = row_adapters(adapter_ids, adapter_scales, adapter_rank, x, M, R);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor lora_in = drop_seed ? dropped(x, drop_seed, dropout_p) : x_lora ? *x_lora : x;
  at::Tensor xa = at::empty({M, R}, x.options());
  at::Tensor y = at::empty({M, N}, x.options());
  gemm(xa, plain(lora_in), transposed(A), K, static_cast<float>(scale), masked_rows(adapters));  // xa = s·x·Aᵀ
  GemmExtras lora_term = plus_product(plain(xa), transposed(B), R, 1.0f);  // y = x·W₀ᵀ + xa·Bᵀ + bias
  lora_term.bias = bias ? bias->data_ptr() : nullptr;
  lora_term.overlap_prior = R > 0 && overlap_allowed();  // R = 0: no xa kernel ran
  gemm(y, plain(x), transposed(weight), K, 1.0f, lora_term);
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dy, const at::Tensor& x_lora, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scale, bool fuse_lora_dx, double dropout_p,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& adapter_ids,
    const std::optional<at::Tensor>& adapter_scales, int64_t adapter_rank) {
  check(dy, "dy", dy, 2);
  check(x_lora, "x_lora", dy, 2);
  check(weight, "weight", dy, 2);
  const at::Tensor A = adapter_operand(lora_A, "lora_A", dy, lora_B);
  const at::Tensor B = adapter_operand(lora_B, "lora_B", dy, lora_A);
  check(xa, "xa", dy, 2);
  const int64_t M = dy.size(0), N = dy.size(1), K = weight.size(1), R = lora_A.size(0);
  TORCH_CHECK(weight.size(0) == N && x_lora.size(0) == M && x_lora.size(1) == K && lora_A.size(1) == K &&
                  lora_B.size(0) == N && lora_B.size(1) == R && xa.size(0) == M && xa.size(1) == R,
              "lora_kernels.cuda_backward: inconsistent shapes");
  const RowAdapters adapters = row_adapters(adapter_ids, adapter_scales, adapter_rank, dy, M, R);
  // With dropout, x_lora is x itself: the mask is redrawn from the forward's seed.
  const int64_t* drop_seed = dropout_seed(dropout_p, seed, dy, "cuda_backward");
  const c10::cuda::CUDAGuard guard(dy.device());
  at::Tensor g = at::empty({M, R}, dy.options());
  at::Tensor dx = at::empty({M, K}, dy.options());
  at::Tensor d_lora_A = at::empty({R, K}, dy.options());
  at::Tensor d_lora_B = at::empty({N, R}, dy.options());
  const float s = static_cast<float>(scale);
  gemm(g, plain(dy), plain(B), N, 1.0f, masked_rows(adapters));  // g = dY·B (masked)
  if (fuse_lora_dx && !drop_seed) {
    gemm(dx, plain(dy), plain(weight), N, 1.0f, plus_product(plain(g), plain(A), R, s));  // dX = dY·W₀ + s·g·A
  } else {
    gemm(dx, plain(dy), plain(weight), N, 1.0f);  // dX = dY·W₀ ...
    if (fuse_lora_dx) {                           // ... + keep ⊙ s·g·A / (1 − p)
      at::Tensor lora_dx = at::empty({M, K}, dy.options());
      gemm(lora_dx, plain(g), plain(A), R, s);
      dropout(dx, lora_dx, drop_seed, dropout_p, true);
    }
  }
  const at::Tensor lora_in = drop_seed ? dropped(x_lora, drop_seed, dropout_p) : x_lora;
  gemm(d_lora_A, transposed(g), plain(lora_in), M, s);  // dA = s·gᵀ·dropout(x)
  gemm(d_lora_B, transposed(dy), plain(xa), M, 1.0f);   // dB = dYᵀ·xa
  return {dx, d_lora_A.to(lora_A.scalar_type()), d_lora_B.to(lora_B.scalar_type()), g};
}

}  // namespace

TORCH_LIBRARY(lora_kernels, m) {
  m.def(
      "cuda_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale,"
      " Tensor? x_lora=None, float dropout_p=0.0, Tensor? seed=None, *, Tensor? adapter_ids=None,"
      " Tensor? adapter_scales=None, int adapter_rank=0) -> (Tensor, Tensor)");
  m.def(
      "cuda_backward(Tensor dy, Tensor x_lora, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor xa, float scale,"
      " bool fuse_lora_dx=True, float dropout_p=0.0, Tensor? seed=None, *, Tensor? adapter_ids=None,"
      " Tensor? adapter_scales=None, int adapter_rank=0) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("cuda_forward", &forward);
  m.impl("cuda_backward", &backward);
}

// Importing lora_kernels._C loads this library and so registers the ops above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wgmma_supported", &lora_kernels::wgmma_supported,
        "Whether this build has the sm_90a wgmma kernel and the current GPU runs it (LORA_KERNELS_WGMMA=1 uses it)");
}
