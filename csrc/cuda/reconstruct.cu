// reconstruct and its backward on CUDA. SPEC.md sections 2-3 and 5. Runtime API only, linked statically,
// so the module imports on machines without a driver.
//
// Forward (3 launches on the caller's stream, no host sync):
//  1. k_sample: z[S, K] into the caller's workspace zbuf (float32 [S, K, 2] = (z_mu, softplus(z_rho)); in
//     mean mode (m_mu, -)). One thread per (s, k); xi comes from counter k/2 of purpose 1.
//  2. k_forward: the weights. gridDim.y walks the samples, a capped grid-stride x dimension walks the
//     weights, so each block loads its sample's table into shared memory once (when it fits in 48 KB)
//     and then serves many weights from it; the cap keeps the table loads far below the output bytes.
//     paper/mean: one thread per weight (a pure gather). hierarchical: one thread per 4 consecutive
//     weights, because one Philox call yields the 4 normals of a counter.
//  3. k_overrides: ellipse and outlier positions, one thread per (entry, sample); stream order puts
//     it after k_forward. Positions are unique (validated on the Python side).
//
// Backward, deterministic (bit-identical run to run) without float atomics:
//  The Python side (sws_kernels/_segments.py, shared with the Triton backward and cached per labels version)
//  builds, with torch on the device and no host sync, a label-sorted CSR of "entries": each inlier position
//  (coef 1) under its label, and each ellipse weight twice, (pos, alpha) under a and (pos, 1 - alpha) under
//  b, in a stable order (stable sort + searchsorted: integer work only, so deterministic). Only
//  [seg_offsets[k], seg_offsets[k + 1]) of component k is read. Then:
//  1. k_bwd_segments: one block per (component, sample); each thread strides over the segment in a fixed
//     pattern, accumulating in double, then a fixed-shape shared-memory tree reduction -> dzbuf (float64
//     [S, K, 2] = (dz_mu, dz_rho)); dz_rho already includes sigmoid(z_rho) (hierarchical only).
//  2. k_bwd_final: one thread per component sums its samples in order and applies z = m + L xi.
//  3. k_bwd_outliers: one thread per outlier.
//  A segment is reduced by a single block, so a component with a huge share of the weights (K = 1) is
//  slower than balanced; correctness and determinism do not depend on it.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../common.h"
#include "launch.cuh"

