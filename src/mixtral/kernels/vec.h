// One fp32 SIMD vector type for every ISA level the kernels build for, so that one source serves them all:
// AVX-512 (W = 16 lanes), AVX2 + FMA + F16C (W = 8), aarch64 NEON (W = 4). The level is whatever the compiler
// flags enable (cpu.py builds one library per level); the attention, expert and portable matvec kernels are written
// against this header, the AVX-512 matvec kernels (matvec.cpp) against the intrinsics directly.
//
// With MIXTRAL_NO_ATEN the header and the kernels that include it compile without torch (bf16 and parallel_for are
// defined here): the cross-compiled NEON tests (tests/kernels/) build them so and run under qemu.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define MIXTRAL_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MIXTRAL_AVX2 1
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define MIXTRAL_NEON 1
#include <arm_neon.h>
#else
#error "mixtral kernels need AVX-512 (F/BW/VL/DQ), AVX2 with FMA and F16C, or aarch64 NEON"
#endif

#ifdef MIXTRAL_NO_ATEN
#include <algorithm>
#else
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#endif

namespace mixtral_simd {

#ifdef MIXTRAL_NO_ATEN
// c10::BFloat16's layout and rounding (to nearest even; NaN stays NaN), for builds without torch.
struct BFloat16 {
  uint16_t x;
  BFloat16() = default;
  BFloat16(float f) {  // NOLINT: implicit, as c10's
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    x = std::isnan(f) ? uint16_t(0x7fc0) : uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
  }
  operator float() const {  // NOLINT
    const uint32_t bits = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
};
// Serial stand-ins for ATen's thread pool.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t, const F& f) {
  if (begin < end) f(begin, end);
}
inline int num_threads() { return 1; }
inline int thread_num() { return 0; }
#else
using BFloat16 = c10::BFloat16;
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, f);
}
inline int num_threads() { return at::get_num_threads(); }
inline int thread_num() { return at::get_thread_num(); }
#endif

inline float half_to_float(uint16_t h) {
#if defined(MIXTRAL_NEON)
  __fp16 f;
  std::memcpy(&f, &h, 2);
  return float(f);
#else
  return _cvtsh_ss(h);
#endif
}

// n fp16 values (bits) to fp32, 8 at a time where the ISA converts vectors (F16C, NEON).
inline void halves_to_floats(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
#if defined(MIXTRAL_NEON)
  for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + i))));
#else
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
#endif
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

#if defined(__AVX2__)
inline float reduce_add8(__m256 x) {  // the sum of 8 fp32 lanes
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 2); }  // into L2 (T1), as the AVX-512 kernels do

