// Matrix-vector kernels for the ISA levels below AVX-512: AVX2 + FMA + F16C (8 fp32 lanes) and aarch64 NEON (4),
// written against vec.h. The same ops, layouts and results as matvec.cpp (the AVX-512 kernels, which cpu.py builds
// instead where the CPU has AVX-512): y[m] = W x[m] for a few rows x[m], each weight row streamed once from memory.
//
// Shapes: M rows of x, K inputs, N outputs, E experts, T tokens, Kt experts per token, G = K / group_size.
//
// A weight row is read in chunks of kCols columns, widened to kVecs vectors of W fp32 weights in registers and
// multiplied with x (fp32, laid out by the format: plain, or per chunk in the order the codes unpack). A tile
// computes R output rows for up to MB rows of x, streaming its R rows once. Grouped formats (int8 in groups, int4)
// sum a chunk's products first and multiply by the chunk's scale once (the group size is a multiple of 32 columns,
// so a 32-column chunk lies in one group): one FMA a chunk instead of one multiply a vector.
#include "plan.h"
#include "vec.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#ifndef MIXTRAL_NO_ATEN
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#endif

namespace mixtral_matvec {

namespace simd = mixtral_simd;
using simd::V;
using simd::W;

constexpr int kRows = 4;  // output rows per tile (R)
// Each of a tile's R weight streams prefetches this far ahead into L2, as matvec.cpp does.
constexpr int64_t kPrefetch = 2048;
constexpr int kRegisters = W == 8 ? 16 : 32;  // AVX2 has 16 vector registers, NEON (and AVX-512) 32

// ---- widening codes to fp32 -----------------------------------------------------------------------------------
// W int8 codes at p as fp32.
inline V int8s(const uint8_t* p) {
#if defined(MIXTRAL_AVX2)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#elif defined(MIXTRAL_NEON)
  int32_t word;
  std::memcpy(&word, p, 4);
  return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(word))))));
#else
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#endif
}

// The 2W 4-bit codes of the W bytes at p as fp32: the low nibbles (even columns) to lo, the high ones to hi. One
// widening of the bytes serves both: a byte's high nibble is the byte shifted right by 4.
inline void nibbles(const uint8_t* p, V& lo, V& hi) {
#if defined(MIXTRAL_AVX2)
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
#elif defined(MIXTRAL_NEON)
  uint32_t word;
  std::memcpy(&word, p, 4);
  const uint32x4_t bytes = vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(word)))));
  lo = vcvtq_f32_u32(vandq_u32(bytes, vdupq_n_u32(15)));
  hi = vcvtq_f32_u32(vshrq_n_u32(bytes, 4));
#else
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
#endif
}

// ---- weight formats ------------------------------------------------------------------------------------------
// kCols columns in kBytes bytes a chunk, kVecs vectors of x (kXFloats floats: the chunk's x as the format lays it
// out) a chunk, decoded kStep vectors at a time: decode(chunk, i, w) writes vectors i kStep .. i kStep + kStep - 1
// of the chunk's weights (codes, for the grouped formats, whose chunk sums are then scaled: kScaled, by the group's
// fp16 scale; the tile converts a tile's scales (and zeros) to fp32 first, 8 a vector).
// Grouped formats' x layouts end each chunk with one more vector whose lane 0 starts the chunk's sum (kSumInX: -8
// sum(x) for symmetric int4) or, kZeros, is multiplied by the group's zero (asymmetric int4: sum(x)). finish(n, acc)
// ends a row's dot product.
struct Format {
  static constexpr bool kScaled = false, kSumInX = false, kZeros = false;
  static constexpr int kStep = 1;
  const uint8_t* base;
  int64_t row_bytes;
  const uint8_t* row(int64_t n) const { return base + n * row_bytes; }
  // Grouped formats: the fp16 scales (and zeros) of row n, G of them, chunk s in group s / chunks_per_group.
  const uint16_t* scale_row(int64_t) const { return nullptr; }
  const uint16_t* zero_row(int64_t) const { return nullptr; }
  int64_t groups() const { return 0; }
  int64_t group_of(int64_t) const { return 0; }
  float finish(int64_t, float acc) const { return acc; }
};