namespace sws {
namespace {

__global__ void k_sample(const float* __restrict__ means, const float* __restrict__ chol, int64_t K, int64_t S,
                         int mode, SeedRef seed_ref, uint32_t cb_owner, float* __restrict__ zbuf) {
  const Key key = seed_ref.get();
  const int64_t total = S * K;
  for (int64_t sk = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; sk < total;
       sk += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = sk / K, k = sk % K;
    if (mode == kMean) {
      zbuf[2 * sk] = means[2 * k];
      zbuf[2 * sk + 1] = 0.0f;
      continue;
    }
    float xi0, xi1, z_mu, z_rho;
    component_noise(key, static_cast<uint64_t>(k), static_cast<uint32_t>(s), cb_owner, xi0, xi1);
    sample_component(means, chol, static_cast<uint64_t>(k), xi0, xi1, z_mu, z_rho);
    zbuf[2 * sk] = z_mu;
    zbuf[2 * sk + 1] = softplus(z_rho);
  }
}

// Memory safety whatever the data (the Python layer validates it on entry; a direct call may not):
// out-of-range labels write NaN instead of reading out of bounds; in k_overrides an ellipse/outlier position
// outside [0, n) writes nothing and out-of-range component ids give NaN; the backward skips such positions
// (zero contribution). Sizes (chol [K, 3], E/O-long arrays) are checked on the host (sws_kernels/native.py).
template <class L, bool kHier, bool kSmem>
__global__ void k_forward(const L* __restrict__ lab, int64_t n, int64_t K, int64_t S, const float* __restrict__ zbuf,
                          SeedRef seed_ref, uint32_t owner, ElemMap em, bool quad, float* __restrict__ out) {
  const Key key = seed_ref.get();
  extern __shared__ float smem[];
  const float nan = __int_as_float(0x7fc00000);
  for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
    const float* zg = zbuf + 2 * s * K;
    const float* zs = zg;
    if (kSmem) {
      __syncthreads();  // the previous sample's table is no longer read
      if (kHier) {
        for (int64_t x = threadIdx.x; x < 2 * K; x += blockDim.x) smem[x] = zg[x];
      } else {
        for (int64_t x = threadIdx.x; x < K; x += blockDim.x) smem[x] = zg[2 * x];
      }
      __syncthreads();
      zs = smem;
    }
    float* o = out + s * n;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    if (!kHier) {
      // smem holds z_mu densely; global zbuf interleaves (z_mu, sp).
      const int64_t zstep = kSmem ? 1 : 2;
      for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
        const uint64_t c = label_at(lab, i);
        o[i] = c < static_cast<uint64_t>(K) ? zs[zstep * c] : nan;
      }
    } else {
      const int64_t groups = (n + 3) / 4;
      // A float4 store is aligned when every row starts on a 16-byte boundary (n % 4 == 0; torch
      // allocations are 256-byte aligned).
      const bool vec = (n % 4 == 0) && ((reinterpret_cast<uintptr_t>(out) & 15) == 0);
      for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups; g += stride) {
        float eps[4], v[4];
        const int64_t i = 4 * g;
        const int m = static_cast<int>(min(static_cast<int64_t>(4), n - i));
        // a shard's global noise (em; the identity: counter g)
        mapped_normal4(key, em, i, m, static_cast<uint32_t>(s), owner, kPurposeWeight, quad, eps);
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          v[t] = nan;
          if (t < m) {
            const uint64_t c = label_at(lab, i + t);
            if (c < static_cast<uint64_t>(K)) v[t] = zs[2 * c] + zs[2 * c + 1] * eps[t];
          }
        }
        if (vec) {
          *reinterpret_cast<float4*>(o + i) = make_float4(v[0], v[1], v[2], v[3]);
        } else {
          for (int t = 0; t < m; ++t) o[i + t] = v[t];
        }
      }
    }
  }
}

__global__ void k_overrides(int64_t n, int64_t K, int64_t S, int mode, const float* __restrict__ means,
                            const int64_t* __restrict__ e_pos, const int64_t* __restrict__ e_a,
                            const int64_t* __restrict__ e_b, const float* __restrict__ e_alpha, int64_t E,
                            const int64_t* __restrict__ o_pos, const float* __restrict__ o_mu,
                            const float* __restrict__ o_rho, int64_t O, const float* __restrict__ zbuf, SeedRef seed_ref,
                            uint32_t owner, ElemMap em, float* __restrict__ out) {
  const Key key = seed_ref.get();
  const int64_t total = (E + O) * S;
  const float nan = __int_as_float(0x7fc00000);
  for (int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; x < total;
       x += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = x % S, idx = x / S;
    if (idx < E) {
      const int64_t p = e_pos[idx], ca = e_a[idx], cb = e_b[idx];
      if (p < 0 || p >= n) continue;
      float v = nan;
      if (ca >= 0 && ca < K && cb >= 0 && cb < K) {
        const float al = e_alpha[idx], bl = 1.0f - al;
        if (mode == kMean) {
          v = al * means[2 * ca] + bl * means[2 * cb];
        } else {
          const float* zs = zbuf + 2 * s * K;
          v = al * zs[2 * ca] + bl * zs[2 * cb];
          if (mode == kHierarchical) {
            const float sd = al * zs[2 * ca + 1] + bl * zs[2 * cb + 1];
            v = v + sd * normal_at(key, em(p), static_cast<uint32_t>(s), owner, kPurposeWeight);
          }
        }
      }
      out[s * n + p] = v;
    } else {
      const int64_t o = idx - E;
      const int64_t p = o_pos[o];
      if (p < 0 || p >= n) continue;
      float v = o_mu[o];
      if (mode != kMean)
        v = v + softplus(o_rho[o]) * normal_at(key, em(p), static_cast<uint32_t>(s), owner, kPurposeWeight);
      out[s * n + p] = v;
    }
  }
}

