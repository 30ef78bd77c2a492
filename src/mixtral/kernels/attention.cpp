// Attention for a few queries over a KV cache (decoding): softmax(q k^T * scale) v per query head, in fp32.
//
// At one query a token, sdpa's CPU kernels spend 100-350 us per call on setup for a few microseconds of work; this
// loop reads each cached key and value row once per query head, skips slots the mask hides (a static cache's slots
// past a query's last visible one are not even looked at) and keeps scores in a small buffer. Built with the other
// kernels by cpu.py, at every ISA level (vec.h).
// Shapes: B batch, nh query heads, nkv key/value heads, S queries, T cached slots, D head size.
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#ifndef MIXTRAL_NO_ATEN
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#endif

namespace mixtral_attention {

namespace simd = mixtral_simd;
using simd::W;

template <class T>
float dot(const float* q, const T* k, int64_t D) {
  simd::V acc = simd::zero();
  for (int64_t d = 0; d < D; d += W) acc = simd::fma(simd::loadn(q + d, D - d), simd::loadn(k + d, D - d), acc);
  return simd::reduce_add(acc);
}

template <class T>
void attend_rows(const simd::Heads<const T>& q_, const simd::Heads<const T>& k_, const simd::Heads<const T>& v_, const bool* mask,
                 const int64_t* mask_stride, bool causal, double scale, const simd::Heads<T>& out) {
  const int64_t B = q_.size[0], nh = q_.size[1], S = q_.size[2], D = q_.size[3], nkv = k_.size[1], T_ = k_.size[2];
  const int64_t rep = nh / nkv;
  const T* qp = q_.data;
  const T* kp = k_.data;
  const T* vp = v_.data;
  T* op = out.data;
  const int64_t *qs = q_.stride, *ks = k_.stride, *vs = v_.stride, *os = out.stride;
  // Each query's slots end after its last visible one: a static cache's mask hides most of its slots (the engine's
  // compiled step attends over all of them), and testing those one by one for every head cost ~35 us a layer and
  // row at 4096 slots. Found once per query row, for all heads; bool rows are scanned 8 bytes at a time.
  std::vector<int64_t> ends(B * S, T_);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      int64_t t = causal ? std::min(T_, s + T_ - S + 1) : T_;  // causal: query s sits at slot s + T - S
      if (mask) {
        const bool* m = mask + b * mask_stride[0] + s * mask_stride[2];
        if (mask_stride[3] == 1) {
          for (uint64_t w = 0; t >= 8; t -= 8) {
            std::memcpy(&w, m + t - 8, 8);
            if (w) break;
          }
        }
        while (t > 0 && !m[(t - 1) * mask_stride[3]]) --t;
      }
      ends[b * S + s] = t;
    }
  // A thread's share is at least ~64K multiply-adds: below that, waking the second thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, T_ * D));
  simd::parallel_for(0, B * nh * S, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(T_), qf(D), acc(D + W);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (nh * S), h = (i / S) % nh, s = i % S, kh = h / rep;
      const T* qrow = qp + b * qs[0] + h * qs[1] + s * qs[2];
      for (int64_t d = 0; d < D; ++d) qf[d] = float(qrow[d]);
      const T* krows = kp + b * ks[0] + kh * ks[1];
      const T* vrows = vp + b * vs[0] + kh * vs[1];
      const bool* mrow = mask ? mask + b * mask_stride[0] + s * mask_stride[2] : nullptr;
      const int64_t last = ends[b * S + s];
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
        const simd::V pv = simd::set1(p);
        for (int64_t d = 0; d < D; d += W)
          simd::store(acc.data() + d, simd::fma(pv, simd::loadn(vrow + d, D - d), simd::load(acc.data() + d)));
      }
      for (int64_t d = 0; d < D; ++d) orow[d] = T(acc[d] / total);
    }
  });
}

#ifndef MIXTRAL_NO_ATEN
using simd::heads;

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
    attend_rows<float>(heads<const float>(q), heads<const float>(k), heads<const float>(v), mp, mstride, causal, scale,
                       heads<float>(out));
  else
    attend_rows<simd::BFloat16>(heads<const simd::BFloat16>(q), heads<const simd::BFloat16>(k),
                                heads<const simd::BFloat16>(v), mp, mstride, causal, scale, heads<simd::BFloat16>(out));
  return out;
}
#endif

}  // namespace mixtral_attention

#ifndef MIXTRAL_NO_ATEN

TORCH_LIBRARY_FRAGMENT(mixtral_kernels, m) {
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixtral_kernels, CPU, m) { m.impl("attend", &mixtral_attention::attend); }
#endif
