// The kernels' cores without torch, against scalar references on random data: built by tests/test_kernels.py for
// aarch64 NEON with a cross compiler and run under qemu-user (and natively for the host's levels, to check this
// program itself). Prints one line per check and "ok" at the end; exits 1 on the first mismatch.
#define MIXTRAL_NO_ATEN 1
#include "../../src/mixtral/kernels/attention.cpp"
#include "../../src/mixtral/kernels/experts.cpp"
#include "../../src/mixtral/kernels/matvec_portable.cpp"
#include "../../src/mixtral/kernels/prefill_attention.cpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace simd = mixtral_simd;
using B16 = simd::BFloat16;
using simd::W;

static std::mt19937 rng(0);
static float randn() { return std::normal_distribution<float>(0.0f, 1.0f)(rng); }
static std::vector<float> randn(size_t n) {
  std::vector<float> v(n);
  for (float& x : v) x = randn();
  return v;
}
static uint16_t to_half(float f) {  // fp32 -> fp16 bits, round to nearest (values here are normal and small)
  uint32_t b;
  std::memcpy(&b, &f, 4);
  const uint32_t sign = (b >> 16) & 0x8000, mant = b & 0x7fffff;
  const int exp = int((b >> 23) & 0xff) - 127 + 15;
  if (exp <= 0) return uint16_t(sign);
  uint32_t h = sign | (uint32_t(exp) << 10) | (mant >> 13);
  if ((mant & 0x1fff) > 0x1000 || ((mant & 0x1fff) == 0x1000 && (h & 1))) ++h;
  return uint16_t(h);
}

static int failures = 0;
static void expect_close(const char* what, const std::vector<float>& ours, const std::vector<double>& ref,
                         double rel = 1e-5) {
  double scale = 0, worst = 0;
  for (double r : ref) scale = std::max(scale, std::fabs(r));
  for (size_t i = 0; i < ref.size(); ++i) worst = std::max(worst, std::fabs(ours[i] - ref[i]));
  const bool ok = worst <= rel * scale + 1e-6;
  std::printf("%-48s max error %.3g of %.3g %s\n", what, worst, scale, ok ? "" : "MISMATCH");
  if (!ok) ++failures;
}

// y = w x for the format's weights given as floats w (E, N, K), through the kernel's plan and run; experts routed.
template <class F>
static void check_matvec(const char* what, const F& f, const std::vector<float>& w, int64_t E, int64_t N, int64_t K,
                         int64_t M, const std::vector<float>& xf, int64_t x_floats, const std::vector<float>& x,
                         const std::vector<int64_t>* ids) {
  const int64_t Kt = ids ? int64_t(ids->size()) / M : 1;
  std::vector<float> y(M * Kt * N);
  std::vector<mixtral_plan::Group<float>> groups;
  mixtral_plan::plan<float>(reinterpret_cast<const uint8_t*>(xf.data()), 4 * x_floats, M, y.data(), N,
                            ids ? ids->data() : nullptr, Kt, E, groups);
  mixtral_matvec::run(f, groups, N, K);
  std::vector<double> ref(M * Kt * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < Kt; ++j)
      for (int64_t n = 0; n < N; ++n) {
        const int64_t e = ids ? (*ids)[m * Kt + j] : 0;
        double s = 0;
        for (int64_t k = 0; k < K; ++k) s += double(w[(e * N + n) * K + k]) * x[m * K + k];
        ref[(m * Kt + j) * N + n] = s;
      }
  expect_close(what, y, ref);
}