template <bool kHier>
__global__ void k_bwd_segments(const float* __restrict__ grad, int64_t n, int64_t K, int64_t S,
                               const int64_t* __restrict__ seg_offsets, const int64_t* __restrict__ seg_pos,
                               const float* __restrict__ seg_coef, const float* __restrict__ means,
                               const float* __restrict__ chol, SeedRef seed_ref, uint32_t owner, uint32_t cb_owner,
                               ElemMap em, double* __restrict__ dz) {
  const Key key = seed_ref.get();
  __shared__ double red_mu[kThreads];
  __shared__ double red_rho[kThreads];
  const int64_t k = blockIdx.x;
  const int64_t lo = seg_offsets[k], hi = seg_offsets[k + 1];
  for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
    const float* g = grad + s * n;
    double acc_mu = 0.0, acc_rho = 0.0;
    for (int64_t t = lo + threadIdx.x; t < hi; t += kThreads) {
      const int64_t p = seg_pos[t];
      // an ellipse position outside [0, n) (unvalidated data) contributes nothing: never a read outside grad
      const double gc = (p >= 0 && p < n) ? static_cast<double>(seg_coef[t]) * static_cast<double>(g[p]) : 0.0;
      acc_mu += gc;
      if (kHier)
        acc_rho += gc * static_cast<double>(normal_at(key, em(p), static_cast<uint32_t>(s), owner, kPurposeWeight));
    }
    red_mu[threadIdx.x] = acc_mu;
    red_rho[threadIdx.x] = acc_rho;
    __syncthreads();
    // Fixed-shape tree: the same pairs are added in the same order on every run.
    for (int w = kThreads / 2; w > 0; w >>= 1) {
      if (threadIdx.x < w) {
        red_mu[threadIdx.x] += red_mu[threadIdx.x + w];
        red_rho[threadIdx.x] += red_rho[threadIdx.x + w];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      double drho = 0.0;
      if (kHier) {
        float xi0, xi1, z_mu, z_rho;
        component_noise(key, static_cast<uint64_t>(k), static_cast<uint32_t>(s), cb_owner, xi0, xi1);
        sample_component(means, chol, static_cast<uint64_t>(k), xi0, xi1, z_mu, z_rho);
        drho = red_rho[0] * static_cast<double>(sigmoid(z_rho));
      }
      dz[2 * (s * K + k)] = red_mu[0];
      dz[2 * (s * K + k) + 1] = drho;
    }
    __syncthreads();  // red_* are reused by the next sample
  }
}

__global__ void k_bwd_final(int64_t K, int64_t S, int mode, const float* __restrict__ chol, const double* __restrict__ dz,
                            SeedRef seed_ref, uint32_t cb_owner, float* __restrict__ grad_means, float* __restrict__ grad_chol) {
  const Key key = seed_ref.get();
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < K;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double g_mmu = 0, g_mrho = 0, g_a = 0, g_b = 0, g_c = 0;
    for (int64_t s = 0; s < S; ++s) {
      const double dmu = dz[2 * (s * K + k)];
      g_mmu += dmu;
      if (mode == kMean) continue;
      float xi0, xi1;
      component_noise(key, static_cast<uint64_t>(k), static_cast<uint32_t>(s), cb_owner, xi0, xi1);
      g_a += dmu * xi0;
      if (mode == kHierarchical) {
        const double drho = dz[2 * (s * K + k) + 1];
        g_mrho += drho;
        g_b += drho * xi0;
        g_c += drho * xi1;
      }
    }
    grad_means[2 * k] = static_cast<float>(g_mmu);
    grad_means[2 * k + 1] = static_cast<float>(g_mrho);
    grad_chol[3 * k] = static_cast<float>(g_a * static_cast<double>(sigmoid(chol[3 * k])));
    grad_chol[3 * k + 1] = static_cast<float>(g_b);
    grad_chol[3 * k + 2] = static_cast<float>(g_c * static_cast<double>(sigmoid(chol[3 * k + 2])));
  }
}

