// Matrix-vector kernels for CPU decoding: y[m] = W x[m] for a few rows x[m], each weight read once from memory.
//
// Built at first use by mixtral/kernels/cpu.py for the AVX-512 levels (AVX512F/BW/VL/DQ, plus VNNI and AVX512_BF16
// by level; the levels below build matvec_portable.cpp instead); the Python API, its fallbacks and the weight
// layouts are in kernels/__init__.py.
// Shapes: M rows of x, K inputs, N outputs, E experts, T tokens, Kt experts per token, G = K / group_size.
//
// Every format reads a weight row as 64-byte chunks (16 fp32, 32 bf16, 64 int8 or 128 int4 columns) and widens
// each chunk to V vectors of 16 fp32 weights in registers, to multiply with V vectors of x; with AVX512_BF16 and bf16
// x, bf16 and int4 weights go to VDPBF16PS as bf16 pairs instead (Bf16Dot, Int4Bf16). A tile computes R
// output rows for up to 4 rows of x with 4 x R fp32 accumulators, streaming its R weight rows once; more rows of x
// re-run the tile on the same weight rows, which then come from L1/L2 rather than memory. Output rows are split
// between threads with at::parallel_for (torch's OpenMP pool), each streaming a contiguous range.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "plan.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using mixtral_plan::check;
using mixtral_plan::Group;
using mixtral_plan::out_shape;
using mixtral_plan::plan;

constexpr int kMaxMB = 4;             // rows of x per tile: MB * R accumulators stay within the 32 zmm registers
constexpr int kRows = 4;              // output rows per tile (R)
// Each of a tile's R weight streams prefetches this far ahead into L2 (8 KiB of the thread's stream for R = 4):
// measured best of 1-16 KiB, and into L1 or L2. Without it the hardware prefetchers leave a core at ~40% of its
// share of bandwidth; the out-of-order window alone covers too little of the memory latency.
constexpr int64_t kPrefetch = 2048;
// bf16 (VDPBF16PS) with at most 2 rows of x in all (decoding one sequence) and rows of at most kOneRowBytes streams
// one row at a time instead, so that each thread reads one sequential stream, prefetched as far ahead as the R
// streams together: 5-30% more bandwidth than R = 4 here at K = 1024 (in-process A/B), where fp32 measured the other
// way. It lost 5-20% from 3 rows of x on; on longer rows (K = 3584-14336) it measured -6% to +15%, within noise.
constexpr int64_t kPrefetchOneRow = 8192, kOneRowBytes = 4096;

#define UNROLL _Pragma("GCC unroll 16")  // a tile step's loops, so that its accumulators stay in registers

inline __mmask64 first_bytes(int64_t n) { return n >= 64 ? ~0ull : n <= 0 ? 0ull : (1ull << n) - 1; }

// int4 scales and zeros are fp16 (as llama.cpp's block scales): 16 fp32 copies of one.
inline __m512 broadcast_half(uint16_t h) { return _mm512_cvtph_ps(_mm256_set1_epi16(short(h))); }

// ---- weight formats ------------------------------------------------------------------------------------------
// kCols columns per 64-byte chunk of a row; V vectors of x (64 V bytes) per chunk. `chunk` makes what `weights`
// widens from a chunk's address (the address itself, or with the int4 group's table); `finish` ends a row's dot
// product. `group(s)` is per-chunk state shared by the R rows of a tile.

struct Rows {
  static constexpr bool kPaddedX = false;  // x rows padded to whole chunks (int4's permuted x), else cut at K
  static constexpr bool kOneRow = false;   // one weight row a tile for 1-2 rows of x: see kPrefetchOneRow
  static constexpr bool kWholeChunk = false;  // unpack() and dot() per chunk instead of weights() and madd()
  const uint8_t* base;
  int64_t row_bytes;
  const uint8_t* row(int64_t n) const { return base + n * row_bytes; }
  Rows expert(int64_t e, int64_t N) const { return {base + e * N * row_bytes, row_bytes}; }
  int64_t group(int64_t) const { return 0; }
  static __m512 madd(__m512 acc, __m512 w, __m512 x) { return _mm512_fmadd_ps(w, x, acc); }
  float finish(int64_t, float acc) const { return acc; }
};

struct Fp32 : Rows {
  static constexpr int kCols = 16, V = 1;
  using Chunk = const uint8_t*;
  Fp32 expert(int64_t e, int64_t N) const { return {Rows::expert(e, N)}; }
  Chunk chunk(const uint8_t* p, int64_t, int64_t) const { return p; }
  static __m512 weights(Chunk w, int) { return _mm512_loadu_ps(w); }
};