static void matvec_tests() {
  using namespace mixtral_matvec;
  const int64_t E = 3;
  for (int64_t M : {1, 2, 3, 5}) {
    const std::vector<int64_t> ids = [&] {
      std::vector<int64_t> v(M * 2);
      for (int64_t i = 0; i < M * 2; ++i) v[i] = (i * 7 + 1) % E;
      return v;
    }();
    for (const auto& [N, K] : std::vector<std::pair<int64_t, int64_t>>{{37, 96}, {5, 77}, {3, 256}, {9, 33}}) {
      const std::vector<float> x = randn(M * K);
      char what[96];
      for (const std::vector<int64_t>* routed : {(const std::vector<int64_t>*)nullptr, &ids}) {
        const int64_t e = routed ? E : 1;
        std::vector<float> w = randn(e * N * K);
        // fp32 and bf16 (weights rounded to bf16 first: the reference uses the rounded values)
        std::vector<float> xp((K + 2 * W - 1) / (2 * W) * (2 * W) * M);
        pad_rows(x.data(), M, K, 2 * W, xp.data());
        const int64_t kp = int64_t(xp.size()) / M;
        std::snprintf(what, sizeof what, "fp32 M=%ld N=%ld K=%ld%s", long(M), long(N), long(K), routed ? " experts" : "");
        check_matvec(what, Fp32{{reinterpret_cast<const uint8_t*>(w.data()), 4 * K}}, w, e, N, K, M, xp, kp, x, routed);
        std::vector<B16> wb(w.begin(), w.end());
        std::vector<float> wr(wb.begin(), wb.end());
        std::snprintf(what, sizeof what, "bf16 M=%ld N=%ld K=%ld%s", long(M), long(N), long(K), routed ? " experts" : "");
        check_matvec(what, Bf16{{reinterpret_cast<const uint8_t*>(wb.data()), 2 * K}}, wr, e, N, K, M, xp, kp, x, routed);
        // int8 per row
        std::vector<int8_t> q(e * N * K);
        std::vector<float> scale(e * N), wq(e * N * K);
        for (int64_t r = 0; r < e * N; ++r) {
          scale[r] = 0.01f * (1 + r % 5);
          for (int64_t k = 0; k < K; ++k) {
            q[r * K + k] = int8_t(int(rng() % 255) - 127);
            wq[r * K + k] = q[r * K + k] * scale[r];
          }
        }
        std::vector<float> x8((K + 4 * W - 1) / (4 * W) * (4 * W) * M);
        pad_rows(x.data(), M, K, 4 * W, x8.data());
        std::snprintf(what, sizeof what, "int8 M=%ld N=%ld K=%ld%s", long(M), long(N), long(K), routed ? " experts" : "");
        check_matvec(what, Int8{{reinterpret_cast<const uint8_t*>(q.data()), K}, scale.data()}, wq, e, N, K, M, x8,
                     int64_t(x8.size()) / M, x, routed);
        if (K % 32) continue;
        // grouped int8 and int4 (groups of 32 and of K), symmetric and not
        for (int64_t gs : {int64_t(32), K}) {
          const int64_t G = K / gs;
          std::vector<uint16_t> s16(e * N * G), z16(e * N * G);
          for (int64_t i = 0; i < e * N * G; ++i) {
            s16[i] = to_half(0.01f * (1 + i % 7));
            z16[i] = to_half(-0.05f * (1 + i % 3));
          }
          for (int64_t r = 0; r < e * N; ++r)
            for (int64_t k = 0; k < K; ++k) wq[r * K + k] = q[r * K + k] * simd::half_to_float(s16[r * G + k / gs]);
          std::vector<float> xg(M * K);
          pad_rows(x.data(), M, K, 32, xg.data());
          std::snprintf(what, sizeof what, "int8 g%ld M=%ld N=%ld K=%ld%s", long(gs), long(M), long(N), long(K),
                        routed ? " experts" : "");
          check_matvec(what, Int8Groups{{reinterpret_cast<const uint8_t*>(q.data()), K}, s16.data(), G, gs / 32}, wq, e, N,
                       K, M, xg, K, x, routed);
          std::vector<uint8_t> packed(e * N * K / 2);
          for (size_t i = 0; i < packed.size(); ++i) packed[i] = uint8_t(rng());
          for (bool symmetric : {true, false}) {
            for (int64_t r = 0; r < e * N; ++r)
              for (int64_t k = 0; k < K; ++k) {
                const int code = (packed[(r * K + k) / 2] >> (4 * (k % 2))) & 15;
                const float sc = simd::half_to_float(s16[r * G + k / gs]);
                wq[r * K + k] = symmetric ? (code - 8) * sc : code * sc + simd::half_to_float(z16[r * G + k / gs]);
              }
            const Format rows{packed.data(), K / 2};
            std::vector<float> x4(M * K / 32 * Int4::kXFloats);
            permute_int4(x.data(), M, K, symmetric, x4.data());
            std::snprintf(what, sizeof what, "int4%s g%ld M=%ld N=%ld K=%ld%s", symmetric ? " sym" : "", long(gs), long(M),
                          long(N), long(K), routed ? " experts" : "");
            if (symmetric)
              check_matvec(what, Int4Symmetric{{rows, s16.data(), nullptr, G, gs / 32}}, wq, e, N, K, M, x4,
                           K / 32 * Int4::kXFloats, x, routed);
            else
              check_matvec(what, Int4Zeros{{rows, s16.data(), z16.data(), G, gs / 32}}, wq, e, N, K, M, x4,
                           K / 32 * Int4::kXFloats, x, routed);
          }
        }
      }
    }
  }
}