#if defined(MIXTRAL_AVX512)
constexpr int W = 16;
using V = __m512;
inline __mmask16 first(int64_t n) { return n >= 16 ? 0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }
inline V zero() { return _mm512_setzero_ps(); }
inline V set1(float f) { return _mm512_set1_ps(f); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline V loadn(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
inline V loadn(const float* p, int64_t n, float fill) { return _mm512_mask_loadu_ps(set1(fill), first(n), p); }
inline V load(const BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline V loadn(const BFloat16* p, int64_t n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first(n), p)), 16));
}
inline void store(float* p, V x) { _mm512_storeu_ps(p, x); }
inline void storen(float* p, V x, int64_t n) { _mm512_mask_storeu_ps(p, first(n), x); }
inline void storen(BFloat16* p, V x, int64_t n) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, first(n), _mm512_cvtepi32_epi16(rounded));
}
inline void store(BFloat16* p, V x) { storen(p, x, 16); }
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V div(V a, V b) { return _mm512_div_ps(a, b); }
inline V max(V a, V b) { return _mm512_max_ps(a, b); }
inline V min(V a, V b) { return _mm512_min_ps(a, b); }
inline V round(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V scale2(V p, V n) { return _mm512_scalef_ps(p, n); }  // p * 2^n, n integral
inline float reduce_add(V x) { return _mm512_reduce_add_ps(x); }
inline float reduce_max(V x) { return _mm512_reduce_max_ps(x); }
inline V broadcast_bits(const void* p) { return _mm512_castsi512_ps(_mm512_set1_epi32(*(const int32_t*)p)); }
inline V load_bits(const void* p) { return _mm512_loadu_ps(p); }

#elif defined(MIXTRAL_AVX2)
constexpr int W = 8;
using V = __m256;
inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n < 0 ? 0 : n > 8 ? 8 : n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline V zero() { return _mm256_setzero_ps(); }
inline V set1(float f) { return _mm256_set1_ps(f); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline V loadn(const float* p, int64_t n) { return n >= 8 ? load(p) : _mm256_maskload_ps(p, lanes_below(n)); }
inline V loadn(const float* p, int64_t n, float fill) {
  return n >= 8 ? load(p) : _mm256_blendv_ps(set1(fill), loadn(p, n), _mm256_castsi256_ps(lanes_below(n)));
}
inline V widen_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline V load(const BFloat16* p) { return widen_bf16(_mm_loadu_si128((const __m128i*)p)); }
inline V loadn(const BFloat16* p, int64_t n) {
  if (n >= 8) return load(p);
  alignas(16) uint16_t buf[8] = {};
  if (n > 0) std::memcpy(buf, p, 2 * n);
  return widen_bf16(_mm_load_si128((const __m128i*)buf));
}
inline void store(float* p, V x) { _mm256_storeu_ps(p, x); }
inline void storen(float* p, V x, int64_t n) {
  if (n >= 8)
    store(p, x);
  else
    _mm256_maskstore_ps(p, lanes_below(n), x);
}
inline void storen(BFloat16* p, V x, int64_t n) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  // 8 dwords -> 8 words (each < 2^16: packus keeps them), lanes 0-3 and 4-7 from the two 128-bit halves
  const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  if (n >= 8) {
    _mm_storeu_si128((__m128i*)p, words);
  } else if (n > 0) {
    alignas(16) uint16_t buf[8];
    _mm_store_si128((__m128i*)buf, words);
    std::memcpy(p, buf, 2 * n);
  }
}
inline void store(BFloat16* p, V x) { storen(p, x, 8); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V div(V a, V b) { return _mm256_div_ps(a, b); }
inline V max(V a, V b) { return _mm256_max_ps(a, b); }
inline V min(V a, V b) { return _mm256_min_ps(a, b); }
inline V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V scale2(V p, V n) {  // p * 2^n for integral n in [-150, 150]: two exponent steps, so that each stays in range
  const __m256i k = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(k, 1);
  const auto pow2 = [](__m256i e) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23)); };
  return mul(mul(p, pow2(half)), pow2(_mm256_sub_epi32(k, half)));
}
inline float reduce_add(V x) { return reduce_add8(x); }
inline float reduce_max(V x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline V broadcast_bits(const void* p) { return _mm256_broadcast_ss((const float*)p); }
inline V load_bits(const void* p) { return _mm256_loadu_ps((const float*)p); }

#else  // NEON
constexpr int W = 4;
using V = float32x4_t;
inline V zero() { return vdupq_n_f32(0.0f); }
inline V set1(float f) { return vdupq_n_f32(f); }
inline V load(const float* p) { return vld1q_f32(p); }
inline V loadn(const float* p, int64_t n, float fill) {
  if (n >= 4) return load(p);
  float buf[4] = {fill, fill, fill, fill};
  if (n > 0) std::memcpy(buf, p, 4 * n);
  return vld1q_f32(buf);
}
inline V loadn(const float* p, int64_t n) { return loadn(p, n, 0.0f); }
inline V load(const BFloat16* p) {
  return vreinterpretq_f32_u32(vshlq_n_u32(vmovl_u16(vld1_u16((const uint16_t*)p)), 16));
}
inline V loadn(const BFloat16* p, int64_t n) {
  if (n >= 4) return load(p);
  uint16_t buf[4] = {0, 0, 0, 0};
  if (n > 0) std::memcpy(buf, p, 2 * n);
  return vreinterpretq_f32_u32(vshlq_n_u32(vmovl_u16(vld1_u16(buf)), 16));
}
inline void store(float* p, V x) { vst1q_f32(p, x); }
inline void storen(float* p, V x, int64_t n) {
  if (n >= 4) {
    store(p, x);
  } else if (n > 0) {
    float buf[4];
    vst1q_f32(buf, x);
    std::memcpy(p, buf, 4 * n);
  }
}
inline void storen(BFloat16* p, V x, int64_t n) {
  const uint32x4_t bits = vreinterpretq_u32_f32(x);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(1));
  uint32x4_t rounded = vshrq_n_u32(vaddq_u32(bits, vaddq_u32(lsb, vdupq_n_u32(0x7fff))), 16);
  rounded = vbslq_u32(vceqq_f32(x, x), rounded, vdupq_n_u32(0x7fc0));  // NaN != NaN
  const uint16x4_t words = vmovn_u32(rounded);
  if (n >= 4) {
    vst1_u16((uint16_t*)p, words);
  } else if (n > 0) {
    uint16_t buf[4];
    vst1_u16(buf, words);
    std::memcpy(p, buf, 2 * n);
  }
}
inline void store(BFloat16* p, V x) { storen(p, x, 4); }
inline V fma(V a, V b, V c) { return vfmaq_f32(c, a, b); }
inline V add(V a, V b) { return vaddq_f32(a, b); }
inline V sub(V a, V b) { return vsubq_f32(a, b); }
inline V mul(V a, V b) { return vmulq_f32(a, b); }
inline V div(V a, V b) { return vdivq_f32(a, b); }
inline V max(V a, V b) { return vmaxq_f32(a, b); }
inline V min(V a, V b) { return vminq_f32(a, b); }
inline V round(V x) { return vrndnq_f32(x); }
inline V scale2(V p, V n) {
  const int32x4_t k = vcvtq_s32_f32(n), half = vshrq_n_s32(k, 1);
  const auto pow2 = [](int32x4_t e) { return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(e, vdupq_n_s32(127)), 23)); };
  return mul(mul(p, pow2(half)), pow2(vsubq_s32(k, half)));
}
inline float reduce_add(V x) { return vaddvq_f32(x); }
inline float reduce_max(V x) { return vmaxvq_f32(x); }
inline V broadcast_bits(const void* p) { return vld1q_dup_f32((const float*)p); }
inline V load_bits(const void* p) { return vld1q_f32((const float*)p); }
#endif

