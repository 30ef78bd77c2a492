// Attention over many queries at once (prefill): softmax(q k^T * scale) v in fp32 (FMA) or bf16 (VDPBF16PS).
//
// sdpa's CPU flash kernel reaches ~55 GFLOP/s here at a 512-token prompt (10% of a bf16 prefill, 5% of an fp32
// one). This one packs each key/value head once into layouts where one 64-byte load holds 16 keys' (or 16 dims')
// operands, and runs 4 query rows x 64 keys (q k^T) and 4 query rows x 64 head dims (p v) per register tile, as a
// GEMM micro-kernel does: 1.3-2.1x sdpa in fp32, 2.2-4.0x in bf16, from 65 to 4096 tokens (head sizes 64 and 128,
// 2 threads: benchmarks/attention_micro.py). The arithmetic is sdpa's: scores accumulated and softmaxed in fp32,
// probabilities rounded to the dtype for the product with v (bf16: rounded; fp32: kept), accumulated in fp32, one
// rounding at the end. Softmax runs over a query's whole row of scores (two passes, not online). Built with the
// other kernels by cpu.py; bf16 needs AVX512_BF16 (the Python side keeps sdpa without it).
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

using mixtral_simd::exp16;
using mixtral_simd::first;
using mixtral_simd::store16;
constexpr int kRowsPerTile = 4;      // query rows per register tile
constexpr int kKeyBlocks = 4;        // 16-key blocks per q k^T tile: 4 x 4 accumulators
constexpr int64_t kQueryBlock = 32;  // query rows per task: its keys and values stay in L2 across the rows

// Both dtypes work in 32-bit units: a pair of bf16 (what VDPBF16PS multiplies and adds) or one fp32 (FMA). A unit
// of q, or of probabilities, is broadcast to 16 lanes and multiplied with 16 lanes of packed keys or values.
template <class T>
constexpr int64_t kPerUnit = 4 / sizeof(T);  // elements in a unit: 2 bf16, 1 fp32

inline __m512 madd(__m512 acc, __m512i a, __m512i b, float) {
  return _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc);
}
#ifdef __AVX512BF16__
inline __m512 madd(__m512 acc, __m512i a, __m512i b, c10::BFloat16) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
#endif

inline __m512i broadcast_unit(const void* p, int64_t u) {
  return _mm512_set1_epi32(static_cast<const int32_t*>(p)[u]);
}

// Keys of one head in blocks of 16 keys: kp[block][unit][key] = unit `unit` of key 16 block + key (zeros past T):
// one 64-byte load holds the same unit of 16 keys.
void pack_keys(const int32_t* k, int64_t stride_units, int64_t T, int64_t units, int32_t* kp) {
  for (int64_t b = 0; b < (T + 15) / 16; ++b)
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t t = 16 * b + i;
      for (int64_t u = 0; u < units; ++u) kp[(b * units + u) * 16 + i] = t < T ? k[t * stride_units + u] : 0;
    }
}

// Values of one head by units of keys: vp[key unit][d][j] = v[kPerUnit key unit + j][d] (zeros past T): one 64-byte
// load holds 16 dims of a unit of keys, multiplied with that unit of a query's probabilities.
template <class T>
void pack_values(const T* v, int64_t stride, int64_t keys, int64_t D, T* vp) {
  constexpr int64_t n = kPerUnit<T>;
  for (int64_t t = 0; t < (keys + n - 1) / n * n; ++t)
    for (int64_t d = 0; d < D; ++d) vp[((t / n) * D + d) * n + t % n] = t < keys ? v[t * stride + d] : T(0.0f);
}

// s[r][16 (kb + j) + i] = scale * q[r] . key (16 (kb + j) + i) for r < 4, j < NB, i < 16; q rows of `units` units.
template <class T, int NB>
inline void qk_tile(const T* q, int64_t units, const int32_t* kp, int64_t kb, float scale, float* s, int64_t lds) {
  __m512 acc[kRowsPerTile][NB];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t u = 0; u < units; ++u) {
    __m512i keys[NB];
    for (int j = 0; j < NB; ++j) keys[j] = _mm512_loadu_si512(kp + ((kb + j) * units + u) * 16);
    for (int r = 0; r < kRowsPerTile; ++r) {
      const __m512i qr = broadcast_unit(q, r * units + u);
      for (int j = 0; j < NB; ++j) acc[r][j] = madd(acc[r][j], qr, keys[j], T());
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < kRowsPerTile; ++r)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(s + r * lds + 16 * (kb + j), _mm512_mul_ps(acc[r][j], sc));
}