// softmax(q k^T scale) v per head, in double: q (B, nh, S, D), k, v (B, nkv, T, D), visible(b, s, t).
template <class Visible>
static std::vector<double> attention_reference(const std::vector<float>& q, const std::vector<float>& k,
                                               const std::vector<float>& v, int64_t B, int64_t nh, int64_t nkv,
                                               int64_t S, int64_t T, int64_t D, double scale, Visible visible) {
  std::vector<double> out(B * nh * S * D, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t kh = h / (nh / nkv);
        std::vector<double> p(T, 0.0);
        double best = -INFINITY, total = 0;
        for (int64_t t = 0; t < T; ++t) {
          if (!visible(b, s, t)) continue;
          double d = 0;
          for (int64_t i = 0; i < D; ++i) d += double(q[((b * nh + h) * S + s) * D + i]) * k[((b * nkv + kh) * T + t) * D + i];
          p[t] = d * scale;
          best = std::max(best, p[t]);
        }
        if (best == -INFINITY) continue;  // sees nothing: zeros
        for (int64_t t = 0; t < T; ++t) total += visible(b, s, t) ? (p[t] = std::exp(p[t] - best)) : (p[t] = 0);
        for (int64_t t = 0; t < T; ++t)
          for (int64_t i = 0; i < D; ++i)
            out[((b * nh + h) * S + s) * D + i] += p[t] / total * v[((b * nkv + kh) * T + t) * D + i];
      }
  return out;
}

template <class T>
static simd::Heads<T> contiguous(T* data, int64_t B, int64_t H, int64_t R, int64_t D) {
  return {data, {B, H, R, D}, {H * R * D, R * D, D}};
}

static void attention_tests() {
  struct Case { int64_t B, nh, nkv, S, T, D; };
  for (const Case c : {Case{1, 8, 2, 1, 37, 64}, Case{2, 4, 4, 3, 20, 48}, Case{1, 4, 2, 70, 90, 64},
                       Case{2, 4, 1, 33, 33, 96}}) {
    const auto q = randn(c.B * c.nh * c.S * c.D), k = randn(c.B * c.nkv * c.T * c.D), v = randn(c.B * c.nkv * c.T * c.D);
    const double scale = 1.0 / std::sqrt(double(c.D));
    std::vector<uint8_t> maskbytes(c.B * c.S * c.T);
    for (auto& m : maskbytes) m = rng() % 10 < 7;
    for (int64_t t = 0; t < c.T; ++t) maskbytes[t] = 0;  // query 0 of batch 0 sees nothing
    const bool* mask = reinterpret_cast<const bool*>(maskbytes.data());
    const int64_t mstride[4] = {c.S * c.T, 0, c.T, 1};
    for (bool causal : {false, true}) {
      auto visible = [&](int64_t b, int64_t s, int64_t t) {
        return causal ? t <= s + c.T - c.S : maskbytes[(b * c.S + s) * c.T + t] != 0;
      };
      const auto ref = attention_reference(q, k, v, c.B, c.nh, c.nkv, c.S, c.T, c.D, scale, visible);
      std::vector<float> out(q.size());
      mixtral_attention::attend_rows<float>(contiguous(q.data(), c.B, c.nh, c.S, c.D),
                                            contiguous(k.data(), c.B, c.nkv, c.T, c.D),
                                            contiguous(v.data(), c.B, c.nkv, c.T, c.D), causal ? nullptr : mask, mstride,
                                            causal, scale, contiguous(out.data(), c.B, c.nh, c.S, c.D));
      char what[96];
      std::snprintf(what, sizeof what, "attend S=%ld T=%ld D=%ld %s", long(c.S), long(c.T), long(c.D),
                    causal ? "causal" : "mask");
      expect_close(what, out, ref);
      if (c.D % 32) continue;
      std::fill(out.begin(), out.end(), 0.0f);
      mixtral_prefill::attend_all<float>(contiguous(q.data(), c.B, c.nh, c.S, c.D),
                                         contiguous(k.data(), c.B, c.nkv, c.T, c.D),
                                         contiguous(v.data(), c.B, c.nkv, c.T, c.D), causal ? nullptr : mask, mstride,
                                         scale, causal, contiguous(out.data(), c.B, c.nh, c.S, c.D));
      std::snprintf(what, sizeof what, "prefill_attend S=%ld T=%ld D=%ld %s", long(c.S), long(c.T), long(c.D),
                    causal ? "causal" : "mask");
      expect_close(what, out, ref);
    }
  }
}