struct Fp32 : Format {
  static constexpr int kVecs = 2, kCols = 2 * W, kBytes = 4 * kCols, kXFloats = kCols;
  Fp32 expert(int64_t e, int64_t N) const { return {{base + e * N * row_bytes, row_bytes}}; }
  static void decode(const uint8_t* c, int i, V* w) { w[0] = simd::load(reinterpret_cast<const float*>(c) + i * W); }
};

// A bf16 is the top half of an fp32: widened, times fp32 x.
struct Bf16 : Format {
  static constexpr int kVecs = 2, kCols = 2 * W, kBytes = 2 * kCols, kXFloats = kCols;
  Bf16 expert(int64_t e, int64_t N) const { return {{base + e * N * row_bytes, row_bytes}}; }
  static void decode(const uint8_t* c, int i, V* w) {
    w[0] = simd::load(reinterpret_cast<const simd::BFloat16*>(c) + i * W);
  }
};

// int8 codes times one fp32 scale per row, applied to the finished dot product.
struct Int8 : Format {
  static constexpr int kVecs = 4, kCols = 4 * W, kBytes = kCols, kXFloats = kCols;
  const float* scales;
  Int8 expert(int64_t e, int64_t N) const { return {{base + e * N * row_bytes, row_bytes}, scales + e * N}; }
  static void decode(const uint8_t* c, int i, V* w) { w[0] = int8s(c + i * W); }
  float finish(int64_t n, float acc) const { return acc * scales[n]; }
};

// int8 codes in groups of a multiple of 32 columns (llama.cpp's Q8_0), an fp16 scale each.
struct Int8Groups : Format {
  static constexpr bool kScaled = true;
  static constexpr int kVecs = 32 / W, kCols = 32, kBytes = 32, kXFloats = 32;
  const uint16_t* scales;  // fp16 (N, G)
  int64_t G, chunks_per_group;
  Int8Groups expert(int64_t e, int64_t N) const {
    return {{base + e * N * row_bytes, row_bytes}, scales + e * N * G, G, chunks_per_group};
  }
  static void decode(const uint8_t* c, int i, V* w) { w[0] = int8s(c + i * W); }
  const uint16_t* scale_row(int64_t n) const { return scales + n * G; }
  int64_t groups() const { return G; }
  int64_t group_of(int64_t s) const { return s / chunks_per_group; }
};

// int4 codes, two a byte (column 2i in the low nibble of byte i), in groups of a multiple of 32 columns, an fp16
// scale (and zero, asymmetric) each: w = q scale + zero, or (q - 8) scale when symmetric (llama.cpp's Q4_0), whose
// -8 sum(x) x's layout holds. A 32-column chunk is 16 bytes: step i decodes bytes i W .. i W + W - 1 into vector 2i
// (their low nibbles: even columns) and 2i + 1 (high: odd columns); x is laid out to match (permute_int4).
struct Int4 : Format {
  static constexpr bool kScaled = true;
  static constexpr int kVecs = 32 / W, kCols = 32, kBytes = 16, kXFloats = 32 + W, kStep = 2;
  const uint16_t* scales;  // fp16 (N, G)
  const uint16_t* zeros;   // fp16 (N, G); null: symmetric
  int64_t G, chunks_per_group;
  static void decode(const uint8_t* c, int i, V* w) { nibbles(c + i * W, w[0], w[1]); }
  const uint16_t* scale_row(int64_t n) const { return scales + n * G; }
  const uint16_t* zero_row(int64_t n) const { return zeros + n * G; }
  int64_t groups() const { return G; }
  int64_t group_of(int64_t s) const { return s / chunks_per_group; }
};
struct Int4Zeros : Int4 {
  static constexpr bool kZeros = true;
  Int4Zeros expert(int64_t e, int64_t N) const {
    return {{{base + e * N * row_bytes, row_bytes}, scales + e * N * G, zeros + e * N * G, G, chunks_per_group}};
  }
};
struct Int4Symmetric : Int4 {
  static constexpr bool kSumInX = true;
  Int4Symmetric expert(int64_t e, int64_t N) const {
    return {{{base + e * N * row_bytes, row_bytes}, scales + e * N * G, nullptr, G, chunks_per_group}};
  }
};

// Rows of x per tile: the accumulators (twice as many for a grouped format's chunk sums) in half the registers.
template <class F, int R>
constexpr int kMaxMB = std::max(1, kRegisters / 2 / (R * (F::kScaled ? 2 : 1)));

