// Attention over many queries at once (prefill) in bf16: softmax(q k^T * scale) v with VDPBF16PS.
//
// sdpa's CPU flash kernel reaches ~55 GFLOP/s here at a 512-token prompt (10% of a bf16 prefill). This one packs
// each key/value head once into VDPBF16PS pair layouts and runs 4 query rows x 64 keys (q k^T) and 4 query rows x 64
// head dims (p v) per register tile, as a GEMM micro-kernel does: 2.4-4.1x sdpa from 65 to 4096 tokens (head sizes
// 64 and 128, 2 threads). The arithmetic is sdpa's: scores accumulated and
// softmaxed in fp32, probabilities rounded to bf16 for the product with v, accumulated in fp32, one rounding at
// the end. Softmax runs over a query's whole row of scores (two passes, not online). Built with the other kernels
// by cpu.py; without AVX512_BF16 it is not compiled and the Python side keeps sdpa.
// Shapes: B batch, nh query heads, nkv key/value heads, S queries, T keys, D head size (a multiple of 32).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "simd.h"

namespace {

#ifdef __AVX512BF16__
using bf16 = c10::BFloat16;
using mixtral_simd::exp16;
using mixtral_simd::first;
constexpr int kRowsPerTile = 4;     // query rows per register tile
constexpr int kKeyBlocks = 4;       // 16-key blocks per q k^T tile: 4 x 4 accumulators
constexpr int64_t kQueryBlock = 32;  // query rows per task: its keys and values stay in L2 across the rows

// Keys of one head in blocks of 16 keys: kp[block][pair][key][2] = k[16 block + key][2 pair + {0, 1}] (zeros past
// T), so that one 64-byte load holds a dim pair of 16 keys, the operand VDPBF16PS multiplies with a query's pair.
void pack_keys(const bf16* k, int64_t stride, int64_t T, int64_t D, bf16* kp) {
  const int64_t P = D / 2, blocks = (T + 15) / 16;
  auto* out = reinterpret_cast<int32_t*>(kp);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t t = 16 * b + i;
      const auto* row = reinterpret_cast<const int32_t*>(k + t * stride);
      for (int64_t p = 0; p < P; ++p) out[(b * P + p) * 16 + i] = t < T ? row[p] : 0;
    }
}

// Values of one head by key pairs: vp[pair][d][2] = v[2 pair + {0, 1}][d] (zeros past T): one 64-byte load holds
// 16 dims of two keys, multiplied with the two keys' probabilities of a query.
void pack_values(const bf16* v, int64_t stride, int64_t T, int64_t D, bf16* vp) {
  for (int64_t t = 0; t < (T + 1) / 2 * 2; ++t)
    for (int64_t d = 0; d < D; ++d) vp[((t / 2) * D + d) * 2 + t % 2] = t < T ? v[t * stride + d] : bf16(0.0f);
}

inline __m512bh pair(const bf16* p) { return (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(p)); }

// s[r][16 (kb + j) + i] = scale * q[r] . key (16 (kb + j) + i) for r < 4, j < NB, i < 16.
template <int NB>
inline void qk_tile(const bf16* q, int64_t D, const bf16* kp, int64_t kb, float scale, float* s, int64_t lds) {
  const int64_t P = D / 2;
  __m512 acc[kRowsPerTile][NB];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512bh keys[NB];
    for (int j = 0; j < NB; ++j) keys[j] = (__m512bh)_mm512_loadu_si512(kp + ((kb + j) * P + p) * 32);
    for (int r = 0; r < kRowsPerTile; ++r) {
      const __m512bh qr = pair(q + r * D + 2 * p);
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], qr, keys[j]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < kRowsPerTile; ++r)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(s + r * lds + 16 * (kb + j), _mm512_mul_ps(acc[r][j], sc));
}

// out[r][d0 + 16 j + i] = sum over keys of p[r][key] v[key][d0 + 16 j + i] / total[r], for r < 4, j < NV.
template <int NV>
inline void pv_tile(const bf16* p, int64_t ldp, int64_t pairs, const bf16* vp, int64_t D, int64_t d0,
                    const float* inv_total, bf16* const* out) {
  __m512 acc[kRowsPerTile][NV];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t t = 0; t < pairs; ++t) {
    __m512bh vals[NV];
    for (int j = 0; j < NV; ++j) vals[j] = (__m512bh)_mm512_loadu_si512(vp + (t * D + d0 + 16 * j) * 2);
    for (int r = 0; r < kRowsPerTile; ++r) {
      const __m512bh pr = pair(p + r * ldp + 2 * t);
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], pr, vals[j]);
    }
  }
  for (int r = 0; r < kRowsPerTile; ++r) {
    if (!out[r]) continue;
    const __m512 inv = _mm512_set1_ps(inv_total[r]);
    for (int j = 0; j < NV; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r] + d0 + 16 * j),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][j], inv)));
  }
}

