// Attention over many queries at once (prefill): softmax(q k^T * scale) v in fp32 (FMA) or bf16 (VDPBF16PS).
//
// sdpa's CPU flash kernel reaches ~55 GFLOP/s here at a 512-token prompt (10% of a bf16 prefill, 5% of an fp32
// one). This one packs each key/value head once into layouts where one vector load holds W keys' (or W dims')
// operands (W = 16 with AVX-512, 8 with AVX2, 4 with NEON: vec.h), and runs 4 query rows x 4 W keys (q k^T) and
// 4 query rows x 4 W head dims (p v) per register tile (2 W with AVX2's 16 registers), as a GEMM micro-kernel
// does: with AVX-512, 1.3-2.1x sdpa in fp32, 2.2-4.0x in bf16, from 65 to 4096 tokens (head sizes 64 and 128,
// 2 threads: benchmarks/attention_micro.py). The arithmetic is sdpa's: scores accumulated and softmaxed in fp32,
// probabilities rounded to the dtype for the product with v (bf16: rounded; fp32: kept), accumulated in fp32, one
// rounding at the end. Softmax runs over a query's whole row of scores (two passes, not online). Built with the
// other kernels by cpu.py; bf16 needs AVX512_BF16 (the Python side keeps sdpa without it).
// Shapes: B batch, nh query heads, nkv key/value heads, S queries, T keys, D head size (a multiple of 32).
#include "vec.h"

#include <algorithm>
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

namespace mixtral_prefill {

namespace simd = mixtral_simd;
using simd::W;  // keys (q k^T) or head dims (p v) in one vector
constexpr int kRowsPerTile = 4;  // query rows per register tile
// W-key blocks per q k^T tile and W-dim vectors per p v tile: 4 x 4 accumulators where there are 32 vector
// registers (AVX-512, NEON), 4 x 2 with AVX2's 16.
constexpr int kBlocks = W == 8 ? 2 : 4;
constexpr int64_t kQueryBlock = 32;  // query rows per task: its keys and values stay in L2 across the rows

// Both dtypes work in 32-bit units: a pair of bf16 (what VDPBF16PS multiplies and adds) or one fp32 (FMA). A unit
// of q, or of probabilities, is broadcast to W lanes and multiplied with W lanes of packed keys or values.
template <class T>
constexpr int64_t kPerUnit = 4 / sizeof(T);  // elements in a unit: 2 bf16, 1 fp32

inline simd::V madd(simd::V acc, simd::V a, simd::V b, float) { return simd::fma(a, b, acc); }
#ifdef __AVX512BF16__
inline simd::V madd(simd::V acc, simd::V a, simd::V b, simd::BFloat16) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
#endif

// Keys of one head in blocks of W keys: kp[block][unit][key] = unit `unit` of key W block + key (zeros past T):
// one vector load holds the same unit of W keys.
void pack_keys(const int32_t* k, int64_t stride_units, int64_t T, int64_t units, int32_t* kp) {
  for (int64_t b = 0; b < (T + W - 1) / W; ++b)
    for (int64_t i = 0; i < W; ++i) {
      const int64_t t = W * b + i;
      for (int64_t u = 0; u < units; ++u) kp[(b * units + u) * W + i] = t < T ? k[t * stride_units + u] : 0;
    }
}

// Values of one head by units of keys: vp[key unit][d][j] = v[kPerUnit key unit + j][d] (zeros past T): one vector
// load holds W dims of a unit of keys, multiplied with that unit of a query's probabilities.
template <class T>
void pack_values(const T* v, int64_t stride, int64_t keys, int64_t D, T* vp) {
  constexpr int64_t n = kPerUnit<T>;
  for (int64_t t = 0; t < (keys + n - 1) / n * n; ++t)
    for (int64_t d = 0; d < D; ++d) vp[((t / n) * D + d) * n + t % n] = t < keys ? v[t * stride + d] : T(0.0f);
}

// s[r][W (kb + j) + i] = scale * q[r] . key (W (kb + j) + i) for r < 4, j < NB, i < W; q rows of `units` units.
template <class T, int NB>
inline void qk_tile(const T* q, int64_t units, const int32_t* kp, int64_t kb, float scale, float* s, int64_t lds) {
  simd::V acc[kRowsPerTile][NB];
  for (auto& row : acc)
    for (auto& a : row) a = simd::zero();
  const int32_t* q32 = reinterpret_cast<const int32_t*>(q);
  for (int64_t u = 0; u < units; ++u) {
    simd::V keys[NB];
    for (int j = 0; j < NB; ++j) keys[j] = simd::load_bits(kp + ((kb + j) * units + u) * W);
    for (int r = 0; r < kRowsPerTile; ++r) {
      const simd::V qr = simd::broadcast_bits(q32 + r * units + u);
      for (int j = 0; j < NB; ++j) acc[r][j] = madd(acc[r][j], qr, keys[j], T());
    }
  }
  const simd::V sc = simd::set1(scale);
  for (int r = 0; r < kRowsPerTile; ++r)
    for (int j = 0; j < NB; ++j) simd::store(s + r * lds + W * (kb + j), simd::mul(acc[r][j], sc));
}

// out[r][d0 + W j + i] = sum over keys of p[r][key] v[key][d0 + W j + i] * inv_total[r], for r < 4, j < NV.
template <class T, int NV>
inline void pv_tile(const T* p, int64_t ldp, int64_t key_units, const T* vp, int64_t D, int64_t d0,
                    const float* inv_total, T* const* out) {
  constexpr int64_t n = kPerUnit<T>;
  simd::V acc[kRowsPerTile][NV];
  for (auto& row : acc)
    for (auto& a : row) a = simd::zero();
  for (int64_t t = 0; t < key_units; ++t) {
    simd::V vals[NV];
    for (int j = 0; j < NV; ++j) vals[j] = simd::load_bits(vp + (t * D + d0 + W * j) * n);
    for (int r = 0; r < kRowsPerTile; ++r) {
      const simd::V pr = simd::broadcast_bits(reinterpret_cast<const int32_t*>(p + r * ldp) + t);
      for (int j = 0; j < NV; ++j) acc[r][j] = madd(acc[r][j], pr, vals[j], T());
    }
  }
  for (int r = 0; r < kRowsPerTile; ++r) {
    if (!out[r]) continue;
    const simd::V inv = simd::set1(inv_total[r]);
    for (int j = 0; j < NV; ++j) simd::storen(out[r] + d0 + W * j, simd::mul(acc[r][j], inv), W);
  }
}

// One row of scores s[0, L) -> probabilities p[0, L) (rounded to T), zeros in p[L, padded); returns 1 / their sum
// (0 if the row sees nothing). `mask` (may be null) hides key t where !mask[t * mstride].
template <class T>
float softmax_row(float* s, int64_t L, int64_t padded, const bool* mask, int64_t mstride, T* p) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (mask)
    for (int64_t t = 0; t < L; ++t)
      if (!mask[t * mstride]) s[t] = neg_inf;
  simd::V best = simd::set1(neg_inf);
  for (int64_t t = 0; t < L; t += W) best = simd::max(best, simd::loadn(s + t, L - t, neg_inf));
  const float mx = simd::reduce_max(best);
  if (mx == neg_inf) {
    std::memset(static_cast<void*>(p), 0, padded * sizeof(T));
    return 0.0f;
  }
  const simd::V m = simd::set1(mx);
  simd::V total = simd::zero();
  for (int64_t t = 0; t < L; t += W) {
    // lanes past L load -inf: e^-inf = 0
    const simd::V e = simd::exp(simd::sub(simd::loadn(s + t, L - t, neg_inf), m));
    total = simd::add(total, e);
    simd::storen(p + t, e, L - t);
  }
  for (int64_t t = L; t < padded; ++t) p[t] = T(0.0f);
  return 1.0f / simd::reduce_add(total);
}

