// Attention for a few queries over a KV cache (decoding): softmax(q k^T * scale) v per query head, in fp32.
//
// At one query a token, sdpa's CPU kernels spend 100-350 us per call on setup for a few microseconds of work; this
// loop reads each cached key and value row once per query head, skips slots the mask hides (unwritten static
// cache slots cost nothing but the check) and keeps scores in a small buffer. Built with matvec.cpp by cpu.py.
// Shapes: B batch, nh query heads, nkv key/value heads, S queries, T cached slots, D head size.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "simd.h"

namespace {

using mixtral_simd::load16;

template <class T>
float dot(const float* q, const T* k, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(load16(q + d, D - d), load16(k + d, D - d), acc);
  return _mm512_reduce_add_ps(acc);
}

template <class T>
void attend_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mask,
                 const int64_t* mask_stride, bool causal, double scale, const at::Tensor& out) {
  const int64_t B = q.size(0), nh = q.size(1), S = q.size(2), D = q.size(3), nkv = k.size(1), T_ = k.size(2);
  const int64_t rep = nh / nkv;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), os = out.strides();
  // A thread's share is at least ~64K multiply-adds: below that, waking the second thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, T_ * D));
  at::parallel_for(0, B * nh * S, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(T_), qf(D), acc(D + 16);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (nh * S), h = (i / S) % nh, s = i % S, kh = h / rep;
      const T* qrow = qp + b * qs[0] + h * qs[1] + s * qs[2];
      for (int64_t d = 0; d < D; ++d) qf[d] = float(qrow[d]);
      const T* krows = kp + b * ks[0] + kh * ks[1];
      const T* vrows = vp + b * vs[0] + kh * vs[1];
      const bool* mrow = mask ? mask + b * mask_stride[0] + s * mask_stride[2] : nullptr;
      const int64_t last = causal ? std::min(T_, s + T_ - S + 1) : T_;  // causal: query s sits at slot s + T - S
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < last; ++t) {
        if (mrow && !mrow[t * mask_stride[3]]) {
          scores[t] = -std::numeric_limits<float>::infinity();
          continue;
        }
        scores[t] = dot(qf.data(), krows + t * ks[2], D) * float(scale);
        best = std::max(best, scores[t]);
      }
      T* orow = op + b * os[0] + h * os[1] + s * os[2];
      if (best == -std::numeric_limits<float>::infinity()) {  // nothing visible (a padding query): zeros
        for (int64_t d = 0; d < D; ++d) orow[d] = T(0.0f);
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float total = 0.0f;
      for (int64_t t = 0; t < last; ++t) {
        if (scores[t] == -std::numeric_limits<float>::infinity()) continue;
        const float p = std::exp(scores[t] - best);
        total += p;
        const T* vrow = vrows + t * vs[2];
        const __m512 pv = _mm512_set1_ps(p);
        for (int64_t d = 0; d < D; d += 16)
          _mm512_storeu_ps(acc.data() + d, _mm512_fmadd_ps(pv, load16(vrow + d, D - d), _mm512_loadu_ps(acc.data() + d)));
      }
      for (int64_t d = 0; d < D; ++d) orow[d] = T(acc[d] / total);
    }
  });
}

// q (B, nh, S, D), k and v (B, nkv, T, D) with unit stride on D, mask None or bool broadcastable to (B, 1, S, T)
// (True = may look), causal: query s also sees only slots <= s + T - S. Returns (B, nh, S, D), laid out as
// (B, S, nh, D) so that merging the heads afterwards is a view.
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                  double scale, bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "attend needs q (B, nh, S, D) and k, v (B, nkv, T, D) with nh a multiple of nkv");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attend needs unit stride on the head dim");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "attend needs q, k, v all float32 or all bfloat16");
  const int64_t B = q.size(0), nh = q.size(1), S = q.size(2), D = q.size(3), T_ = k.size(2);
  at::Tensor out = at::empty({B, S, nh, D}, q.options()).transpose(1, 2);
  at::Tensor m;
  int64_t mstride[4] = {0, 0, 0, 0};
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4, "attend's mask must be bool (B|1, 1, S, T)");
    m = mask->expand({B, 1, S, T_});
    for (int i = 0; i < 4; ++i) mstride[i] = m.stride(i);
  }
  const bool* mp = mask ? m.data_ptr<bool>() : nullptr;
  if (q.scalar_type() == at::kFloat)
    attend_rows<float>(q, k, v, mp, mstride, causal, scale, out);
  else
    attend_rows<c10::BFloat16>(q, k, v, mp, mstride, causal, scale, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixtral_kernels, m) {
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixtral_kernels, CPU, m) { m.impl("attend", &attend); }