// ---- the tile: R output rows x MB rows of x --------------------------------------------------------------------
// x[m] holds `chunks` chunks of kXFloats floats (zero past K); the weight rows hold `chunks` chunks, the last one
// possibly partial (`last_bytes` of it), copied zero-padded.
template <class F, int MB, int R, class O>
inline void tile(const F& f, int64_t n0, int64_t chunks, int64_t last_bytes, const float* const* x, O* const* y) {
  thread_local std::vector<float> table;  // grouped formats: the tile's scales, then zeros, fp32 (R, G) each
  const int64_t G = f.groups();
  if constexpr (F::kScaled) {
    table.resize(2 * R * G);
    for (int r = 0; r < R; ++r) {
      simd::halves_to_floats(f.scale_row(n0 + r), G, table.data() + r * G);
      if constexpr (F::kZeros) simd::halves_to_floats(f.zero_row(n0 + r), G, table.data() + (R + r) * G);
    }
  }
  V acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = simd::zero();
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = f.row(n0 + r);
  alignas(64) uint8_t tail[R][F::kBytes];

  // Row r's stream continues in row r + R, of the next tile: prefetch that far ahead along it.
  const int64_t ahead = (kPrefetch / f.row_bytes) * R * f.row_bytes + kPrefetch % f.row_bytes;
  for (int64_t s = 0; s < chunks; ++s) {
    const uint8_t* w[R];
    for (int r = 0; r < R; ++r) {
      w[r] = rows[r] + F::kBytes * s;
      if (s == chunks - 1 && last_bytes < F::kBytes) {
        std::memset(tail[r], 0, F::kBytes);
        std::memcpy(tail[r], w[r], last_bytes);
        w[r] = tail[r];
      } else if ((F::kBytes * s) % 64 == 0) {
        simd::prefetch(w[r] + ahead);
      }
    }
    V part[MB][R];  // the chunk's products (grouped formats), or the accumulators themselves
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r)
        part[m][r] = !F::kScaled ? acc[m][r] : F::kSumInX ? simd::load(x[m] + F::kXFloats * s + 32) : simd::zero();
    _Pragma("GCC unroll 8") for (int i = 0; i < F::kVecs / F::kStep; ++i) {
      V xv[MB][F::kStep];
      for (int m = 0; m < MB; ++m)
        for (int j = 0; j < F::kStep; ++j) xv[m][j] = simd::load(x[m] + F::kXFloats * s + W * (F::kStep * i + j));
      for (int r = 0; r < R; ++r) {
        V wv[F::kStep];
        F::decode(w[r], i, wv);
        for (int j = 0; j < F::kStep; ++j)
          for (int m = 0; m < MB; ++m) part[m][r] = simd::fma(wv[j], xv[m][j], part[m][r]);
      }
    }
    if constexpr (F::kScaled) {
      const int64_t g = f.group_of(s);
      for (int r = 0; r < R; ++r) {
        const V sc = simd::set1(table[r * G + g]);
        for (int m = 0; m < MB; ++m) acc[m][r] = simd::fma(part[m][r], sc, acc[m][r]);
        if constexpr (F::kZeros) {
          const V z = simd::set1(table[(R + r) * G + g]);
          for (int m = 0; m < MB; ++m) acc[m][r] = simd::fma(z, simd::load(x[m] + F::kXFloats * s + 32), acc[m][r]);
        }
      }
    } else {
      for (int m = 0; m < MB; ++m)
        for (int r = 0; r < R; ++r) acc[m][r] = part[m][r];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) y[m][n0 + r] = O(f.finish(n0 + r, simd::reduce_add(acc[m][r])));
}