// A bf16 is the top half of an fp32: zero-extend and shift. For CPUs without AVX512_BF16.
struct Bf16 : Fp32 {
  static constexpr int kCols = 32, V = 2;
  Bf16 expert(int64_t e, int64_t N) const { return {Fp32::expert(e, N)}; }
  static __m512 weights(Chunk w, int v) {
    const __m256i h = _mm256_loadu_si256((const __m256i*)(w + 32 * v));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
};

#ifdef __AVX512BF16__
// bf16 weights times bf16 x in pairs by VDPBF16PS into fp32 accumulators (bf16 products are exact in fp32): 32
// columns per instruction, x kept in bf16.
struct Bf16Dot : Fp32 {
  static constexpr int kCols = 32, V = 1;
  static constexpr bool kOneRow = true;
  Bf16Dot expert(int64_t e, int64_t N) const { return {Fp32::expert(e, N)}; }
  static __m512 madd(__m512 acc, __m512 w, __m512 x) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x); }
};
#endif

// int8 codes sign-extended and converted, times one fp32 scale per row applied to the finished dot product.
struct Int8 : Fp32 {
  static constexpr int kCols = 64, V = 4;
  const float* scale;
  Int8 expert(int64_t e, int64_t N) const { return {Fp32::expert(e, N), scale + e * N}; }
  static __m512 weights(Chunk w, int v) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + 16 * v))));
  }
  float finish(int64_t n, float acc) const { return acc * scale[n]; }
};

// int8 codes in groups of a multiple of 32 columns (llama.cpp's Q8_0: blocks of 32), an fp16 scale each. A chunk's
// halves (columns 64s..64s+31, 64s+32..64s+63) each lie in one group: vectors 0-1 take the first's scale, 2-3 the
// second's, multiplied into the widened codes. kBlocks32: groups of 32 (Q8_0), the halves' groups 2s and 2s + 1,
// with no division a chunk and row (as Int4Groups: the loop's run-time arithmetic is what the kernels can spare).
template <bool kBlocks32>
struct Int8Groups : Fp32 {
  static constexpr int kCols = 64, V = 4;
  struct Chunk {
    const uint8_t* codes;
    __m512 scale[2];
  };
  const uint16_t* scales;  // fp16 (N, G)
  int64_t G, group_size;
  Int8Groups expert(int64_t e, int64_t N) const { return {Fp32::expert(e, N), scales + e * N * G, G, group_size}; }
  int64_t group(int64_t s) const { return s; }  // the chunk index: chunk() finds its groups
  Chunk chunk(const uint8_t* p, int64_t n, int64_t s) const {
    const uint16_t* row = scales + n * G;  // a last half chunk (K = 32 mod 64) has no second group: its x is zero
    const int64_t first = kBlocks32 ? 2 * s : 64 * s / group_size;
    const int64_t second = std::min(G - 1, kBlocks32 ? 2 * s + 1 : (64 * s + 32) / group_size);
    return {p, {broadcast_half(row[first]), broadcast_half(row[second])}};
  }
  static __m512 weights(const Chunk& w, int v) {
    const __m128i codes = _mm_loadu_si128((const __m128i*)(w.codes + 16 * v));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)), w.scale[v >> 1]);
  }
};

// Lane j (columns 8j..8j+7 of a 128-column chunk) gets value j >> kShift of the chunk's groups, which start at p
// with `left` of them left in the row (none read past it): per-lane scales or zeros for groups of 32 (kShift 2) or
// 64 (3).
template <int kShift>
inline __m512 spread_groups(const uint16_t* p, int64_t left) {
  constexpr int64_t kGroups = 16 >> kShift;  // groups a chunk
  const __mmask16 valid = left >= kGroups ? __mmask16((1u << kGroups) - 1) : __mmask16((1u << left) - 1);
  const __m512i lane_group =
      _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), kShift);
  return _mm512_permutexvar_ps(lane_group, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, p)));
}