// A (B, heads, rows, D) tensor's data, sizes and strides (unit stride on D): what the attention kernels take.
template <class T>
struct Heads {
  T* data;
  int64_t size[4], stride[3];
};
#ifndef MIXTRAL_NO_ATEN
template <class T>
Heads<T> heads(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), {t.size(0), t.size(1), t.size(2), t.size(3)},
          {t.stride(0), t.stride(1), t.stride(2)}};
}
#endif

// e^x in fp32: 2^n * 2^f with f in [-0.5, 0.5] and 2^f by its degree-6 Taylor polynomial; relative error < 2e-7
// plus the rounding of x log2(e), |x| 2^-24 (for the softmax's x <= 0, negligible where e^x is not).
// Below about -104 it gives 0, above 88.7 infinity (x clamped to +-150 / log2(e) first, so that -inf gives 0).
inline V exp(V x) {
  const V t = min(max(mul(x, set1(1.44269504088896341f)), set1(-150.0f)), set1(150.0f));
  const V n = round(t);
  const V f = sub(t, n);
  V p = set1(1.5403530393381609e-4f);  // (ln 2)^k / k!, k = 6 down to 0
  p = fma(p, f, set1(1.3333558146428443e-3f));
  p = fma(p, f, set1(9.6181291076284772e-3f));
  p = fma(p, f, set1(5.5504108664821580e-2f));
  p = fma(p, f, set1(2.4022650695910071e-1f));
  p = fma(p, f, set1(6.9314718055994531e-1f));
  p = fma(p, f, set1(1.0f));
  return scale2(p, n);
}

}  // namespace mixtral_simd
