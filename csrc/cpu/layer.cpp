// The layers' one-row steps on the CPU (sws_kernels/_bound.py, issue 11): a linear layer's backward when every
// sample has one input row, and the mean-field layer's weight + bias sampling, each as ONE call.
//
// Why: on a small layer the per-call cost is the Python in front of the kernels, not the kernels
// (benchmarks/bench_overhead.py). The general backward is three ops (the weight-gradient GEMM dW = dy^T x, the
// bias sum, the reconstruct backward on dW) with their allocations; with one row per sample dW is an outer
// product, which is exact in float32 whatever the order (each element is one rounded product, as a GEMM with
// an inner dimension of 1 computes it), so this call computes it itself and hands it to the same reconstruct
// backward: the gradients are bit-identical to the general path's (tests/test_bound.py).
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common.h"
#include "layer.h"
#include "parallel.h"

namespace sws {
namespace {

constexpr double kNsOuter = 0.15;  // one product of the outer product (a streaming store; estimate)

// gw[s, o, i] = gy[s, o] * x[s or 0, i]: the weight gradient of [S, out, in] for one input row per sample.
// Rows in parallel above the grain (each element is one product: the result does not depend on the split).
void outer_rows(const float* gy, const float* x, bool x_per_sample, int64_t S, int64_t out_f, int64_t in_f,
                float* gw) {
  const int64_t rows = S * out_f;
  const int nt = parallel_threads(kNsOuter * static_cast<double>(rows * in_f));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t s = r / (out_f > 0 ? out_f : 1);
    const float* xs = x + (x_per_sample ? s * in_f : 0);
    const float g = gy[r];
    float* row = gw + r * in_f;
    for (int64_t i = 0; i < in_f; ++i) row[i] = g * xs[i];
  }
}

// S * n floats, uninitialised (every element is written before it is read): a std::vector would zero them first.
std::unique_ptr<float[]> scratch(int64_t count) { return std::unique_ptr<float[]>(new float[count > 0 ? count : 1]); }

void check_rows(const char* fn, const RowBackward& r, int64_t n) {
  auto fail = [&](const std::string& what) { throw std::invalid_argument(std::string(fn) + ": " + what); };
  if (r.out_f < 0 || r.in_f < 0 || r.out_f * r.in_f != n)
    fail("out_f * in_f must equal the weight count " + std::to_string(n) + ", got " + std::to_string(r.out_f) +
         " x " + std::to_string(r.in_f));
  if ((r.out_f > 0 && r.gy == nullptr) || (r.in_f > 0 && r.x == nullptr)) fail("null gy or x pointer");
}

}  // namespace

void sws_linear_backward_rows_cpu(const ReconstructArgs& a, const RowBackward& r, float* g_means, float* g_chol,
                                  float* g_mu, float* g_rho, float* g_bias) {
  const char* fn = "sws_linear_backward_rows_cpu";
  validate_sizes(a, fn);
  check_rows(fn, r, a.n);
  if (g_bias != nullptr && a.S != 1) throw std::invalid_argument(std::string(fn) + ": g_bias needs S == 1");
  const auto gw = scratch(a.S * a.n);
  outer_rows(r.gy, r.x, r.x_per_sample, a.S, r.out_f, r.in_f, gw.get());
  reconstruct_backward_cpu(a, gw.get(), g_means, g_chol, g_mu, g_rho);
  if (g_bias != nullptr) std::memcpy(g_bias, r.gy, static_cast<size_t>(r.out_f) * sizeof(float));
}

void mean_field_linear_backward_rows_cpu(const MeanFieldArgs& w, const MeanFieldArgs* b, const RowBackward& r,
                                         float* g_mu, float* g_rho, float* g_bmu, float* g_brho) {
  const char* fn = "mean_field_linear_backward_rows_cpu";
  validate_mean_field(w, fn);
  check_rows(fn, r, w.n);
  const auto gw = scratch(w.S * w.n);
  outer_rows(r.gy, r.x, r.x_per_sample, w.S, r.out_f, r.in_f, gw.get());
  mean_field_reconstruct_backward_cpu(w, gw.get(), g_mu, g_rho);
  if (b != nullptr) {
    validate_mean_field(*b, fn);
    if (b->n != r.out_f || b->S != w.S) throw std::invalid_argument(std::string(fn) + ": bias args do not match");
    // one row per sample: the bias gradient of sample s is gy[s] itself
    mean_field_reconstruct_backward_cpu(*b, r.gy, g_bmu, g_brho);
  }
}

}  // namespace sws
