// Mean-field reconstruct and its backward on the CPU (OpenMP). SPEC.md section 3, last paragraph:
//   w[s, i] = mu_i + softplus(rho_i) eps[s, i],  eps[s, i] = normal element i of stream (seed, s, owner, purpose)
//   d mu_i = sum_s dW[s, i],  d rho_i = (sum_s dW[s, i] eps[s, i]) softplus'(rho_i)
//
// Both are bound by the normals (one per weight per sample), not by memory: n = 4M, S = 4 needs 16.8M
// normals. So the work is cut into blocks of kBlock weights (a multiple of 4: blocks start on Philox counter
// boundaries), softplus/softplus' are evaluated once per block (not once per sample), and the normals of a
// block come from normals_fill (AVX2 when the CPU has it, see vecmath.cpp) into an L1-resident buffer.
//
// A shard of a larger weight (MeanFieldArgs elem_offset/row_stride/row_len, tensor parallelism) draws each block's
// normals through mapped_normals_fill (elem_map.h): the same values as the unsharded layer's elements.
//
// Determinism: every output element depends only on its own inputs and the S samples summed in order
// s = 0, 1, ... (double accumulators), so results are bit-identical run to run and for any thread count.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common.h"
#include "elem_map.h"
#include "parallel.h"
#include "vecmath.h"

namespace sws {
namespace {

constexpr int64_t kBlock = 2048;  // weights per work item: 8 KB of normals + 8 KB of softplus stay in L1

}  // namespace

void mean_field_reconstruct_cpu(const MeanFieldArgs& a, float* out) {
  const char* fn = "mean_field_reconstruct_cpu";
  validate_mean_field(a, fn);
  const int64_t n = a.n, S = a.S;
  if (n == 0) return;
  const float* mu = a.mu;
  const float* rho = a.rho;
  if (mu == nullptr || rho == nullptr || out == nullptr) throw std::invalid_argument(std::string(fn) + ": null pointer");
  advise_huge_pages(out, static_cast<size_t>(S) * static_cast<size_t>(n) * sizeof(float));
  const Key key = seed_key(a.seed);
  const uint32_t own = static_cast<uint32_t>(a.owner), pur = static_cast<uint32_t>(a.purpose);
  const ElemMap em = elem_map_of(a);
  const bool ident = em.identity();
  const int64_t nb = (n + kBlock - 1) / kBlock;
  const int nt = parallel_threads(kNsNormal * static_cast<double>(S * n));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t b = 0; b < nb; ++b) {
    alignas(64) float sp[kBlock];
    alignas(64) float eps[kBlock];
    const int64_t i0 = b * kBlock, len = std::min(kBlock, n - i0);
    softplus_fill(rho + i0, sp, len);
    const float* m = mu + i0;
    for (int64_t s = 0; s < S; ++s) {
      if (ident) normals_fill(key, static_cast<uint64_t>(i0 >> 2), (len + 3) >> 2, static_cast<uint32_t>(s), own, pur, eps);
      else mapped_normals_fill(key, em, i0, len, static_cast<uint32_t>(s), own, pur, eps);
      float* o = out + s * n + i0;
      // mu + sp * eps, two roundings like the reference (mul, then add): no FMA contraction in this file's
      // baseline-ISA build, and the vectoriser keeps the order.
      for (int64_t t = 0; t < len; ++t) o[t] = m[t] + sp[t] * eps[t];
    }
  }
}

void mean_field_reconstruct_backward_cpu(const MeanFieldArgs& a, const float* grad_w, float* grad_mu,
                                         float* grad_rho) {
  const char* fn = "mean_field_reconstruct_backward_cpu";
  validate_mean_field(a, fn);
  const int64_t n = a.n, S = a.S;
  if (n == 0) return;
  const float* rho = a.rho;
  if (grad_w == nullptr || rho == nullptr || grad_mu == nullptr || grad_rho == nullptr)
    throw std::invalid_argument(std::string(fn) + ": null pointer");
  const Key key = seed_key(a.seed);
  const uint32_t own = static_cast<uint32_t>(a.owner), pur = static_cast<uint32_t>(a.purpose);
  const ElemMap em = elem_map_of(a);
  const bool ident = em.identity();
  const int64_t nb = (n + kBlock - 1) / kBlock;
  const int nt = parallel_threads((kNsNormal + kNsGather) * static_cast<double>(S * n));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t b = 0; b < nb; ++b) {
    alignas(64) float eps[kBlock];
    alignas(64) double acc_mu[kBlock];
    alignas(64) double acc_rho[kBlock];
    const int64_t i0 = b * kBlock, len = std::min(kBlock, n - i0);
    std::fill(acc_mu, acc_mu + len, 0.0);
    std::fill(acc_rho, acc_rho + len, 0.0);
    for (int64_t s = 0; s < S; ++s) {  // samples in order: the sums are the same whatever the threads
      if (ident) normals_fill(key, static_cast<uint64_t>(i0 >> 2), (len + 3) >> 2, static_cast<uint32_t>(s), own, pur, eps);
      else mapped_normals_fill(key, em, i0, len, static_cast<uint32_t>(s), own, pur, eps);
      const float* g = grad_w + s * n + i0;
      for (int64_t t = 0; t < len; ++t) {
        const double gv = static_cast<double>(g[t]);
        acc_mu[t] += gv;
        acc_rho[t] += gv * static_cast<double>(eps[t]);
      }
    }
    // eps is free now: reuse it for softplus'(rho)
    softplus_grad_fill(rho + i0, eps, len);
    for (int64_t t = 0; t < len; ++t) {
      grad_mu[i0 + t] = static_cast<float>(acc_mu[t]);
      grad_rho[i0 + t] = static_cast<float>(acc_rho[t] * static_cast<double>(eps[t]));
    }
  }
}

}  // namespace sws