// int4 codes, two a byte (column 2i in the low nibble of byte i), in 128-column chunks of 64 bytes: dword j holds
// columns 8j..8j+7, column 8j+v in bits 4v..4v+3. Any group size the kernels take (32, 64, 128k): lane j (columns
// 8j..8j+7) lies in one group, j >> kShift of the chunk, so each lane takes its own group's scale and zero
// (spread_groups) and a chunk's products are summed per lane before the scale is applied, once a chunk. The codes
// become numbers by bit operations only, as a constant plus the code (c + q, below); with w = q * scale + zero,
// w.x = scale * sum((c + q) x) + (zero - c scale) * sum(x), and symmetric int4 (zero = -8 scale) folds the second
// term into the first: scale * (sum((c + q) x) - (c + 8) sum(x)), the -(c + 8) sum(x) laid out with x. x is permuted
// to match (permute_for_int4*), then each chunk's 16 lane sums of x. K need not be a multiple of 128: the last
// chunk's missing codes are zero, times x padded with zeros.
// kShift (2: groups of 32, 3: 64, 4: 128k, one group a chunk) and kSym (no zeros) are template arguments, so that
// a chunk's scales take a few vector instructions and no branches: as run-time values they made ~55 instructions
// a row and chunk where ~20 do, and the kernel read 17-22 GB/s from L3 instead of 36 (2 threads, session 28).
template <int kShift, bool kSym>
struct Int4Groups : Rows {
  static constexpr int kShiftArg = kShift;
  static constexpr bool kSymArg = kSym;
  static constexpr int kCols = 128;
  static constexpr bool kPaddedX = true, kWholeChunk = true;
  struct Chunk {
    __m512i codes;
    __m512 scale, zero;  // per lane: the group's scale, and zero - c scale (unused when symmetric)
  };
  const uint16_t* scales;  // fp16
  const uint16_t* zeros;   // null when kSym
  int64_t G;
  int64_t chunks_per_group;  // groups of 128k columns: k, else 1
  Int4Groups at_expert(int64_t e, int64_t N) const {
    return {Rows::expert(e, N), scales + e * N * G, kSym ? nullptr : zeros + e * N * G, G, chunks_per_group};
  }
  int64_t group(int64_t s) const { return s; }  // the chunk index: chunk() finds its groups
  // The chunk's codes, and its lanes' scales and zero terms for codes that come with the constant c. Whole: a chunk
  // before the row's last partial one (std::true_type), whose groups all lie in the row: no mask to compute.
  template <class Whole>
  Chunk chunk_for(const uint8_t* p, int64_t n, int64_t s, float c, Whole) const {
    __m512 scale, zero;
    if constexpr (kShift == 4) {  // one group for the whole chunk: one value broadcast
      const int64_t g = n * G + uint32_t(s) / uint32_t(chunks_per_group);
      scale = broadcast_half(scales[g]);
      if constexpr (!kSym) zero = broadcast_half(zeros[g]);
    } else {  // groups of 32 or 64 (chunks_per_group is 1)
      const int64_t g0 = s * (16 >> kShift), left = Whole::value ? 16 >> kShift : G - g0;
      scale = spread_groups<kShift>(scales + n * G + g0, left);
      if constexpr (!kSym) zero = spread_groups<kShift>(zeros + n * G + g0, left);
    }
    if constexpr (kSym) return {_mm512_loadu_si512(p), scale, scale};
    else return {_mm512_loadu_si512(p), scale, _mm512_fnmadd_ps(_mm512_set1_ps(c), scale, zero)};
  }
  // Per-lane sums in `part` (started at x's lane sums when symmetric) -> acc + scale * part (+ zero term).
  static __m512 finish_chunk(__m512 acc, const Chunk& ch, __m512 part, __m512 sums) {
    acc = _mm512_fmadd_ps(part, ch.scale, acc);
    if constexpr (kSym) return acc;
    else return _mm512_fmadd_ps(ch.zero, sums, acc);
  }
};

// int4 times fp32 x (AVX-512 without BF16, or fp32 x): vector v holds code v of every dword moved to the top 4
// mantissa bits of an fp32 16.0 (a shift and one VPTERNLOG), the value 16 + q: c = 16, 16 products an FMA. x's layout
// (permute_for_int4): 8 fp32 vectors, vector v lane j column 8j + v, then the 16 lane sums.
template <int kShift, bool kSym>
struct Int4Fp32 : Int4Groups<kShift, kSym> {
  using Base = Int4Groups<kShift, kSym>;
  using Chunk = typename Base::Chunk;
  static constexpr int V = 9;
  static constexpr float kOffset = 16.0f;  // c
  Int4Fp32 expert(int64_t e, int64_t N) const { return {this->at_expert(e, N)}; }
  template <class Whole>
  Chunk chunk(const uint8_t* p, int64_t n, int64_t s, Whole whole) const {
    return this->chunk_for(p, n, s, kOffset, whole);
  }
  struct Unpacked {
    __m512 w[8];
  };
  static Unpacked unpack(const Chunk& ch) {
    const __m512i mask = _mm512_set1_epi32(0x00780000), sixteen = _mm512_set1_epi32(0x41800000);  // bits 19-22; 16.0
    Unpacked u;
    UNROLL
    for (int v = 0; v < 8; ++v) {  // code v (bits 4v..4v+3) to bits 19..22: (A & B) | C is VPTERNLOG's 0xEA
      const __m512i at = v <= 4 ? _mm512_slli_epi32(ch.codes, 19 - 4 * v) : _mm512_srli_epi32(ch.codes, 4 * v - 19);
      u.w[v] = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(at, mask, sixteen, 0xEA));
    }
    return u;
  }
  __m512 dot(__m512 acc, const Chunk& ch, const Unpacked& u, const uint8_t* x) const {
    const __m512 sums = _mm512_loadu_ps(x + 512);
    __m512 a = _mm512_fmadd_ps(u.w[0], _mm512_loadu_ps(x), kSym ? sums : _mm512_setzero_ps());
    __m512 b = _mm512_mul_ps(u.w[1], _mm512_loadu_ps(x + 64));
    UNROLL
    for (int v = 2; v < 8; v += 2) {
      a = _mm512_fmadd_ps(u.w[v], _mm512_loadu_ps(x + 64 * v), a);
      b = _mm512_fmadd_ps(u.w[v + 1], _mm512_loadu_ps(x + 64 * v + 64), b);
    }
    return Base::finish_chunk(acc, ch, _mm512_add_ps(a, b), sums);
  }
};