// R rows starting at n0 for all M rows of x, up to min(4, kMaxMB) at a time.
template <class F, int R, class O>
void rows(const F& f, int64_t n0, int64_t chunks, int64_t last_bytes, const float* const* x, O* const* y, int64_t M) {
  constexpr int mb = std::min(4, kMaxMB<F, R>);
  for (int64_t m0 = 0; m0 < M;) {
    const int64_t left = std::min<int64_t>(mb, M - m0);
    if (mb >= 4 && left >= 4) {
      tile<F, (mb >= 4 ? 4 : 1), R, O>(f, n0, chunks, last_bytes, x + m0, y + m0);
      m0 += 4;
    } else if (mb >= 3 && left == 3) {
      tile<F, (mb >= 3 ? 3 : 1), R, O>(f, n0, chunks, last_bytes, x + m0, y + m0);
      m0 += 3;
    } else if (mb >= 2 && left >= 2) {
      tile<F, (mb >= 2 ? 2 : 1), R, O>(f, n0, chunks, last_bytes, x + m0, y + m0);
      m0 += 2;
    } else {
      tile<F, 1, R, O>(f, n0, chunks, last_bytes, x + m0, y + m0);
      m0 += 1;
    }
  }
}

// Runs format f over every group for K columns: the parallel range is (group, block of R rows).
template <class F, class O>
void run(const F& f, const std::vector<mixtral_plan::Group<O>>& groups, int64_t N, int64_t K) {
  constexpr int R = kRows;
  const int64_t chunks = (K + F::kCols - 1) / F::kCols;
  const int64_t last_bytes = (K - (chunks - 1) * F::kCols) * F::kBytes / F::kCols;
  const int64_t blocks = (N + R - 1) / R;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (f.row_bytes * R));  // >= 64 KiB of weights a thread
  simd::parallel_for(0, int64_t(groups.size()) * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const mixtral_plan::Group<O>& g = groups[i / blocks];
      const F fe = f.expert(g.expert, N);
      const int64_t n0 = (i % blocks) * R, M = int64_t(g.x.size());
      if (n0 + R <= N) {
        rows<F, R, O>(fe, n0, chunks, last_bytes, g.floats(), g.y.data(), M);
      } else {
        for (int64_t n = n0; n < N; ++n) rows<F, 1, O>(fe, n, chunks, last_bytes, g.floats(), g.y.data(), M);
      }
    }
  });
}

// ---- x as the formats read it -----------------------------------------------------------------------------------
// Plain: x rows (M, K) -> (M, chunks * cols) fp32, zero past K.
template <class T>
void pad_rows(const T* x, int64_t M, int64_t K, int64_t cols, float* out) {
  const int64_t Kp = (K + cols - 1) / cols * cols;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) out[m * Kp + k] = float(x[m * K + k]);
    std::fill(out + m * Kp + K, out + (m + 1) * Kp, 0.0f);
  }
}

// int4: x rows (M, K), K a multiple of 32 -> per 32-column chunk the order the codes decode in (Int4::decode), then
// a vector with the chunk's sum in lane 0, times -8 when symmetric: (M, K / 32 * Int4::kXFloats).
template <class T>
void permute_int4(const T* x, int64_t M, int64_t K, bool symmetric, float* out) {
  const int64_t chunks = K / 32;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < chunks; ++c) {
      const T* src = x + m * K + 32 * c;
      float* dst = out + (m * chunks + c) * Int4::kXFloats;
      float total = 0.0f;
      for (int v = 0; v < 32 / W; ++v)
        for (int i = 0; i < W; ++i) {
          const int column = 2 * ((v / 2) * W + i) + v % 2;  // vector v = 2 step + (high nibbles)
          dst[v * W + i] = float(src[column]);
          total += float(src[column]);
        }
      std::fill(dst + 32, dst + Int4::kXFloats, 0.0f);
      dst[32] = symmetric ? -8.0f * total : total;
    }
}

#ifndef MIXTRAL_NO_ATEN
// ---- ops -----------------------------------------------------------------------------------------------------
// Each takes x (..., K) and weights (N, ...), returning (..., N); or x (T, K), weights (E, N, ...) and experts
// (T, Kt), returning (T, Kt, N). The result has x's dtype.

using mixtral_plan::check;

// x rows as the format lays them out: (M, floats per row) fp32, by layout(x data, M, K, out) in x's dtype.
template <class Layout>
at::Tensor lay_out(const at::Tensor& x, int64_t floats_per_row, const Layout& layout) {
  const at::Tensor rows = x.reshape({-1, x.size(-1)}).contiguous();
  at::Tensor xf = at::empty({rows.size(0), floats_per_row}, x.options().dtype(at::kFloat));
  if (rows.scalar_type() == at::kBFloat16)
    layout(static_cast<const simd::BFloat16*>(rows.data_ptr()), rows.size(0), rows.size(1), xf.data_ptr<float>());
  else
    layout(rows.data_ptr<float>(), rows.size(0), rows.size(1), xf.data_ptr<float>());
  return xf;
}