__global__ void k_bwd_outliers(const float* __restrict__ grad, int64_t n, int64_t S, int mode,
                               const int64_t* __restrict__ o_pos, const float* __restrict__ o_rho, int64_t O, SeedRef seed_ref,
                               uint32_t owner, ElemMap em, float* __restrict__ grad_mu_o, float* __restrict__ grad_rho_o) {
  const Key key = seed_ref.get();
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < O;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = o_pos[o];
    double g_mu = 0, g_rho = 0;
    if (p >= 0 && p < n) {
      for (int64_t s = 0; s < S; ++s) {
        const double gv = static_cast<double>(grad[s * n + p]);
        g_mu += gv;
        if (mode != kMean)
          g_rho += gv * static_cast<double>(normal_at(key, em(p), static_cast<uint32_t>(s), owner, kPurposeWeight));
      }
    }
    grad_mu_o[o] = static_cast<float>(g_mu);
    grad_rho_o[o] = mode == kMean ? 0.0f : static_cast<float>(g_rho * static_cast<double>(sigmoid(o_rho[o])));
  }
}

}  // namespace

void reconstruct_cuda(const ReconstructArgs& a, float* out, float* zbuf, uintptr_t stream_ptr) {
  const char* fn = "reconstruct_cuda";
  validate_sizes(a, fn);
  cudaStream_t stream = as_stream(stream_ptr);
  const SeedRef key = seed_ref_of(a);
  const uint32_t owner = static_cast<uint32_t>(a.owner), cb_owner = static_cast<uint32_t>(a.codebook_owner);
  const int64_t K = a.K, S = a.S, n = a.n;
  const int sms = sm_count(fn);
  const int64_t grid_cap = static_cast<int64_t>(sms) * 32;

  k_sample<<<grid_for(S * K, grid_cap), kThreads, 0, stream>>>(a.means, a.chol, K, S, a.mode, key, cb_owner, zbuf);
  SWS_CUDA_CHECK(fn, cudaGetLastError());
  const ElemMap em = elem_map_of(a);  // a shard's global element mapping (the identity for a whole layer)
  const bool quad = quad_aligned(em);

  if (n > 0) {
    const bool hier = a.mode == kHierarchical;
    const int64_t table_floats = hier ? 2 * K : K;
    const bool smem = table_floats <= kSmemFloats;
    const unsigned gy = static_cast<unsigned>(std::min<int64_t>(S, 65535));
    // About 8 resident blocks per SM in total over the samples: each block then covers many weights per
    // shared-memory table load.
    const int64_t x_cap = std::max<int64_t>(1, (static_cast<int64_t>(sms) * 8 + gy - 1) / gy);
    const int64_t work = hier ? (n + 3) / 4 : n;
    const dim3 grid(grid_for(work, smem ? x_cap : grid_cap), gy);
    const size_t shmem = smem ? static_cast<size_t>(table_floats) * sizeof(float) : 0;
    dispatch_labels(fn, a.labels_dtype, a.labels, [&](auto lab) {
      using L = std::remove_cv_t<std::remove_pointer_t<decltype(lab)>>;
      if (hier) {
        if (smem) k_forward<L, true, true><<<grid, kThreads, shmem, stream>>>(lab, n, K, S, zbuf, key, owner, em, quad, out);
        else k_forward<L, true, false><<<grid, kThreads, 0, stream>>>(lab, n, K, S, zbuf, key, owner, em, quad, out);
      } else {
        if (smem) k_forward<L, false, true><<<grid, kThreads, shmem, stream>>>(lab, n, K, S, zbuf, key, owner, em, quad, out);
        else k_forward<L, false, false><<<grid, kThreads, 0, stream>>>(lab, n, K, S, zbuf, key, owner, em, quad, out);
      }
    });
    SWS_CUDA_CHECK(fn, cudaGetLastError());
  }
  if (a.E + a.O > 0) {
    k_overrides<<<grid_for((a.E + a.O) * S, grid_cap), kThreads, 0, stream>>>(
        n, K, S, a.mode, a.means, a.e_pos, a.e_a, a.e_b, a.e_alpha, a.E, a.o_pos, a.o_mu, a.o_rho, a.O, zbuf, key, owner, em, out);
    SWS_CUDA_CHECK(fn, cudaGetLastError());
  }
}

