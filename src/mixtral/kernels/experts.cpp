// The experts' SiLU-gated MLPs over tokens sorted by expert (prefill, long batches), one expert per thread.
//
// torch's GEMMs split each matrix product between the threads, which scales poorly at an expert's shapes (about
// 128 tokens x 7168 x 1024 for the bench model: 1.4x from 2 threads, fp32). Here each thread takes whole experts,
// largest first, and runs their products single-threaded (ATen ops inside a parallel region do): the same ops as
// the Python loop in moe.py, so the same results, at up to 1.3x its speed. Built with matvec.cpp by cpu.py.
// Shapes: N routed (token, expert) rows sorted by expert, H hidden, I intermediate, E experts.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <vector>

namespace {

// x (N, H) sorted by expert, counts (E) rows per expert, gate_up (E, 2I, H) = [w1; w3], down (E, H, I)
// -> (N, H): expert e's rows through down[e] @ (silu(w1[e] x) * w3[e] x).
at::Tensor expert_mlp(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, at::IntArrayRef counts) {
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
  std::vector<int64_t> order(E);  // largest first: the last expert a thread picks up is a small one
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return counts[a] > counts[b]; });
  at::Tensor y = at::empty({x.size(0), down.size(1)}, x.options());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    // Per thread (worker threads do not inherit the caller's modes): below autograd, so that parameters record no
    // graph and inference tensors may be written, as inside any kernel.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i; (i = next++) < E;) {  // each thread takes the next expert when done with its last
      const int64_t e = order[i], n = counts[e];
      if (n == 0) continue;
      const at::Tensor gu = at::linear(x.narrow(0, start[e], n), gate_up[e]);  // (n, 2I)
      const at::Tensor h = at::silu(gu.narrow(1, 0, I)) * gu.narrow(1, I, I);  // (n, I)
      y.narrow(0, start[e], n).copy_(at::linear(h, down[e]));
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixtral_kernels, m) {
  m.def("expert_mlp(Tensor x, Tensor gate_up, Tensor down, int[] counts) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixtral_kernels, CPU, m) { m.impl("expert_mlp", &expert_mlp); }