template <class F>
at::Tensor apply(const F& f, const at::Tensor& x, const at::Tensor& xf, int64_t N,
                 const std::optional<at::Tensor>& experts, int64_t E) {
  at::Tensor out = at::empty(mixtral_plan::out_shape(x, N, experts), x.options());
  if (x.scalar_type() == at::kBFloat16)
    run(f, mixtral_plan::plan(xf, static_cast<simd::BFloat16*>(out.data_ptr()), N, experts, E), N, x.size(-1));
  else
    run(f, mixtral_plan::plan(xf, out.data_ptr<float>(), N, experts, E), N, x.size(-1));
  return out;
}

template <class F>
at::Tensor apply_plain(const F& f, const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& experts,
                       int64_t E) {
  const int64_t K = x.size(-1), padded = (K + F::kCols - 1) / F::kCols * F::kCols;
  const at::Tensor xf = lay_out(x, padded, [&](auto* src, int64_t M, int64_t K_, float* out) {
    pad_rows(src, M, K_, F::kCols, out);
  });
  return apply(f, x, xf, N, experts, E);
}

Format rows_of(const at::Tensor& w, int64_t row_bytes) {
  return {static_cast<const uint8_t*>(w.data_ptr()), row_bytes};
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& experts, bool) {
  const int64_t K = w.size(-1), N = w.size(-2), E = experts ? w.size(0) : 1;
  check(x, w, K, experts);
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "x and w must have the same dtype");
  if (w.scalar_type() == at::kFloat) return apply_plain(Fp32{rows_of(w, 4 * K)}, x, N, experts, E);
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "w must be float32 or bfloat16");
  return apply_plain(Bf16{rows_of(w, 2 * K)}, x, N, experts, E);
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       const std::optional<at::Tensor>& experts) {
  const int64_t K = q.size(-1), N = q.size(-2), E = experts ? q.size(0) : 1;
  check(x, q, K, experts);
  if (const int64_t G = mixtral_plan::int8_groups(q, scale, bool(experts))) {
    const Int8Groups f{rows_of(q, K), static_cast<const uint16_t*>(scale.data_ptr()), G, K / G / 32};
    return apply_plain(f, x, N, experts, E);
  }
  return apply_plain(Int8{rows_of(q, K), scale.data_ptr<float>()}, x, N, experts, E);
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& zeros, int64_t group_size, const std::optional<at::Tensor>& experts) {
  const int64_t K = packed.size(-1) * 2, N = packed.size(-2), E = experts ? packed.size(0) : 1;
  check(x, packed, K, experts);
  const int64_t G = mixtral_plan::int4_groups(packed, scales, zeros, group_size, group_size % 32 == 0,
                                              "a multiple of 32", bool(experts));
  const auto* scales16 = static_cast<const uint16_t*>(scales.data_ptr());
  const bool symmetric = zeros.numel() == 0;
  const Format rows = rows_of(packed, K / 2);
  const at::Tensor xf = lay_out(x, K / 32 * Int4::kXFloats, [&](auto* src, int64_t M, int64_t K_, float* out) {
    permute_int4(src, M, K_, symmetric, out);
  });
  if (symmetric) return apply(Int4Symmetric{{rows, scales16, nullptr, G, group_size / 32}}, x, xf, N, experts, E);
  return apply(Int4Zeros{{rows, scales16, static_cast<const uint16_t*>(zeros.data_ptr()), G, group_size / 32}}, x, xf,
               N, experts, E);
}
#endif

}  // namespace mixtral_matvec

#ifndef MIXTRAL_NO_ATEN
TORCH_LIBRARY(mixtral_kernels, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? experts, bool dot) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor q, Tensor scale, Tensor? experts) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group_size, Tensor? experts) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixtral_kernels, CPU, m) {
  m.impl("linear", &mixtral_matvec::linear);
  m.impl("linear_int8", &mixtral_matvec::linear_int8);
  m.impl("linear_int4", &mixtral_matvec::linear_int4);
}
#endif
