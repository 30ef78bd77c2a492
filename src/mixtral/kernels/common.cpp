// The ops every ISA level defines the same way, built with the other kernels by cpu.py: stream_sum (a plain read loop
// with the kernels' prefetching: the benchmarks' measure of the memory's read bandwidth) and has_bf16_dot.
#include "vec.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

namespace mixtral_common {

namespace simd = mixtral_simd;

// The sum of an fp32 tensor, streamed as the weights are (prefetched into L2 8 KiB ahead).
double stream_sum(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() % 64 == 0,
              "stream_sum takes a contiguous float32 tensor of 64k elements");
  const float* p = t.data_ptr<float>();
  std::vector<double> partial(simd::num_threads(), 0.0);
  simd::parallel_for(0, t.numel() / 64, 1 << 12, [&](int64_t begin, int64_t end) {
    simd::V acc[4] = {simd::zero(), simd::zero(), simd::zero(), simd::zero()};
    for (int64_t i = begin; i < end; ++i) {
      simd::prefetch(p + 64 * i + 2048);
      for (int j = 0; j < 64 / simd::W; ++j) acc[j % 4] = simd::add(acc[j % 4], simd::load(p + 64 * i + simd::W * j));
    }
    partial[simd::thread_num()] +=
        simd::reduce_add(simd::add(simd::add(acc[0], acc[1]), simd::add(acc[2], acc[3])));
  });
  double sum = 0;
  for (double s : partial) sum += s;
  return sum;
}

// Whether bf16 products run on VDPBF16PS (the avx512_bf16 level): the bf16-only kernels need it.
bool has_bf16_dot() {
#ifdef __AVX512BF16__
  return true;
#else
  return false;
#endif
}

}  // namespace mixtral_common

TORCH_LIBRARY_FRAGMENT(mixtral_kernels, m) {
  m.def("has_bf16_dot() -> bool", &mixtral_common::has_bf16_dot);
  m.def("stream_sum(Tensor t) -> float", &mixtral_common::stream_sum);
}