// int4 in groups of 128k columns times fp32 x, by table: a chunk lies in one group, so VPERMPS looks each code up
// in a 16-entry table of q * scale + zero for the row and group, a shift and a lookup a vector (faster here than
// Int4Fp32's per-lane sums where one value serves the chunk: 20-24 vs 17-20 GB/s). x: permute_for_int4 without
// the lane sums.
struct Int4Table : Rows {
  static constexpr int kCols = 128, V = 8;
  static constexpr bool kPaddedX = true;
  struct Chunk {
    const uint8_t* codes;
    __m512 table;
  };
  const uint16_t* scales;  // fp16
  const uint16_t* zeros;  // null: symmetric, w = (q - 8) scale
  int64_t G;
  uint32_t chunks_per_group;
  Int4Table expert(int64_t e, int64_t N) const {
    return {Rows::expert(e, N), scales + e * N * G, zeros ? zeros + e * N * G : nullptr, G, chunks_per_group};
  }
  int64_t group(int64_t s) const { return uint32_t(s) / chunks_per_group; }
  Chunk chunk(const uint8_t* p, int64_t n, int64_t g) const {
    const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 scale = broadcast_half(scales[n * G + g]);
    const __m512 zero = zeros ? broadcast_half(zeros[n * G + g]) : _mm512_mul_ps(_mm512_set1_ps(-8.0f), scale);
    return {p, _mm512_fmadd_ps(codes, scale, zero)};
  }
  static __m512 weights(const Chunk& w, int v) {
    const __m512i codes = _mm512_loadu_si512(w.codes);
    return _mm512_permutexvar_ps(v == 0 ? codes : _mm512_srli_epi32(codes, 4 * v), w.table);
  }
};

#ifdef __AVX512BF16__
// int4 codes times bf16 x by VDPBF16PS, any group size the kernels take (32, 64, 128k): exact products, as weight-
// only quantization means. A chunk's 64 bytes are 32 words of 4 codes each (columns 4i..4i+3 of the chunk in word i);
// vector v takes code v of every word beside the byte 0x43 (a shift and one VPTERNLOG, no shuffles), a bf16 of value
// 128 + code, 32 weights an instruction. So a lane's sum is sum((128 + q) x) = sum(q x) + 128 sum(x), and with w = q
// * scale + zero, w.x = scale * that + (zero - 128 scale) * sum(x); symmetric int4 (zero = -8 scale) folds the second
// term into the first: scale * (that - 136 sum(x)), the -136 sum(x) laid out with x. Dword lane j of a chunk sums
// columns 8j..8j+7 (words 2j, 2j + 1: one 32-column block, j / 4), so per-lane scales and zeros come as in
// Int4Groups (c = 128); x is laid out to match (permute_for_int4_bf16): 4 bf16 vectors, vector v word i column
// 4i + v, then the 16 lane sums of x (times -136 when symmetric).
template <int kShift, bool kSym>
struct Int4Bf16 : Int4Groups<kShift, kSym> {
  using Base = Int4Groups<kShift, kSym>;
  using Chunk = typename Base::Chunk;
  static constexpr int V = 5;
  static constexpr float kOffset = 128.0f;  // c
  Int4Bf16 expert(int64_t e, int64_t N) const { return {this->at_expert(e, N)}; }
  template <class Whole>
  Chunk chunk(const uint8_t* p, int64_t n, int64_t s, Whole whole) const {
    return this->chunk_for(p, n, s, kOffset, whole);
  }
  struct Unpacked {
    __m512i w[4];  // 128 bf16 weights (128 + code), in the order permute_for_int4_bf16 gives x
  };
  static Unpacked unpack(const Chunk& c) {
    const __m512i low4 = _mm512_set1_epi16(0x000F), bf16_128 = _mm512_set1_epi16(0x4300);
    // (a & low4) | bf16_128: VPTERNLOG's table for (A & B) | C is 0xEA
    return {{_mm512_ternarylogic_epi32(c.codes, low4, bf16_128, 0xEA),
             _mm512_ternarylogic_epi32(_mm512_srli_epi16(c.codes, 4), low4, bf16_128, 0xEA),
             _mm512_ternarylogic_epi32(_mm512_srli_epi16(c.codes, 8), low4, bf16_128, 0xEA),
             _mm512_or_si512(_mm512_srli_epi16(c.codes, 12), bf16_128)}};
  }
  // acc + this chunk's products with x's chunk (4 bf16 vectors, then the lane sums of x), in two chains.
  __m512 dot(__m512 acc, const Chunk& c, const Unpacked& u, const uint8_t* x) const {
    const __m512 sums = _mm512_loadu_ps(x + 256);
    __m512 a = _mm512_dpbf16_ps(kSym ? sums : _mm512_setzero_ps(), (__m512bh)u.w[0], (__m512bh)_mm512_loadu_ps(x));
    __m512 b = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)u.w[1], (__m512bh)_mm512_loadu_ps(x + 64));
    a = _mm512_dpbf16_ps(a, (__m512bh)u.w[2], (__m512bh)_mm512_loadu_ps(x + 128));
    b = _mm512_dpbf16_ps(b, (__m512bh)u.w[3], (__m512bh)_mm512_loadu_ps(x + 192));
    return Base::finish_chunk(acc, c, _mm512_add_ps(a, b), sums);
  }
};
#endif