static void elementwise_tests() {
  const int64_t n = 3, I = 45;  // I not a multiple of any W: the partial vectors
  const auto gu = randn(n * 2 * I), w = randn(n);
  std::vector<float> h(n * I);
  mixtral_experts::silu_mul(gu.data(), n, I, h.data());
  std::vector<double> ref(n * I);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < I; ++i) {
      const double g = gu[r * 2 * I + i];
      ref[r * I + i] = g / (1 + std::exp(-g)) * gu[r * 2 * I + I + i];
    }
  expect_close("silu_mul", h, ref);
  mixtral_experts::scale_rows(h.data(), n, I, w.data());
  for (int64_t i = 0; i < n * I; ++i) ref[i] *= w[i / I];
  expect_close("scale_rows", h, ref);
  // bf16 stores round to nearest even, as c10::BFloat16 (the scalar conversion) does
  std::vector<float> x = randn(2 * W + 3);
  x[1] = NAN;
  std::vector<B16> y(x.size());
  for (int64_t i = 0; i < int64_t(x.size()); i += W)
    simd::storen(y.data() + i, simd::loadn(x.data() + i, int64_t(x.size()) - i), int64_t(x.size()) - i);
  int bad = 0;
  for (size_t i = 0; i < x.size(); ++i) bad += y[i].x != B16(x[i]).x;
  std::printf("%-48s %d of %zu differ %s\n", "bf16 store", bad, x.size(), bad ? "MISMATCH" : "");
  failures += bad != 0;
  // e^x over the range the softmax sees
  std::vector<float> e(64);
  std::vector<double> er(64);
  for (int i = 0; i < 64; ++i) er[i] = std::exp(double(-80.0f + 1.3f * i - 0.013f * i));
  for (int i = 0; i < 64; i += W) {
    float xs[16];
    for (int j = 0; j < W; ++j) xs[j] = -80.0f + 1.3f * (i + j) - 0.013f * (i + j);
    simd::store(e.data() + i, simd::exp(simd::load(xs)));
  }
  for (int i = 0; i < 64; ++i) {  // relative error: 2e-7, plus x log2(e)'s rounding, |x| 2^-24 in the exponent
    const double x = -80.0 + 1.3 * i - 0.013 * i;
    if (std::fabs(e[i] - er[i]) > (2e-7 + std::fabs(x) * 6e-8) * er[i]) {
      std::printf("exp(%g) = %g, not %g MISMATCH\n", -80.0 + 1.3 * i - 0.013 * i, e[i], er[i]);
      ++failures;
    }
  }
  std::printf("%-48s\n", "exp");
}

int main() {
  std::printf("vector width %d\n", W);
  matvec_tests();
  attention_tests();
  elementwise_tests();
  if (failures) {
    std::printf("%d checks failed\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