// out[r][d0 + 16 j + i] = sum over keys of p[r][key] v[key][d0 + 16 j + i] * inv_total[r], for r < 4, j < NV.
template <class T, int NV>
inline void pv_tile(const T* p, int64_t ldp, int64_t key_units, const T* vp, int64_t D, int64_t d0,
                    const float* inv_total, T* const* out) {
  constexpr int64_t n = kPerUnit<T>;
  __m512 acc[kRowsPerTile][NV];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t t = 0; t < key_units; ++t) {
    __m512i vals[NV];
    for (int j = 0; j < NV; ++j) vals[j] = _mm512_loadu_si512(vp + (t * D + d0 + 16 * j) * n);
    for (int r = 0; r < kRowsPerTile; ++r) {
      const __m512i pr = broadcast_unit(p + r * ldp, t);
      for (int j = 0; j < NV; ++j) acc[r][j] = madd(acc[r][j], pr, vals[j], T());
    }
  }
  for (int r = 0; r < kRowsPerTile; ++r) {
    if (!out[r]) continue;
    const __m512 inv = _mm512_set1_ps(inv_total[r]);
    for (int j = 0; j < NV; ++j) store16(out[r] + d0 + 16 * j, _mm512_mul_ps(acc[r][j], inv), 16);
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
  __m512 best = _mm512_set1_ps(neg_inf);
  for (int64_t t = 0; t < L; t += 16) best = _mm512_max_ps(best, _mm512_mask_loadu_ps(best, first(L - t), s + t));
  const float mx = _mm512_reduce_max_ps(best);
  if (mx == neg_inf) {
    std::memset(static_cast<void*>(p), 0, padded * sizeof(T));
    return 0.0f;
  }
  const __m512 m = _mm512_set1_ps(mx);
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; t += 16) {
    const __mmask16 k = first(L - t);
    const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), m)));
    total = _mm512_add_ps(total, e);
    store16(p + t, e, L - t);
  }
  for (int64_t t = L; t < padded; ++t) p[t] = T(0.0f);
  return 1.0f / _mm512_reduce_add_ps(total);
}

template <class T>
void attend_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mp, const int64_t* ms,
                double scale, bool causal, const at::Tensor& out) {
  constexpr int64_t n = kPerUnit<T>;
  const int64_t B = q.size(0), nh = q.size(1), S = q.size(2), D = q.size(3), nkv = k.size(1), T_ = k.size(2);
  const int64_t rep = nh / nkv, units = D / n, blocks = (T_ + 15) / 16, key_units = (T_ + n - 1) / n;

  // Pack every key/value head once: (B nkv, blocks * 16 * units) and (B nkv, key_units * D * n).
  const int64_t kp_size = blocks * 16 * units, vp_size = key_units * D * n;
  std::vector<int32_t> kp(B * nkv * kp_size);
  std::vector<T> vp(B * nkv * vp_size);
  const T* kd = k.data_ptr<T>();
  const T* vd = v.data_ptr<T>();
  at::parallel_for(0, B * nkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / nkv, h = i % nkv;
      pack_keys(reinterpret_cast<const int32_t*>(kd + b * k.stride(0) + h * k.stride(1)), k.stride(2) / n, T_,
                units, kp.data() + i * kp_size);
      pack_values(vd + b * v.stride(0) + h * v.stride(1), v.stride(2), T_, D, vp.data() + i * vp_size);
    }
  });

  const T* qd = q.data_ptr<T>();
  T* od = out.data_ptr<T>();
  const int64_t qblocks = (S + kQueryBlock - 1) / kQueryBlock, lds = blocks * 16, ldp = key_units * n;
  const float fscale = float(scale);
  at::parallel_for(0, B * nh * qblocks, 1, [&](int64_t begin, int64_t end) {
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
          orow[r] = real ? od + b * out.stride(0) + h * out.stride(1) + (r0 + r) * out.stride(2) : nullptr;
          const T* src = qd + b * q.stride(0) + h * q.stride(1) + (real ? r0 + r : r0) * q.stride(2);
          std::memcpy(static_cast<void*>(qt.data() + r * D), src, D * sizeof(T));
        }
        const int64_t longest = *std::max_element(len, len + kRowsPerTile);
        const int64_t kblocks = (longest + 15) / 16, used_units = (longest + n - 1) / n;
        int64_t kb = 0;
        for (; kb + kKeyBlocks <= kblocks; kb += kKeyBlocks)
          qk_tile<T, kKeyBlocks>(qt.data(), units, kph, kb, fscale, s.data(), lds);
        for (; kb < kblocks; ++kb) qk_tile<T, 1>(qt.data(), units, kph, kb, fscale, s.data(), lds);
        float inv_total[kRowsPerTile];
        for (int r = 0; r < kRowsPerTile; ++r) {
          const bool* mrow = mp && r < rows ? mp + b * ms[0] + (r0 + r) * ms[2] : nullptr;
          inv_total[r] = softmax_row(s.data() + r * lds, len[r], n * used_units, mrow, ms[3], p.data() + r * ldp);
        }
        int64_t d0 = 0;
        for (; d0 + 64 <= D; d0 += 64) pv_tile<T, 4>(p.data(), ldp, used_units, vph, D, d0, inv_total, orow);
        if (d0 < D) pv_tile<T, 2>(p.data(), ldp, used_units, vph, D, d0, inv_total, orow);
      }
    }
  });
}

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
    attend_all<float>(q, k, v, mp, ms, scale, causal, out);
  } else {
#ifdef __AVX512BF16__
    attend_all<c10::BFloat16>(q, k, v, mp, ms, scale, causal, out);
#else
    TORCH_CHECK(false, "prefill_attend in bfloat16 needs a CPU with AVX512_BF16");
#endif
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixtral_kernels, m) {
  m.def("prefill_attend(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixtral_kernels, CPU, m) { m.impl("prefill_attend", &prefill_attend); }