template <class T>
void attend_all(const simd::Heads<const T>& q, const simd::Heads<const T>& k, const simd::Heads<const T>& v,
                const bool* mp, const int64_t* ms, double scale, bool causal, const simd::Heads<T>& out) {
  constexpr int64_t n = kPerUnit<T>;
  const int64_t B = q.size[0], nh = q.size[1], S = q.size[2], D = q.size[3], nkv = k.size[1], T_ = k.size[2];
  const int64_t rep = nh / nkv, units = D / n, blocks = (T_ + W - 1) / W, key_units = (T_ + n - 1) / n;

  // Pack every key/value head once: (B nkv, blocks * W * units) and (B nkv, key_units * D * n).
  const int64_t kp_size = blocks * W * units, vp_size = key_units * D * n;
  std::vector<int32_t> kp(B * nkv * kp_size);
  std::vector<T> vp(B * nkv * vp_size);
  simd::parallel_for(0, B * nkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / nkv, h = i % nkv;
      pack_keys(reinterpret_cast<const int32_t*>(k.data + b * k.stride[0] + h * k.stride[1]), k.stride[2] / n, T_,
                units, kp.data() + i * kp_size);
      pack_values(v.data + b * v.stride[0] + h * v.stride[1], v.stride[2], T_, D, vp.data() + i * vp_size);
    }
  });

  const int64_t qblocks = (S + kQueryBlock - 1) / kQueryBlock, lds = blocks * W, ldp = key_units * n;
  const float fscale = float(scale);
  simd::parallel_for(0, B * nh * qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(kRowsPerTile * lds);
    std::vector<T> p(kRowsPerTile * ldp), qt(kRowsPerTile * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (nh * qblocks), h = task / qblocks % nh, s0 = task % qblocks * kQueryBlock;
      const int64_t kv = b * nkv + h / rep;
      const int32_t* kph = kp.data() + kv * kp_size;
      const T* vph = vp.data() + kv * vp_size;
      for (int64_t r0 = s0; r0 < std::min(S, s0 + kQueryBlock); r0 += kRowsPerTile) {
        const int64_t rows = std::min<int64_t>(kRowsPerTile, S - r0);
        int64_t len[kRowsPerTile];
        T* orow[kRowsPerTile];
        for (int r = 0; r < kRowsPerTile; ++r) {
          const bool real = r < rows;
          len[r] = !real ? 1 : causal ? std::min(T_, r0 + r + T_ - S + 1) : T_;  // causal: query s at slot s + T - S
          orow[r] = real ? out.data + b * out.stride[0] + h * out.stride[1] + (r0 + r) * out.stride[2] : nullptr;
          const T* src = q.data + b * q.stride[0] + h * q.stride[1] + (real ? r0 + r : r0) * q.stride[2];
          std::memcpy(static_cast<void*>(qt.data() + r * D), src, D * sizeof(T));
        }
        const int64_t longest = *std::max_element(len, len + kRowsPerTile);
        const int64_t kblocks = (longest + W - 1) / W, used_units = (longest + n - 1) / n;
        int64_t kb = 0;
        for (; kb + kBlocks <= kblocks; kb += kBlocks)
          qk_tile<T, kBlocks>(qt.data(), units, kph, kb, fscale, s.data(), lds);
        for (; kb < kblocks; ++kb) qk_tile<T, 1>(qt.data(), units, kph, kb, fscale, s.data(), lds);
        float inv_total[kRowsPerTile];
        for (int r = 0; r < kRowsPerTile; ++r) {
          const bool* mrow = mp && r < rows ? mp + b * ms[0] + (r0 + r) * ms[2] : nullptr;
          inv_total[r] = softmax_row(s.data() + r * lds, len[r], n * used_units, mrow, ms[3], p.data() + r * ldp);
        }
        int64_t d0 = 0;  // D is a multiple of 32: 2 W divides it below AVX-512
        for (; d0 + kBlocks * W <= D; d0 += kBlocks * W)
          pv_tile<T, kBlocks>(p.data(), ldp, used_units, vph, D, d0, inv_total, orow);
        for (; d0 < D; d0 += 2 * W) pv_tile<T, 2>(p.data(), ldp, used_units, vph, D, d0, inv_total, orow);
      }
    }
  });
}

