// Which rows of x go through which weight matrix: shared by the portable and int8-activation matvec kernels.
// Shapes: M rows of x, N outputs, E experts, T tokens, Kt experts per token.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#ifndef MIXTRAL_NO_ATEN
#include <ATen/core/Tensor.h>
#endif

namespace mixtral_plan {

// The rows of x (as the format lays them out, in bytes) that go through one weight matrix (one expert), and where
// their outputs (of type O) go.
template <class O>
struct Group {
  int64_t expert;
  std::vector<const uint8_t*> x;
  std::vector<O*> y;
  const float* const* floats() const { return reinterpret_cast<const float* const*>(x.data()); }
};

// Groups the (token, slot) pairs by expert, in order of first use, so that each routed expert is read once; without
// experts (ids null), one group of all rows. x rows are x_stride bytes apart, outputs N apart. False on a bad id.
template <class O>
bool plan(const uint8_t* x, int64_t x_stride, int64_t rows, O* y, int64_t N, const int64_t* ids, int64_t Kt,
          int64_t E, std::vector<Group<O>>& groups) {
  if (!ids) {
    groups.push_back({0, {}, {}});
    for (int64_t m = 0; m < rows; ++m) {
      groups[0].x.push_back(x + m * x_stride);
      groups[0].y.push_back(y + m * N);
    }
    return true;
  }
  for (int64_t i = 0; i < rows * Kt; ++i) {
    const int64_t e = ids[i];
    if (e < 0 || e >= E) return false;
    auto g = std::find_if(groups.begin(), groups.end(), [e](const Group<O>& gr) { return gr.expert == e; });
    if (g == groups.end()) {
      groups.push_back({e, {}, {}});
      g = groups.end() - 1;
    }
    g->x.push_back(x + (i / Kt) * x_stride);
    g->y.push_back(y + i * N);
  }
  return true;
}

#ifndef MIXTRAL_NO_ATEN
// plan() for x rows laid out as the format reads them (`xk`: row m at xk's row m) and outputs y (rows of N).
template <class O>
std::vector<Group<O>> plan(const at::Tensor& xk, O* y, int64_t N, const std::optional<at::Tensor>& experts,
                           int64_t E) {
  std::vector<Group<O>> groups;
  TORCH_CHECK(plan<O>(static_cast<const uint8_t*>(xk.data_ptr()), xk.stride(0) * xk.element_size(), xk.size(0), y, N,
                      experts ? experts->data_ptr<int64_t>() : nullptr, experts ? experts->size(1) : 1, E, groups),
              "expert index out of range [0, ", E, ")");
  return groups;
}

// The matvec ops' common arguments: x (..., K), or (T, K) with experts (T, Kt); weights (N, K...) or (E, N, K...).
inline void check(const at::Tensor& x, const at::Tensor& w, int64_t K, const std::optional<at::Tensor>& experts) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K && (!experts || x.dim() == 2), "x must be (", experts ? "T" : "...",
              ", K) with K = ", K);
  TORCH_CHECK(w.dim() == (experts ? 3 : 2) && w.is_contiguous(), "weights must be contiguous (", experts ? "E, " : "",
              "N, K)");
  if (experts)
    TORCH_CHECK(experts->dim() == 2 && experts->size(0) == x.size(0) && experts->scalar_type() == at::kLong &&
                    experts->is_contiguous(),
                "experts must be contiguous int64 (T, Kt)");
}

// linear_int8's weights checked (after check()): q int8 (E?, N, K), scale float32 (E?, N) per row or float16
// (E?, N, G) per group of a multiple of 32 columns. Returns G, 0 for per-row scales.
inline int64_t int8_groups(const at::Tensor& q, const at::Tensor& scale, bool routed) {
  const int64_t K = q.size(-1), EN = q.numel() / std::max<int64_t>(1, K);
  TORCH_CHECK(q.scalar_type() == at::kChar && scale.is_contiguous() &&
                  (scale.scalar_type() == at::kFloat && scale.numel() == EN ||
                   scale.scalar_type() == at::kHalf && scale.numel() % EN == 0 && scale.numel() > 0),
              "int8 weights need int8 qweight and a contiguous scale: float32 (", routed ? "E, " : "",
              "N) per row, or float16 (", routed ? "E, " : "", "N, G) per group");
  if (scale.scalar_type() == at::kFloat) return 0;
  const int64_t G = scale.numel() / EN;
  TORCH_CHECK(K % G == 0 && (K / G) % 32 == 0, "int8 groups must be a multiple of 32 columns that divides K");
  return G;
}

// linear_int4's weights checked (after check()): packed uint8 (E?, N, K/2), scales and zeros float16 (E?, N, G),
// zeros empty for symmetric int4; group_size one the caller's kernels take. Returns G.
inline int64_t int4_groups(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                           int64_t group_size, bool taken, const char* sizes, bool routed) {
  const int64_t K = packed.size(-1) * 2, EN = packed.numel() / std::max<int64_t>(1, packed.size(-1));
  TORCH_CHECK(taken && group_size > 0 && K % group_size == 0, "group_size must be ", sizes, ", and divide K");
  const int64_t G = K / group_size;
  TORCH_CHECK(packed.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf &&
                  zeros.scalar_type() == at::kHalf && scales.is_contiguous() && zeros.is_contiguous() &&
                  scales.numel() == EN * G && (zeros.numel() == EN * G || zeros.numel() == 0),
              "int4 weights need uint8 packed and contiguous float16 scales and zeros (", routed ? "E, " : "",
              "N, K / group_size); zeros empty for symmetric int4");
  return G;
}

// (..., N) for x (..., K), or (T, Kt, N) with experts.
inline std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& experts) {
  if (experts) return {x.size(0), experts->size(1), N};
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  return shape;
}
#endif

}  // namespace mixtral_plan
