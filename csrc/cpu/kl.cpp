// KL of a mean-field tensor against a scalar Gaussian prior on the CPU (SPEC.md section 6):
//   kl_i = log(sigma0 / sigma_i) + (sigma_i^2 + (mu_i - mu0)^2) / (2 sigma0^2) - 1/2,  sigma_i = softplus(rho_i)
// and its gradient. Why native: bayesian-torch's layers return their KL from every forward, and on a small
// layer the ~10 PyTorch ops of that formula (plus their autograd nodes) cost more than the layer itself
// (benchmarks/bench_overhead.py); one call here does the value, one the gradient, in float32 per element as
// reference._kl_terms computes it, summed in double in a fixed chunk order (bit-identical run to run and for
// any thread count).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../common.h"
#include "parallel.h"

namespace sws {
namespace {

constexpr int64_t kKlChunk = 16384;  // elements per partial sum: fixed, so the sum never depends on threads
constexpr double kNsKl = 6.0;        // one element: softplus, log and a few FMAs (estimate, decides the team)

inline float kl_term(float mu, float rho, float mu0, float sigma0, float two_var0) {
  const float sigma = softplus(rho);
  const float d = mu - mu0;
  return std::log(sigma0 / sigma) + (sigma * sigma + d * d) / two_var0 - 0.5f;
}

}  // namespace

double kl_gaussian_sum_cpu(const float* mu, const float* rho, int64_t n, float mu0, float sigma0) {
  if (n <= 0) return 0.0;
  const float two_var0 = 2.0f * (sigma0 * sigma0);
  const int64_t nchunks = (n + kKlChunk - 1) / kKlChunk;
  std::vector<double> partial(static_cast<size_t>(nchunks), 0.0);
  const int nt = parallel_threads(kNsKl * static_cast<double>(n));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t i0 = c * kKlChunk, i1 = std::min(n, i0 + kKlChunk);
    double acc = 0.0;
    for (int64_t i = i0; i < i1; ++i) acc += static_cast<double>(kl_term(mu[i], rho[i], mu0, sigma0, two_var0));
    partial[static_cast<size_t>(c)] = acc;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

void kl_gaussian_backward_cpu(const float* mu, const float* rho, int64_t n, float mu0, float sigma0, float scale,
                              float* grad_mu, float* grad_rho) {
  if (n <= 0) return;
  const float var0 = sigma0 * sigma0;
  const int nt = parallel_threads(kNsKl * static_cast<double>(n));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t i = 0; i < n; ++i) {
    const float sigma = softplus(rho[i]);
    grad_mu[i] = scale * ((mu[i] - mu0) / var0);
    grad_rho[i] = scale * ((sigma / var0 - 1.0f / sigma) * softplus_grad(rho[i]));
  }
}

// Codebook KL (SPEC.md section 6): sum_k KL(N(m_k, L_k L_k^T) || N(m0_k, L0_k L0_k^T)), the closed form
// functional._KLComponents writes out (u = l11/p11, v = (l21 - p21 u)/p22, w = l22/p22, y = L0^-1 (m0 - m)),
// float32 per component as there, summed in double in component order; the gradient of the sum with respect
// to means and chol written into g_means [K, 2], g_chol [K, 3] when they are not null. Why native: it runs
// once per codebook per training step, and its ~35 PyTorch ops cost ~55 us on a small codebook, more than an
// SWS layer's whole step (benchmarks/bench_overhead.py, forward+backward+KL).
double kl_components_cpu(const float* means, const float* chol, const float* means0, const float* chol0, int64_t K,
                         float* g_means, float* g_chol) {
  double total = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const float a = chol[3 * k], b = chol[3 * k + 1], c = chol[3 * k + 2];
    const float l11 = softplus(a), l22 = softplus(c);
    const float p11 = softplus(chol0[3 * k]), p21 = chol0[3 * k + 1], p22 = softplus(chol0[3 * k + 2]);
    const float u = l11 / p11;
    const float v = (b - p21 * u) / p22;
    const float w = l22 / p22;
    const float d0 = means0[2 * k] - means[2 * k], d1 = means0[2 * k + 1] - means[2 * k + 1];
    const float y0 = d0 / p11;
    const float y1 = (d1 - p21 * y0) / p22;
    const float kl = 0.5f * (u * u + v * v + w * w + y0 * y0 + y1 * y1 - 2.0f) + std::log(p11 * p22 / (l11 * l22));
    total += static_cast<double>(kl);
    if (g_chol != nullptr) {
      g_chol[3 * k] = ((u - v * p21 / p22) / p11 - 1.0f / l11) * softplus_grad(a);
      g_chol[3 * k + 1] = v / p22;
      g_chol[3 * k + 2] = (w / p22 - 1.0f / l22) * softplus_grad(c);
    }
    if (g_means != nullptr) {  // d KL / d m = -(d KL / d (m0 - m))
      g_means[2 * k] = y1 * p21 / (p22 * p11) - y0 / p11;
      g_means[2 * k + 1] = -y1 / p22;
    }
  }
  return total;
}

}  // namespace sws
