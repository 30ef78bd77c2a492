// The experts' SiLU-gated MLPs over tokens sorted by expert (prefill, long batches), one expert per thread.
//
// torch's GEMMs split each matrix product between the threads, which scales poorly at an expert's shapes (about
// 128 tokens x 7168 x 1024 for the bench model: 1.4x from 2 threads, fp32). Here each thread takes whole experts,
// largest first, and runs their products single-threaded (ATen ops inside a parallel region do), with the same
// products as the Python loop in moe.py, at up to 1.3x its speed. Between them, silu(gate) * up is one pass in
// fp32 (rounded once in bf16, where torch's two ops round twice), and each output row is scaled by its routing
// weight in place, while still in cache. Built with the other kernels by cpu.py, at every ISA level (vec.h).
// Shapes: N routed (token, expert) rows sorted by expert, H hidden, I intermediate, E experts.
#include "vec.h"

#include <algorithm>
#include <atomic>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

#ifndef MIXTRAL_NO_ATEN
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>
#endif

namespace mixtral_experts {

namespace simd = mixtral_simd;
using simd::W;

// h (n, I) = silu(g) * u for gu (n, 2I) = [g, u], in fp32: silu(g) = g / (1 + e^-g), as torch computes it.
template <class T>
void silu_mul(const T* gu, int64_t n, int64_t I, T* h) {
  const simd::V one = simd::set1(1.0f);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < I; i += W) {
      const simd::V g = simd::loadn(gu + r * 2 * I + i, I - i), u = simd::loadn(gu + r * 2 * I + I + i, I - i);
      const simd::V e = simd::exp(simd::sub(simd::zero(), g));  // e^-g
      const simd::V silu = simd::div(g, simd::add(one, e));
      simd::storen(h + r * I + i, simd::mul(silu, u), I - i);
    }
}

// y[r] *= w[r] for r < n, y (n, H), in fp32 (rounded once in bf16): torch's y * w[:, None] with w float32.
template <class T>
void scale_rows(T* y, int64_t n, int64_t H, const float* w) {
  for (int64_t r = 0; r < n; ++r) {
    const simd::V wr = simd::set1(w[r]);
    for (int64_t i = 0; i < H; i += W) simd::storen(y + r * H + i, simd::mul(simd::loadn(y + r * H + i, H - i), wr), H - i);
  }
}

#ifndef MIXTRAL_NO_ATEN
// fp32 gate_up products run in blocks of this many weight rows (output columns): MKL's single-threaded sgemm runs
// 10-17% faster over a 4 MB block of weights than over a whole expert's 29 MB (n x 7168 x 1024, n = 64-256), the
// same arithmetic per output; expert_mlp 1.12x in fp32 (bench model, 512 tokens). bf16 gains nothing.
constexpr int64_t FP32_COLUMN_BLOCK = 1024;

// One expert's n rows: ye (n, H) = down_e @ (silu(g) * u) with [g, u] = gate_up_e @ x_e, each row times w[r] if w.
template <class T>
void run_expert(const at::Tensor& x_e, const at::Tensor& gate_up_e, const at::Tensor& down_e, at::Tensor& ye,
                const float* w) {
  const int64_t n = x_e.size(0), I = down_e.size(1);
  at::Tensor gu = at::empty({n, 2 * I}, x_e.options());  // (n, 2I)
  const int64_t block = std::is_same_v<T, float> ? FP32_COLUMN_BLOCK : 2 * I;
  for (int64_t c = 0; c < 2 * I; c += block) {
    at::Tensor gu_c = gu.narrow(1, c, std::min(block, 2 * I - c));  // rows strided by 2I: sgemm's ldc
    at::mm_out(gu_c, x_e, gate_up_e.narrow(0, c, gu_c.size(1)).t());
  }
  at::Tensor h = at::empty({n, I}, x_e.options());
  using S = std::conditional_t<std::is_same_v<T, float>, float, simd::BFloat16>;  // the same bits
  silu_mul(static_cast<const S*>(gu.data_ptr()), n, I, static_cast<S*>(h.data_ptr()));
  at::mm_out(ye, h, down_e.t());
  if (w) scale_rows(static_cast<S*>(ye.data_ptr()), n, ye.size(1), w);
}

// x (N, H) sorted by expert, counts (E) rows per expert, gate_up (E, 2I, H) = [w1; w3], down (E, H, I), weights
// (N) float32 or None -> (N, H): expert e's rows through down[e] @ (silu(w1[e] x) * w3[e] x), times weights.
at::Tensor expert_mlp(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, at::IntArrayRef counts,
                      const std::optional<at::Tensor>& weights) {
  const int64_t E = gate_up.size(0), I = down.size(2);
  TORCH_CHECK(x.dim() == 2 && gate_up.dim() == 3 && down.dim() == 3 && gate_up.size(1) == 2 * I &&
                  gate_up.size(2) == x.size(1) && down.size(0) == E && down.size(1) == x.size(1),
              "expert_mlp needs x (N, H), gate_up (E, 2I, H), down (E, H, I)");
  TORCH_CHECK(int64_t(counts.size()) == E, "expert_mlp needs one count per expert");
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(counts[e] >= 0, "negative expert count");
    start[e + 1] = start[e] + counts[e];
  }
  TORCH_CHECK(start[E] == x.size(0), "expert counts sum to ", start[E], " but x has ", x.size(0), " rows");
  TORCH_CHECK(x.scalar_type() == gate_up.scalar_type() && x.scalar_type() == down.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "expert_mlp needs x and weights all float32 or all bfloat16");
  TORCH_CHECK(!weights || (weights->scalar_type() == at::kFloat && weights->dim() == 1 &&
                           weights->size(0) == x.size(0) && weights->is_contiguous()),
              "expert_mlp's weights must be a contiguous float32 vector, one per row of x");
  std::vector<int64_t> order(E);  // largest first: the last expert a thread picks up is a small one
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return counts[a] > counts[b]; });
  at::Tensor y = at::empty({x.size(0), down.size(1)}, x.options());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    // Per thread (worker threads do not inherit the caller's modes): below autograd, so that parameters record no
    // graph and inference tensors may be written, as inside any kernel.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i; (i = next++) < E;) {  // each thread takes the next expert when done with its last
      const int64_t e = order[i], n = counts[e];
      if (n == 0) continue;
      at::Tensor ye = y.narrow(0, start[e], n);  // (n, H), contiguous rows of y
      const float* w = weights ? weights->data_ptr<float>() + start[e] : nullptr;
      if (bf16)
        run_expert<at::BFloat16>(x.narrow(0, start[e], n), gate_up[e], down[e], ye, w);
      else
        run_expert<float>(x.narrow(0, start[e], n), gate_up[e], down[e], ye, w);
    }
  });
  return y;
}

#endif

}  // namespace mixtral_experts

#ifndef MIXTRAL_NO_ATEN
TORCH_LIBRARY_FRAGMENT(mixtral_kernels, m) {
  m.def("expert_mlp(Tensor x, Tensor gate_up, Tensor down, int[] counts, Tensor? weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixtral_kernels, CPU, m) { m.impl("expert_mlp", &mixtral_experts::expert_mlp); }
#endif
