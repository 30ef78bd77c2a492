// Opt-in int8 activations for llama.cpp's two block formats: x quantized to int8 per block of 32 columns (one fp32
// scale each, as llama.cpp's Q8_0 activations), then integer dot products with symmetric int4 (Q4_0) or int8 (Q8_0)
// weights in groups of 32, one fp32 multiply-add a block: what llama.cpp's CPU kernels do. About half the work a
// block of the float path, at the cost of rounding x to 8 bits (relative error up to 1/254 of each block's largest
// value). kernels/__init__.py uses it only where MIXTRAL_INT8_ACTIVATIONS=1.
//
// x86 (AVX2 integer ops, at every x86 level): VPMADDUBSW multiplies unsigned codes by signed x in pairs, VPMADDWD
// sums pairs into 8 int32 lanes (with VNNI, one VPDPBUSD does both). Q4_0: codes 0..15 as they are, their -8 taken
// out afterwards as -8 sum(xq) per block; Q8_0: |w| times x with w's sign. Other architectures: has_int8_dot() is
// false (the float kernels run).
// Shapes: M rows of x, K inputs (a multiple of 32), N outputs, E experts, T tokens, Kt experts per token.
#include "plan.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#ifndef MIXTRAL_NO_ATEN
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#endif

namespace mixtral_q8 {

namespace simd = mixtral_simd;

// A row of x as the kernels read it, K / 32 = G blocks: G x 32 int8 values (int4 weights: each block's even columns,
// then its odd ones, the order the codes unpack in), then G fp32 scales, then G values -8 sum(xq) (exact in fp32:
// |sum| <= 32 * 127; Q4_0's zero point).
inline int64_t x_row_bytes(int64_t K) { return K / 32 * (32 + 4 + 4); }

// x rows (M, K) -> (M, x_row_bytes(K)); `int4` orders each block's values as the int4 codes unpack.
template <class T>
void quantize_x(const T* x, int64_t M, int64_t K, bool int4, uint8_t* out) {
  const int64_t G = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    auto* q = reinterpret_cast<int8_t*>(out + m * x_row_bytes(K));
    auto* scale = reinterpret_cast<float*>(q + 32 * G);
    float* minus8_sum = scale + G;
    for (int64_t b = 0; b < G; ++b) {
      const T* src = x + m * K + 32 * b;
      float amax = 0.0f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(float(src[i])));
      scale[b] = amax / 127.0f;
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int sum = 0;
      for (int i = 0; i < 32; ++i) {
        const int column = int4 ? (i < 16 ? 2 * i : 2 * (i - 16) + 1) : i;
        q[32 * b + i] = int8_t(std::nearbyint(float(src[column]) * inv));  // |.| <= 127
        sum += q[32 * b + i];
      }
      minus8_sum[b] = float(-8 * sum);
    }
  }
}

#if defined(__AVX2__)
constexpr bool kAvailable = true;
constexpr int kRows = 4, kMaxMB = 2;  // output rows per tile; rows of x per tile (4 x 2 accumulators)

// 32 codes of a Q4_0 block's 16 bytes as unsigned bytes: low nibbles (even columns) then high ones (odd).
inline __m256i int4_codes(const uint8_t* p) {
  const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p));
  return _mm256_and_si256(_mm256_blend_epi32(both, _mm256_srli_epi16(both, 4), 0xF0), _mm256_set1_epi8(15));
}