// ---- the tile: R output rows x MB rows of x --------------------------------------------------------------------
template <class F, int MB, int R, class O>
inline void tile(const F& f, int64_t n0, int64_t K, const uint8_t* const* x, O* const* y) {
  __m512 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = f.row(n0 + r);

  // One chunk: weights w[r] (64 bytes of row r) times x chunks xs[m] (64 V bytes of x row m).
  auto step = [&](int64_t s, const uint8_t* const* w, const uint8_t* const* xs, auto whole)
                  __attribute__((always_inline)) {
    const int64_t g = f.group(s);
    if constexpr (F::kWholeChunk) {  // a row's chunk unpacked once for all rows of x, which dot() reads from L1
      UNROLL
      for (int r = 0; r < R; ++r) {  // one row's chunk at a time: R chunks at once would not fit the registers
        const typename F::Chunk chunk = f.chunk(w[r], n0 + r, g, whole);
        const typename F::Unpacked wr = F::unpack(chunk);
        UNROLL
        for (int m = 0; m < MB; ++m) acc[m][r] = f.dot(acc[m][r], chunk, wr, xs[m]);
      }
    } else {
      typename F::Chunk chunks[R];
      UNROLL
      for (int r = 0; r < R; ++r) chunks[r] = f.chunk(w[r], n0 + r, g);
      UNROLL
      for (int v = 0; v < F::V; ++v) {
        __m512 xv[MB];
        UNROLL
        for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_ps(xs[m] + 64 * v);
        UNROLL
        for (int r = 0; r < R; ++r) {
          const __m512 wv = F::weights(chunks[r], v);
          UNROLL
          for (int m = 0; m < MB; ++m) acc[m][r] = F::madd(acc[m][r], wv, xv[m]);
        }
      }
    }
  };
  const int64_t steps = K / F::kCols, rest = K % F::kCols, row_bytes = f.row_bytes;
  // Row r's stream continues in row r + R, of the next tile: prefetch that far ahead along it.
  constexpr int64_t prefetch = R == 1 ? kPrefetchOneRow : kPrefetch;
  int64_t pf_block = prefetch / row_bytes, pf_offset = prefetch % row_bytes;
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* w[R];
    const uint8_t* xs[MB];
    const int64_t pf = pf_block * R * row_bytes + pf_offset - 64 * s;
    for (int r = 0; r < R; ++r) {
      w[r] = rows[r] + 64 * s;
      _mm_prefetch((const char*)w[r] + pf, _MM_HINT_T1);
    }
    for (pf_offset += 64; pf_offset >= row_bytes; pf_offset -= row_bytes) ++pf_block;
    for (int m = 0; m < MB; ++m) xs[m] = x[m] + 64 * F::V * s;
    step(s, w, xs, std::true_type{});
  }
  if (rest) {  // the partial last chunk, copied zero-padded: zero weights times zero x
    alignas(64) uint8_t wbuf[R][64], xbuf[MB][64 * F::V];
    const uint8_t* w[R];
    const uint8_t* xs[MB];
    for (int r = 0; r < R; ++r) {
      _mm512_store_si512(wbuf[r], _mm512_maskz_loadu_epi8(first_bytes(rest * 64 / F::kCols), rows[r] + 64 * steps));
      w[r] = wbuf[r];
    }
    const int64_t x_bytes = F::kPaddedX ? 64 * F::V : rest * 64 * F::V / F::kCols;
    for (int m = 0; m < MB; ++m) {
      for (int v = 0; v < F::V; ++v)
        _mm512_store_si512(xbuf[m] + 64 * v,
                           _mm512_maskz_loadu_epi8(first_bytes(x_bytes - 64 * v), x[m] + 64 * F::V * steps + 64 * v));
      xs[m] = xbuf[m];
    }
    step(steps, w, xs, std::false_type{});
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) y[m][n0 + r] = O(f.finish(n0 + r, _mm512_reduce_add_ps(acc[m][r])));  // bf16: RNE
}

