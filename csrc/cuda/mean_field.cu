// Mean-field reconstruct and its backward on CUDA. SPEC.md section 3, last paragraph:
//   w[s, i] = mu_i + softplus(rho_i) eps[s, i];  d mu_i = sum_s dW[s, i];  d rho_i = (sum_s dW eps) softplus'(rho_i)
//
// One thread per Philox counter (4 consecutive weights: one Philox call yields their 4 normals), a capped
// grid-stride loop over counters. Forward: gridDim.y walks the samples (mu/rho are re-read per sample from
// L2; the output dominates the bytes). Backward: each thread sums its 4 weights over s = 0, 1, ... in order
// with double accumulators, so the result is bit-identical run to run without atomics or reductions.
// No fast-math: the device Box-Muller must stay within ulps of the host's (philox.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "../common.h"
#include "launch.cuh"

namespace sws {
namespace {

__global__ void k_mf_forward(const float* __restrict__ mu, const float* __restrict__ rho, int64_t n, int64_t S,
                             SeedRef seed_ref, uint32_t owner, uint32_t purpose, ElemMap em, bool quad,
                             float* __restrict__ out) {
  const Key key = seed_ref.get();
  const int64_t groups = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // float4 loads/stores when every row of out (and mu, rho) starts 16-byte aligned.
  const bool vec = (n % 4 == 0) && (((reinterpret_cast<uintptr_t>(out) | reinterpret_cast<uintptr_t>(mu) |
                                      reinterpret_cast<uintptr_t>(rho)) & 15) == 0);
  for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
    float* o = out + s * n;
    for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups; g += stride) {
      float eps[4], m[4], r[4], v[4];
      const int64_t i = 4 * g;
      const int cnt = static_cast<int>(min(static_cast<int64_t>(4), n - i));
      mapped_normal4(key, em, i, cnt, static_cast<uint32_t>(s), owner, purpose, quad, eps);  // a shard: global noise
      if (vec) {
        const float4 m4 = *reinterpret_cast<const float4*>(mu + i);
        const float4 r4 = *reinterpret_cast<const float4*>(rho + i);
        m[0] = m4.x; m[1] = m4.y; m[2] = m4.z; m[3] = m4.w;
        r[0] = r4.x; r[1] = r4.y; r[2] = r4.z; r[3] = r4.w;
      } else {
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          m[t] = t < cnt ? mu[i + t] : 0.0f;
          r[t] = t < cnt ? rho[i + t] : 0.0f;
        }
      }
#pragma unroll
      for (int t = 0; t < 4; ++t) v[t] = __fadd_rn(m[t], __fmul_rn(softplus(r[t]), eps[t]));  // mul, add: as the reference
      if (vec) {
        *reinterpret_cast<float4*>(o + i) = make_float4(v[0], v[1], v[2], v[3]);
      } else {
        for (int t = 0; t < cnt; ++t) o[i + t] = v[t];
      }
    }
  }
}

__global__ void k_mf_backward(const float* __restrict__ grad, const float* __restrict__ rho, int64_t n, int64_t S,
                              SeedRef seed_ref, uint32_t owner, uint32_t purpose, ElemMap em, bool quad,
                              float* __restrict__ grad_mu,
                              float* __restrict__ grad_rho) {
  const Key key = seed_ref.get();
  const int64_t groups = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups; g += stride) {
    const int64_t i = 4 * g;
    const int cnt = static_cast<int>(min(static_cast<int64_t>(4), n - i));
    double am[4] = {0, 0, 0, 0}, ar[4] = {0, 0, 0, 0};
    for (int64_t s = 0; s < S; ++s) {  // in order: deterministic
      float eps[4];
      mapped_normal4(key, em, i, cnt, static_cast<uint32_t>(s), owner, purpose, quad, eps);  // a shard: global noise
      const float* gs = grad + s * n + i;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        if (t < cnt) {
          const double gv = static_cast<double>(gs[t]);
          am[t] += gv;
          ar[t] += gv * static_cast<double>(eps[t]);
        }
      }
    }
    for (int t = 0; t < cnt; ++t) {
      grad_mu[i + t] = static_cast<float>(am[t]);
      grad_rho[i + t] = static_cast<float>(ar[t] * static_cast<double>(softplus_grad(rho[i + t])));
    }
  }
}

}  // namespace

void mean_field_reconstruct_cuda(const MeanFieldArgs& a, float* out, uintptr_t stream_ptr) {
  const char* fn = "mean_field_reconstruct_cuda";
  validate_mean_field(a, fn);
  if (a.n == 0) return;
  const int64_t n = a.n, S = a.S;
  const unsigned gy = static_cast<unsigned>(std::min<int64_t>(S, 65535));
  const int64_t cap = std::max<int64_t>(1, (static_cast<int64_t>(sm_count(fn)) * 16 + gy - 1) / gy);
  const dim3 grid(grid_for((n + 3) / 4, cap), gy);
  k_mf_forward<<<grid, kThreads, 0, as_stream(stream_ptr)>>>(a.mu, a.rho, n, S, seed_ref_of(a),
                                                             static_cast<uint32_t>(a.owner),
                                                             static_cast<uint32_t>(a.purpose), elem_map_of(a),
                                                             quad_aligned(elem_map_of(a)), out);
  SWS_CUDA_CHECK(fn, cudaGetLastError());
}

void mean_field_reconstruct_backward_cuda(const MeanFieldArgs& a, const float* grad_w, float* grad_mu, float* grad_rho,
                                          uintptr_t stream_ptr) {
  const char* fn = "mean_field_reconstruct_backward_cuda";
  validate_mean_field(a, fn);
  if (a.n == 0) return;
  const int64_t cap = static_cast<int64_t>(sm_count(fn)) * 16;
  k_mf_backward<<<grid_for((a.n + 3) / 4, cap), kThreads, 0, as_stream(stream_ptr)>>>(
      grad_w, a.rho, a.n, a.S, seed_ref_of(a), static_cast<uint32_t>(a.owner), static_cast<uint32_t>(a.purpose),
      elem_map_of(a), quad_aligned(elem_map_of(a)), grad_mu, grad_rho);
  SWS_CUDA_CHECK(fn, cudaGetLastError());
}

}  // namespace sws
