// The label-histogram SWS linear forward on the CPU (csrc/cpu/histogram.cpp): inference in paper and mean mode
// with one x shared by all samples. Declared here, not in common.h, so the op stays one self-contained file.
#pragma once

#include "../common.h"

namespace sws {

// y[s, m, j] = sum_k z_mu[s, k] h[m, j, k] + sum over outliers o of row j of x[m, i_o] w_o[s] (+ bias[j]),
// h[m, j, k] = sum of x[m, i] over the inliers i of row j with label k (an ellipse weight adds alpha x[m, i] to
// h[m, j, a] and (1 - alpha) x[m, i] to h[m, j, b]); in mean mode z_mu = m_mu and w_o = mu_o.
// a: paper or mean mode; l: float32 x [M, in_f] (l.per_sample must be false), bias float32 [out_f] or
// [S, out_f] or null, y float32 [S, M, out_f]; l.ov_* unused. Deterministic, independent of the thread count.
void sws_linear_histogram_cpu(const ReconstructArgs& a, const LinearArgs& l);

}  // namespace sws