// The 8 int32 partial sums of a block's 32 products: codes (unsigned) or int8 weights, times 32 int8 x.
template <bool Int4>
inline __m256i block_dot(const uint8_t* w, const int8_t* xq) {
  const __m256i x = _mm256_loadu_si256((const __m256i*)xq);
  __m256i u, s;  // unsigned times signed bytes
  if constexpr (Int4) {
    u = int4_codes(w), s = x;
  } else {
    const __m256i wq = _mm256_loadu_si256((const __m256i*)w);
    u = _mm256_sign_epi8(wq, wq), s = _mm256_sign_epi8(x, wq);  // |w| times x with w's sign
  }
#ifdef __AVX512VNNI__
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);  // 4 products into each int32 lane in one instruction
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// R output rows from n0 for MB rows of x. The blocks' combined scales (weight scale x x scale) are computed first,
// 8 blocks a vector, into `d` (MB, R, G): the block loop then only loads them.
template <bool Int4, int MB, int R, class O>
void tile(const uint8_t* rows0, int64_t row_bytes, const uint16_t* scales, int64_t G, int64_t n0,
          const uint8_t* const* x, O* const* y, std::vector<float>& d) {
  constexpr int64_t block_bytes = Int4 ? 16 : 32;
  d.resize(MB * R * G);
  float bias[MB][R];  // Q4_0's sum over blocks of d * -8 sum(xq)
  for (int m = 0; m < MB; ++m) {
    const auto* xs = reinterpret_cast<const float*>(x[m] + 32 * G);
    for (int r = 0; r < R; ++r) {
      const uint16_t* ws = scales + (n0 + r) * G;
      float* dr = d.data() + (m * R + r) * G;
      __m256 b8 = _mm256_setzero_ps();
      int64_t b = 0;
      for (; b + 8 <= G; b += 8) {
        const __m256 prod = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ws + b))),
                                          _mm256_loadu_ps(xs + b));
        _mm256_storeu_ps(dr + b, prod);
        if (Int4) b8 = _mm256_fmadd_ps(prod, _mm256_loadu_ps(xs + G + b), b8);
      }
      bias[m][r] = simd::reduce_add8(b8);
      for (; b < G; ++b) {
        dr[b] = simd::half_to_float(ws[b]) * xs[b];
        if (Int4) bias[m][r] += dr[b] * xs[G + b];
      }
    }
  }
  // Row r's stream continues in row r + R, of the next tile: prefetch that far ahead along it (as matvec.cpp).
  const int64_t ahead = (2048 / row_bytes) * R * row_bytes + 2048 % row_bytes;
  __m256 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const uint8_t* w = rows0 + n0 * row_bytes;
  for (int64_t b = 0; b < G; ++b, w += block_bytes) {
    for (int r = 0; r < R; ++r) {
      if ((b * block_bytes) % 64 == 0) simd::prefetch(w + r * row_bytes + ahead);
      for (int m = 0; m < MB; ++m) {
        const __m256i dot = block_dot<Int4>(w + r * row_bytes, reinterpret_cast<const int8_t*>(x[m]) + 32 * b);
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(&d[(m * R + r) * G + b]),
                                    acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) y[m][n0 + r] = O(simd::reduce_add8(acc[m][r]) + (Int4 ? bias[m][r] : 0.0f));
}

template <bool Int4, int R, class O>
void rows(const uint8_t* base, int64_t row_bytes, const uint16_t* scales, int64_t G, int64_t n0,
          const uint8_t* const* x, O* const* y, int64_t M, std::vector<float>& d) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxMB) {
    if (M - m0 >= 2)
      tile<Int4, 2, R, O>(base, row_bytes, scales, G, n0, x + m0, y + m0, d);
    else
      tile<Int4, 1, R, O>(base, row_bytes, scales, G, n0, x + m0, y + m0, d);
  }
}