// One row of scores s[0, L) -> probabilities in bf16 p[0, L), zeros in p[L, padded); returns 1 / their sum (0 if
// the row sees nothing). `mask` (may be null) hides key t where !mask[t * mstride].
float softmax_row(float* s, int64_t L, int64_t padded, const bool* mask, int64_t mstride, bf16* p) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (mask)
    for (int64_t t = 0; t < L; ++t)
      if (!mask[t * mstride]) s[t] = neg_inf;
  __m512 best = _mm512_set1_ps(neg_inf);
  for (int64_t t = 0; t < L; t += 16) best = _mm512_max_ps(best, _mm512_mask_loadu_ps(best, first(L - t), s + t));
  const float mx = _mm512_reduce_max_ps(best);
  if (mx == neg_inf) {
    std::memset(static_cast<void*>(p), 0, padded * sizeof(bf16));
    return 0.0f;
  }
  const __m512 m = _mm512_set1_ps(mx);
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; t += 16) {
    const __mmask16 k = first(L - t);
    const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), m)));
    total = _mm512_add_ps(total, e);
    _mm256_mask_storeu_epi16(p + t, k, (__m256i)_mm512_cvtneps_pbh(e));
  }
  for (int64_t t = L; t < padded; ++t) p[t] = bf16(0.0f);
  return 1.0f / _mm512_reduce_add_ps(total);
}

at::Tensor prefill_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask, double scale, bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "prefill_attend needs q (B, nh, S, D) and k, v (B, nkv, T, D) with nh a multiple of nkv");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16, "prefill_attend needs q, k, v in bfloat16");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && q.size(3) % 32 == 0,
              "prefill_attend needs unit stride on the head dim and a head size that is a multiple of 32");
  const int64_t B = q.size(0), nh = q.size(1), S = q.size(2), D = q.size(3), nkv = k.size(1), T = k.size(2);
  TORCH_CHECK(!causal || T >= S, "prefill_attend: causal attention needs at least as many keys as queries");
  const int64_t rep = nh / nkv, P = D / 2, blocks = (T + 15) / 16, pairs = (T + 1) / 2;
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

  // Pack every key/value head once: (B nkv, blocks * P * 32) and (B nkv, pairs * D * 2).
  const int64_t kp_size = blocks * P * 32, vp_size = pairs * D * 2;
  std::vector<bf16> kp(B * nkv * kp_size), vp(B * nkv * vp_size);
  const bf16* kd = k.data_ptr<at::BFloat16>();
  const bf16* vd = v.data_ptr<at::BFloat16>();
  at::parallel_for(0, B * nkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / nkv, h = i % nkv;
      pack_keys(kd + b * k.stride(0) + h * k.stride(1), k.stride(2), T, D, kp.data() + i * kp_size);
      pack_values(vd + b * v.stride(0) + h * v.stride(1), v.stride(2), T, D, vp.data() + i * vp_size);
    }
  });

  const bf16* qd = q.data_ptr<at::BFloat16>();
  bf16* od = out.data_ptr<at::BFloat16>();
  const int64_t qblocks = (S + kQueryBlock - 1) / kQueryBlock, lds = blocks * 16, ldp = pairs * 2;
  const float fscale = float(scale);
  at::parallel_for(0, B * nh * qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(kRowsPerTile * lds);
    std::vector<bf16> p(kRowsPerTile * ldp), qt(kRowsPerTile * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (nh * qblocks), h = task / qblocks % nh, s0 = task % qblocks * kQueryBlock;
      const int64_t kv = b * nkv + h / rep;
      const bf16* kph = kp.data() + kv * kp_size;
      const bf16* vph = vp.data() + kv * vp_size;
      for (int64_t r0 = s0; r0 < std::min(S, s0 + kQueryBlock); r0 += kRowsPerTile) {
        const int64_t rows = std::min<int64_t>(kRowsPerTile, S - r0);
        int64_t len[kRowsPerTile];
        bf16* orow[kRowsPerTile];
        for (int r = 0; r < kRowsPerTile; ++r) {
          const bool real = r < rows;
          len[r] = !real ? 1 : causal ? std::min(T, r0 + r + T - S + 1) : T;  // causal: query s sits at slot s + T - S
          orow[r] = real ? od + b * out.stride(0) + h * out.stride(1) + (r0 + r) * out.stride(2) : nullptr;
          const bf16* src = qd + b * q.stride(0) + h * q.stride(1) + (real ? r0 + r : r0) * q.stride(2);
          std::memcpy(static_cast<void*>(qt.data() + r * D), src, D * sizeof(bf16));
        }
        const int64_t longest = *std::max_element(len, len + kRowsPerTile);
        const int64_t kblocks = (longest + 15) / 16, used_pairs = (longest + 1) / 2;
        int64_t kb = 0;
        for (; kb + kKeyBlocks <= kblocks; kb += kKeyBlocks)
          qk_tile<kKeyBlocks>(qt.data(), D, kph, kb, fscale, s.data(), lds);
        for (; kb < kblocks; ++kb) qk_tile<1>(qt.data(), D, kph, kb, fscale, s.data(), lds);
        float inv_total[kRowsPerTile];
        for (int r = 0; r < kRowsPerTile; ++r) {
          const bool* mrow = mp && r < rows ? mp + b * ms[0] + (r0 + r) * ms[2] : nullptr;
          inv_total[r] = softmax_row(s.data() + r * lds, len[r], 2 * used_pairs, mrow, ms[3], p.data() + r * ldp);
        }
        int64_t d0 = 0;
        for (; d0 + 64 <= D; d0 += 64) pv_tile<4>(p.data(), ldp, used_pairs, vph, D, d0, inv_total, orow);
        if (d0 < D) pv_tile<2>(p.data(), ldp, used_pairs, vph, D, d0, inv_total, orow);
      }
    }
  });
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixtral_kernels, m) {
  m.def("prefill_attend(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal) -> Tensor");
}

#ifdef __AVX512BF16__
TORCH_LIBRARY_IMPL(mixtral_kernels, CPU, m) { m.impl("prefill_attend", &prefill_attend); }
#endif