// R rows starting at n0 for all M rows of x, in chunks of up to kMaxMB rows.
template <class F, int R, class O>
void rows(const F& f, int64_t n0, int64_t K, const uint8_t* const* x, O* const* y, int64_t M) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxMB) {
    switch (std::min<int64_t>(kMaxMB, M - m0)) {
      case 1: tile<F, 1, R, O>(f, n0, K, x + m0, y + m0); break;
      case 2: tile<F, 2, R, O>(f, n0, K, x + m0, y + m0); break;
      case 3: tile<F, 3, R, O>(f, n0, K, x + m0, y + m0); break;
      default: tile<F, 4, R, O>(f, n0, K, x + m0, y + m0); break;
    }
  }
}

// Runs format f over every group: the parallel range is (group, block of R rows), contiguous per thread.
template <class F, class O, int R>
void run_tiles(const F& f, const std::vector<Group<O>>& groups, int64_t N, int64_t K) {
  const int64_t blocks = (N + R - 1) / R;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (f.row_bytes * R));  // >= 64 KiB of weights a thread
  at::parallel_for(0, int64_t(groups.size()) * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Group<O>& g = groups[i / blocks];
      const F fe = f.expert(g.expert, N);
      const int64_t n0 = (i % blocks) * R, M = int64_t(g.x.size());
      if (n0 + R <= N) {
        rows<F, R, O>(fe, n0, K, g.x.data(), g.y.data(), M);
      } else {
        for (int64_t n = n0; n < N; ++n) rows<F, 1, O>(fe, n, K, g.x.data(), g.y.data(), M);
      }
    }
  });
}

template <class F, class O>
void run(const F& f, const std::vector<Group<O>>& groups, int64_t N, int64_t K) {
  size_t rows = 0;  // of x, over all groups
  for (const Group<O>& g : groups) rows += g.x.size();
  if (F::kOneRow && rows <= 2 && f.row_bytes <= kOneRowBytes)
    run_tiles<F, O, 1>(f, groups, N, K);
  else
    run_tiles<F, O, kRows>(f, groups, N, K);
}

// ---- ops -----------------------------------------------------------------------------------------------------
// Each takes x (..., K) and weights (N, ...), returning (..., N); or x (T, K), weights (E, N, ...) and experts
// (T, Kt), returning (T, Kt, N). The result has x's dtype, written by the kernels for fp32 and bf16.

// x as the format reads it: `xk` (M, K) in the format's x dtype, contiguous (int4: K padded to whole chunks).
template <class F>
at::Tensor apply(const F& f, const at::Tensor& x, const at::Tensor& xk, int64_t N,
                 const std::optional<at::Tensor>& experts, int64_t E) {
  const std::vector<int64_t> shape = out_shape(x, N, experts);
  const int64_t K = x.size(-1);  // xk may be padded (int4)
  if (x.scalar_type() == at::kBFloat16) {
    at::Tensor out = at::empty(shape, x.options());
    run(f, plan(xk, out.data_ptr<at::BFloat16>(), N, experts, E), N, K);
    return out;
  }
  at::Tensor out = at::empty(shape, x.options().dtype(at::kFloat));
  run(f, plan(xk, out.data_ptr<float>(), N, experts, E), N, K);
  return out.to(x.scalar_type());  // a no-op for fp32
}

at::Tensor rows_as(const at::Tensor& x, at::ScalarType dtype) {
  return x.reshape({-1, x.size(-1)}).to(dtype).contiguous();  // (M, K)
}

Rows rows_of(const at::Tensor& w, int64_t row_bytes) { return {static_cast<const uint8_t*>(w.data_ptr()), row_bytes}; }

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& experts, bool dot) {
  const int64_t K = w.size(-1), N = w.size(-2), E = experts ? w.size(0) : 1;
  check(x, w, K, experts);
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "x and w must have the same dtype");
  if (w.scalar_type() == at::kFloat) return apply(Fp32{rows_of(w, 4 * K)}, x, rows_as(x, at::kFloat), N, experts, E);
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "w must be float32 or bfloat16");
#ifdef __AVX512BF16__
  if (dot) return apply(Bf16Dot{rows_of(w, 2 * K)}, x, rows_as(x, at::kBFloat16), N, experts, E);