template <bool Int4, class O>
void run(const uint8_t* q, const uint16_t* scales, int64_t N, int64_t K,
         const std::vector<mixtral_plan::Group<O>>& groups) {
  const int64_t G = K / 32, row_bytes = Int4 ? K / 2 : K, blocks = (N + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (row_bytes * kRows));
  simd::parallel_for(0, int64_t(groups.size()) * blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> d;
    for (int64_t i = begin; i < end; ++i) {
      const mixtral_plan::Group<O>& g = groups[i / blocks];
      const uint8_t* base = q + g.expert * N * row_bytes;
      const uint16_t* sc = scales + g.expert * N * G;
      const int64_t n0 = (i % blocks) * kRows, M = int64_t(g.x.size());
      if (n0 + kRows <= N) {
        rows<Int4, kRows, O>(base, row_bytes, sc, G, n0, g.x.data(), g.y.data(), M, d);
      } else {
        for (int64_t n = n0; n < N; ++n) rows<Int4, 1, O>(base, row_bytes, sc, G, n, g.x.data(), g.y.data(), M, d);
      }
    }
  });
}
#else
constexpr bool kAvailable = false;
#endif

#ifndef MIXTRAL_NO_ATEN
// x (..., K) or (T, K) with experts (T, Kt); q: int4 packed uint8 (E?, N, K/2) when bits == 4 (symmetric, Q4_0), int8
// (E?, N, K) when 8 (Q8_0); scales fp16 (E?, N, K/32). Returns (..., N) or (T, Kt, N) in x's dtype.
at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, int64_t bits,
                     const std::optional<at::Tensor>& experts) {
  TORCH_CHECK(kAvailable, "linear_q8 needs AVX2 (has_int8_dot() is false here)");
#if defined(__AVX2__)
  TORCH_CHECK(bits == 4 || bits == 8, "linear_q8 takes bits 4 (Q4_0) or 8 (Q8_0)");
  const bool int4 = bits == 4;
  const int64_t K = q.size(-1) * (int4 ? 2 : 1), N = q.size(-2), E = experts ? q.size(0) : 1;
  mixtral_plan::check(x, q, K, experts);
  TORCH_CHECK(K % 32 == 0 && q.scalar_type() == (int4 ? at::kByte : at::kChar) && scales.scalar_type() == at::kHalf &&
                  scales.is_contiguous() && scales.numel() == E * N * (K / 32),
              "linear_q8 needs K a multiple of 32, ", int4 ? "uint8" : "int8", " codes and float16 scales, one per 32 "
              "columns");
  const at::Tensor rows = x.reshape({-1, K}).contiguous();
  const int64_t M = rows.size(0);
  at::Tensor xq = at::empty({M, x_row_bytes(K)}, x.options().dtype(at::kByte));
  if (rows.scalar_type() == at::kBFloat16)
    quantize_x(static_cast<const simd::BFloat16*>(rows.data_ptr()), M, K, int4, xq.data_ptr<uint8_t>());
  else
    quantize_x(rows.data_ptr<float>(), M, K, int4, xq.data_ptr<uint8_t>());
  at::Tensor out = at::empty(mixtral_plan::out_shape(x, N, experts), x.options());
  const auto* codes = static_cast<const uint8_t*>(q.data_ptr());
  const auto* scales16 = static_cast<const uint16_t*>(scales.data_ptr());
  auto go = [&](auto* y) {
    const auto groups = mixtral_plan::plan(xq, y, N, experts, E);
    if (int4)
      run<true>(codes, scales16, N, K, groups);
    else
      run<false>(codes, scales16, N, K, groups);
  };
  if (x.scalar_type() == at::kBFloat16)
    go(static_cast<simd::BFloat16*>(out.data_ptr()));
  else
    go(out.data_ptr<float>());
  return out;
#else
  return at::Tensor();
#endif
}

bool has_int8_dot() { return kAvailable; }
#endif

}  // namespace mixtral_q8

#ifndef MIXTRAL_NO_ATEN
TORCH_LIBRARY_FRAGMENT(mixtral_kernels, m) {
  m.def("linear_q8(Tensor x, Tensor q, Tensor scales, int bits, Tensor? experts) -> Tensor");
  m.def("has_int8_dot() -> bool", &mixtral_q8::has_int8_dot);
}

TORCH_LIBRARY_IMPL(mixtral_kernels, CPU, m) { m.impl("linear_q8", &mixtral_q8::linear_q8); }
#endif