void reconstruct_backward_cuda(const ReconstructArgs& a, const float* grad_out, const int64_t* seg_offsets,
                               const int64_t* seg_pos, const float* seg_coef, int64_t n_entries, double* dzbuf,
                               float* grad_means, float* grad_chol, float* grad_mu_o, float* grad_rho_o,
                               uintptr_t stream_ptr) {
  const char* fn = "reconstruct_backward_cuda";
  validate_sizes(a, fn);
  if (n_entries < 0) throw std::invalid_argument(std::string(fn) + ": n_entries must be >= 0");
  if (a.K > 0x7fffffffll) throw std::invalid_argument(std::string(fn) + ": K must be < 2^31 (one block per component)");
  cudaStream_t stream = as_stream(stream_ptr);
  const SeedRef key = seed_ref_of(a);
  const uint32_t owner = static_cast<uint32_t>(a.owner), cb_owner = static_cast<uint32_t>(a.codebook_owner);
  const int64_t K = a.K, S = a.S, n = a.n;
  const int64_t grid_cap = static_cast<int64_t>(sm_count(fn)) * 32;

  const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>(std::min<int64_t>(S, 65535)));
  const ElemMap em = elem_map_of(a);  // a shard's global element mapping (the identity for a whole layer)
  if (a.mode == kHierarchical) {
    k_bwd_segments<true><<<grid, kThreads, 0, stream>>>(grad_out, n, K, S, seg_offsets, seg_pos, seg_coef, a.means,
                                                        a.chol, key, owner, cb_owner, em, dzbuf);
  } else {
    k_bwd_segments<false><<<grid, kThreads, 0, stream>>>(grad_out, n, K, S, seg_offsets, seg_pos, seg_coef, a.means,
                                                         a.chol, key, owner, cb_owner, em, dzbuf);
  }
  SWS_CUDA_CHECK(fn, cudaGetLastError());
  k_bwd_final<<<grid_for(K, grid_cap), kThreads, 0, stream>>>(K, S, a.mode, a.chol, dzbuf, key, cb_owner, grad_means,
                                                              grad_chol);
  SWS_CUDA_CHECK(fn, cudaGetLastError());
  if (a.O > 0) {
    k_bwd_outliers<<<grid_for(a.O, grid_cap), kThreads, 0, stream>>>(grad_out, n, S, a.mode, a.o_pos, a.o_rho, a.O, key,
                                                                     owner, em, grad_mu_o, grad_rho_o);
    SWS_CUDA_CHECK(fn, cudaGetLastError());
  }
}

void sample_components_cuda(const ReconstructArgs& a, float* zbuf, uintptr_t stream_ptr) {
  const char* fn = "sample_components_cuda";
  validate_sizes(a, fn);
  cudaStream_t stream = as_stream(stream_ptr);
  const int64_t grid_cap = static_cast<int64_t>(sm_count(fn)) * 32;
  k_sample<<<grid_for(a.S * a.K, grid_cap), kThreads, 0, stream>>>(a.means, a.chol, a.K, a.S, a.mode,
                                                                   seed_ref_of(a),
                                                                   static_cast<uint32_t>(a.codebook_owner), zbuf);
  SWS_CUDA_CHECK(fn, cudaGetLastError());
}

}  // namespace sws