#ifndef MIXTRAL_NO_ATEN
at::Tensor prefill_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask, double scale, bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "prefill_attend needs q (B, nh, S, D) and k, v (B, nkv, T, D) with nh a multiple of nkv");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype && (dtype == at::kFloat || dtype == at::kBFloat16),
              "prefill_attend needs q, k, v all float32 or all bfloat16");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && q.size(3) % 32 == 0 &&
                  (dtype == at::kFloat || k.stride(2) % 2 == 0),
              "prefill_attend needs unit stride on the head dim and a head size that is a multiple of 32");
  const int64_t B = q.size(0), nh = q.size(1), S = q.size(2), D = q.size(3), T = k.size(2);
  TORCH_CHECK(!causal || T >= S, "prefill_attend: causal attention needs at least as many keys as queries");
  at::Tensor out = at::empty({B, S, nh, D}, q.options()).transpose(1, 2);
  at::Tensor m;
  int64_t ms[4] = {0, 0, 0, 0};
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4,
                "prefill_attend's mask must be bool (B|1, 1, S, T)");
    m = mask->expand({B, 1, S, T});
    for (int i = 0; i < 4; ++i) ms[i] = m.stride(i);
  }
  const bool* mp = mask ? m.data_ptr<bool>() : nullptr;
  if (dtype == at::kFloat) {
    attend_all<float>(simd::heads<const float>(q), simd::heads<const float>(k), simd::heads<const float>(v), mp, ms,
                      scale, causal, simd::heads<float>(out));
  } else {
#ifdef __AVX512BF16__
    using B16 = simd::BFloat16;
    attend_all<B16>(simd::heads<const B16>(q), simd::heads<const B16>(k), simd::heads<const B16>(v), mp, ms, scale,
                    causal, simd::heads<B16>(out));
#else
    TORCH_CHECK(false, "prefill_attend in bfloat16 needs a CPU with AVX512_BF16");
#endif
  }
  return out;
}
#endif

}  // namespace mixtral_prefill

#ifndef MIXTRAL_NO_ATEN
TORCH_LIBRARY_FRAGMENT(mixtral_kernels, m) {
  m.def("prefill_attend(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixtral_kernels, CPU, m) { m.impl("prefill_attend", &mixtral_prefill::prefill_attend); }
#endif