#endif
  return apply(Bf16{rows_of(w, 2 * K)}, x, rows_as(x, at::kFloat), N, experts, E);
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       const std::optional<at::Tensor>& experts) {
  const int64_t K = q.size(-1), N = q.size(-2), E = experts ? q.size(0) : 1;
  check(x, q, K, experts);
  if (const int64_t G = mixtral_plan::int8_groups(q, scale, bool(experts))) {
    const auto* scales16 = static_cast<const uint16_t*>(scale.data_ptr());
    if (K / G == 32)
      return apply(Int8Groups<true>{{rows_of(q, K)}, scales16, G, 32}, x, rows_as(x, at::kFloat), N, experts, E);
    return apply(Int8Groups<false>{{rows_of(q, K)}, scales16, G, K / G}, x, rows_as(x, at::kFloat), N, experts, E);
  }
  const Int8 f{{rows_of(q, K)}, scale.data_ptr<float>()};
  return apply(f, x, rows_as(x, at::kFloat), N, experts, E);
}

// x as (M, L * chunks) fp32 for Int4Fp32 (L = 144) and Int4Table (L = 128, no sums). Per chunk of 128 columns: its
// values reordered as the codes unpack, xp[L c + 16v + j] = x[128c + 8j + v], then (L = 144) the 16 lane sums over v,
// times sum_scale. Zero past K.
at::Tensor permute_for_int4(const at::Tensor& x, bool sums, float sum_scale) {
  const at::Tensor x32 = rows_as(x, at::kFloat);
  const int64_t M = x32.size(0), K = x32.size(1), chunks = (K + 127) / 128, L = sums ? 144 : 128;
  at::Tensor xp = at::empty({M, L * chunks}, x32.options());
  const __m512i stride8 = _mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120);
  for (int64_t m = 0; m < M; ++m) {
    const float* src = x32.data_ptr<float>() + m * K;
    float* dst = xp.data_ptr<float>() + m * L * chunks;
    for (int64_t c = 0; c < chunks; ++c) {
      __m512 sum = _mm512_setzero_ps();
      for (int v = 0; v < 8; ++v) {
        // lane j reads column 128c + 8j + v: the lanes below K - 128c - v, all of them in a whole chunk
        const int64_t left = K - 128 * c - v, lanes = left <= 0 ? 0 : std::min<int64_t>(16, (left + 7) / 8);
        const __mmask16 in = (__mmask16)((1u << lanes) - 1);
        const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, stride8, src + 128 * c + v, 4);
        _mm512_storeu_ps(dst + L * c + 16 * v, xv);
        sum = _mm512_add_ps(sum, xv);
      }
      if (sums) _mm512_storeu_ps(dst + L * c + 128, _mm512_mul_ps(sum, _mm512_set1_ps(sum_scale)));
    }
  }
  return xp;
}

#ifdef __AVX512BF16__
// bf16 x as (M, 320 * chunks) bytes for Int4Bf16. Per chunk of 128 columns: the 4 bf16 vectors that meet the unpacked
// codes (vector v, word i: column 4i + v), then the 16 fp32 sums of x over each dword lane's 8 columns (words 2j and
// 2j + 1 of the 4 vectors: columns 8j..8j+7), times sum_scale. Zero past K.
at::Tensor permute_for_int4_bf16(const at::Tensor& x, float sum_scale) {
  const at::Tensor xb = rows_as(x, at::kBFloat16);
  const int64_t M = xb.size(0), K = xb.size(1), chunks = (K + 127) / 128;
  at::Tensor xp = at::empty({M, 320 * chunks}, xb.options().dtype(at::kByte));
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* src = static_cast<const uint16_t*>(xb.data_ptr()) + m * K;
    uint8_t* dst = xp.data_ptr<uint8_t>() + m * 320 * chunks;
    for (int64_t c = 0; c < chunks; ++c) {
      uint16_t* words = reinterpret_cast<uint16_t*>(dst + 320 * c);
      float* sums = reinterpret_cast<float*>(dst + 320 * c + 256);
      alignas(64) uint16_t cols[128];  // the chunk's columns, zero past K
      const int64_t n = std::min<int64_t>(128, K - 128 * c);
      std::memcpy(cols, src + 128 * c, 2 * n);
      std::fill(cols + n, cols + 128, uint16_t(0));
      const __m512i a0 = _mm512_load_si512(cols), a1 = _mm512_load_si512(cols + 32),
                    a2 = _mm512_load_si512(cols + 64), a3 = _mm512_load_si512(cols + 96);
      // word i of vector v: column 4i + v, from a0:a1 for i < 16 and a2:a3 above (index 4i + v mod 64)
      const __m512i index = _mm512_setr_epi32(0x00040000, 0x000c0008, 0x00140010, 0x001c0018, 0x00240020, 0x002c0028,
                                              0x00340030, 0x003c0038, 0x00040000, 0x000c0008, 0x00140010, 0x001c0018,
                                              0x00240020, 0x002c0028, 0x00340030, 0x003c0038);
      __m512 sum = _mm512_setzero_ps();
      for (int v = 0; v < 4; ++v) {
        const __m512i in_v = _mm512_add_epi16(index, _mm512_set1_epi16(short(v)));
        const __m512i w = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_permutex2var_epi16(a0, in_v, a1),
                                                  _mm512_permutex2var_epi16(a2, in_v, a3));
        _mm512_storeu_si512(words + 32 * v, w);
        // dword lane j holds columns 8j + v (low word) and 8j + 4 + v (high word), as fp32 bf16's top halves
        sum = _mm512_add_ps(sum, _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)),
                                               _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(-65536)))));
      }
      _mm512_storeu_ps(sums, _mm512_mul_ps(sum, _mm512_set1_ps(sum_scale)));
    }
  }
  return xp;
}
#endif

