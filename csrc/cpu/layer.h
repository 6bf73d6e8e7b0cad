// csrc/cpu/layer.cpp: a linear layer's backward as one call when every sample has one input row (the layers'
// steady-state path, sws_kernels/_bound.py). Pointers are host float32, contiguous.
#pragma once

#include <cstdint>

#include "../common.h"

namespace sws {

struct RowBackward {
  int64_t out_f = 0, in_f = 0;
  const float* gy = nullptr;  // [S, out_f]: the output gradient, one row per sample
  const float* x = nullptr;   // [in_f] shared by the samples, or [S, in_f] (x_per_sample)
  bool x_per_sample = false;
};

// Overwrites the gradients of means [K, 2], chol [K, 3], o_mu [O], o_rho [O] (reconstruct_backward_cpu of
// dW[s] = gy[s] x[s]^T) and, when g_bias is not null (S == 1 only), of the bias [out_f].
void sws_linear_backward_rows_cpu(const ReconstructArgs& a, const RowBackward& r, float* g_means, float* g_chol,
                                  float* g_mu, float* g_rho, float* g_bias);

// Overwrites the gradients of mu, rho [out_f * in_f] (mean_field_reconstruct_backward_cpu of dW) and, with b
// (the bias bundle: n = out_f, same S), of bias_mu, bias_rho [out_f] from the per-sample bias gradient gy[s].
void mean_field_linear_backward_rows_cpu(const MeanFieldArgs& w, const MeanFieldArgs* b, const RowBackward& r,
                                         float* g_mu, float* g_rho, float* g_bmu, float* g_brho);

}  // namespace sws
