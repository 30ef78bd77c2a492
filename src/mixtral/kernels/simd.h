// AVX-512 helpers shared by the kernels' sources: masked loads and stores of 16 fp32 or bf16 values, and e^x.
#pragma once

#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include <cstdint>

namespace mixtral_simd {

// The first n (< 16) lanes, or all 16.
inline __mmask16 first(int64_t n) { return n >= 16 ? 0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

// 16 (or the first n < 16) elements widened to fp32; the rest are zero.
inline __m512 load16(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
inline __m512 load16(const c10::BFloat16* p, int64_t n) {
  const __m256i h = _mm256_maskz_loadu_epi16(first(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The first n (<= 16) lanes stored; to bf16 rounded to nearest even as c10::BFloat16 rounds (NaN stays NaN).
inline void store16(float* p, __m512 x, int64_t n) { _mm512_mask_storeu_ps(p, first(n), x); }
inline void store16(c10::BFloat16* p, __m512 x, int64_t n) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, first(n), _mm512_cvtepi32_epi16(rounded));
}

// e^x in fp32: 2^n * 2^f with f in [-0.5, 0.5] and 2^f by its degree-6 Taylor polynomial; relative error < 2e-7.
// Below about -104 it gives 0, above 88.7 infinity (x clamped to +-150 / log2(e) first, so that -inf gives 0).
inline __m512 exp16(__m512 x) {
  const __m512 t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                               _mm512_set1_ps(-150.0f)), _mm512_set1_ps(150.0f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381609e-4f);  // (ln 2)^k / k!, k = 6 down to 0
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace mixtral_simd
