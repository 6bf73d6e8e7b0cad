// The sampled codebook on the CPU, written once for every kernel that needs it (reconstruct forward and
// backward, the fused small-M linear), each in its own layout through strides. Defined in reconstruct.cpp.
#pragma once

#include <cstdint>

#include "../common.h"

namespace sws {

// Where sample_codebook_cpu writes, for s in [0, S) and k in [0, K); a null pointer skips that output.
//   mu[s * mu_ss + k * mu_ks]      z_mu[s, k] = m_mu + softplus(a) xi0   (mean mode: m_mu)
//   sp_rho[s * sp_ss + k * sp_ks]  softplus(z_rho[s, k]), z_rho = (m_rho + b xi0) + softplus(c) xi1
//   xi[s * xi_ss + 2k + {0, 1}]    the component noise (xi0, xi1)
// sp_rho and xi are not written in mean mode (no noise there).
struct CodebookOut {
  float* mu = nullptr;
  int64_t mu_ss = 0, mu_ks = 0;
  float* sp_rho = nullptr;
  int64_t sp_ss = 0, sp_ks = 0;
  float* xi = nullptr;
  int64_t xi_ss = 0;
};

// xi[s, k] = elements 2k, 2k+1 of stream (seed, s, codebook_owner, purpose 1), from bulk normals (normals_fill;
// component k is counter k / 2, so chunks of components start on even k); z in the reference's float32
// operation order, softplus through softplus_fill (position-independent results, vecmath.h), so every layout
// holds the same bits. OpenMP over (sample, chunk of components).
void sample_codebook_cpu(const ReconstructArgs& a, int64_t S, const CodebookOut& out);

}  // namespace sws
