// Which rows of x go through which weight matrix: shared by the portable and int8-activation matvec kernels.
// Shapes: M rows of x, N outputs, E experts, T tokens, Kt experts per token.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

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

}  // namespace mixtral_plan
