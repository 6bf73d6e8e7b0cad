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

}  // namespace sws