// fn(Int4Groups<kShift, kSym>{...}) for the group size and the zeros (none: symmetric), chosen once a call.
template <class Fn>
at::Tensor with_int4_groups(int64_t group_size, bool sym, const Rows& rows, const uint16_t* scales,
                            const uint16_t* zeros, int64_t G, const Fn& fn) {
  const int64_t per_group = std::max<int64_t>(1, group_size / 128);
  auto pick = [&](auto shift) {
    if (sym) return fn(Int4Groups<decltype(shift)::value, true>{rows, scales, nullptr, G, per_group});
    return fn(Int4Groups<decltype(shift)::value, false>{rows, scales, zeros, G, per_group});
  };
  if (group_size == 32) return pick(std::integral_constant<int, 2>{});
  if (group_size == 64) return pick(std::integral_constant<int, 3>{});
  return pick(std::integral_constant<int, 4>{});
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& zeros, int64_t group_size, const std::optional<at::Tensor>& experts) {
  const int64_t K = packed.size(-1) * 2, N = packed.size(-2), E = experts ? packed.size(0) : 1;
  check(x, packed, K, experts);
  const int64_t G = mixtral_plan::int4_groups(packed, scales, zeros, group_size,
                                              group_size == 32 || group_size == 64 || group_size % 128 == 0,
                                              "32, 64 or a multiple of 128", bool(experts));
  const auto* scales16 = static_cast<const uint16_t*>(scales.data_ptr());
  const auto* zeros16 = zeros.numel() ? static_cast<const uint16_t*>(zeros.data_ptr()) : nullptr;
  const Rows rows = rows_of(packed, K / 2);
  // symmetric: x's lane sums times -(c + 8), the codes' constant and Q4_0's zero point
#ifdef __AVX512BF16__
  if (x.scalar_type() == at::kBFloat16) {
    const at::Tensor xk = permute_for_int4_bf16(x, zeros16 ? 1.0f : -(Int4Bf16<2, true>::kOffset + 8));
    return with_int4_groups(group_size, !zeros16, rows, scales16, zeros16, G, [&](const auto& groups) {
      using G_ = std::decay_t<decltype(groups)>;
      return apply(Int4Bf16<G_::kShiftArg, G_::kSymArg>{groups}, x, xk, N, experts, E);
    });
  }
#endif
  if (group_size % 128 == 0)
    return apply(Int4Table{rows, scales16, zeros16, G, uint32_t(group_size / 128)}, x,
                 permute_for_int4(x, false, 0.0f), N, experts, E);
  const at::Tensor xk = permute_for_int4(x, true, zeros16 ? 1.0f : -(Int4Fp32<2, true>::kOffset + 8));
  return with_int4_groups(group_size, !zeros16, rows, scales16, zeros16, G, [&](const auto& groups) -> at::Tensor {
    using G_ = std::decay_t<decltype(groups)>;
    if constexpr (G_::kShiftArg == 4) {
      TORCH_CHECK(false, "unreachable: groups of 128k take the table");
    } else {
      return apply(Int4Fp32<G_::kShiftArg, G_::kSymArg>{groups}, x, xk, N, experts, E);
    }
  });
}

}  // namespace

TORCH_LIBRARY(mixtral_kernels, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? experts, bool dot) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor q, Tensor scale, Tensor? experts) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group_size, Tensor? experts) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixtral_kernels, CPU, m) {
  m.impl("linear", &linear);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
}
