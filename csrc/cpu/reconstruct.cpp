// reconstruct and its backward on the CPU (OpenMP). SPEC.md sections 2-3 and 5.
//
// Forward. The sampled codebook z[S, K] is a few KB-MB, so it is computed once per call (a prologue of
// S*K Philox calls: sample_codebook_cpu, shared with the backward and linear.cpp) and the weights become a
// gather from it. paper/mean mode is memory bound (read labels, write S*n floats): the table is
// sample-interleaved (z[k*S + s]) so one label load feeds all S outputs, tiles of 16 weights are written as whole cache lines, and large outputs use streaming stores
// (no read-for-ownership). In hierarchical mode every weight also needs its own normal: one Philox call
// yields the 4 normals of 4 consecutive weights, so blocks of kFwdBlock elements (a multiple of 4) start
// on counter boundaries. Labels are range-checked per block with a vectorised min/max before gathering.
// Ellipse and outlier positions are overwritten afterwards (positions are unique, checked, so the
// overwrite order does not matter).
//
// Backward: deterministic by construction, whatever the thread count. The n weights are cut into a
// FIXED number of chunks (a function of n, K, S and the mode only, never of the thread count); each chunk
// accumulates private per-(sample, component) partial sums in double, skipping ellipse/outlier positions
// (a bitmask built once per call), and the chunk partials are reduced in chunk order. Ellipse entries are
// then added serially in entry order, outliers are independent per entry. No float atomics anywhere.
// Double accumulators keep the result close to an exact sum, so it also agrees with the float64 reference.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common.h"
#include "parallel.h"
#include "codebook.h"
#include "elem_map.h"
#include "vecmath.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__SSE2__)
#include <immintrin.h>
#define SWS_HAVE_SSE 1
#else
#define SWS_HAVE_SSE 0
#endif

namespace sws {
namespace {

constexpr int64_t kFwdBlock = 4096;        // elements per forward work item (multiple of 4)
constexpr int64_t kStreamBytes = 16 << 20;  // outputs at least this big use streaming stores
constexpr int64_t kBwdChunk = 65536;       // preferred elements per backward chunk
constexpr int64_t kBwdPartialCap = 1 << 21;  // max doubles held in chunk partials (16 MB)

inline bool masked(const uint64_t* mask, int64_t i) { return (mask[i >> 6] >> (i & 63)) & 1; }

[[noreturn]] void bad_labels(const char* fn, int64_t K) {
  throw std::invalid_argument(std::string(fn) + ": a label is outside [0, K) with K = " + std::to_string(K));
}


// paper/mean gather of one block for samples [s0, s0 + G) from the sample-interleaved table z[k*S + s]:
// tiles of 16 weights x G samples are staged in L1 and written as whole 64-byte lines per sample
// (streaming stores when kStream; whole lines let the write-combining buffers flush without reads).
// G is a compile-time constant so the staging loops fully unroll (a runtime G was 2x slower).
template <int G, bool kStream, class L>
inline void gather_group(const L* lab, int64_t i0, int64_t i1, const float* z, int64_t S, int64_t s0, int64_t n,
                         float* out) {
  constexpr int kT = 16;
  int64_t i = i0;
#if SWS_HAVE_SSE
  if (G == 4) {
    // Register-only path: one 16-byte load fetches a weight's 4 samples, 4x4 transposes turn 4 weights x
    // 4 samples into 4 sample rows, and each sample row gets one whole 64-byte line per 16 weights.
    // (Staging through a stack buffer cost store-forwarding stalls.)
    for (; i + kT <= i1; i += kT) {
      __m128 r[4][4];  // [quad of weights][sample]
      for (int qd = 0; qd < 4; ++qd) {
        __m128 a0 = _mm_loadu_ps(z + static_cast<int64_t>(lab[i + 4 * qd]) * S + s0);
        __m128 a1 = _mm_loadu_ps(z + static_cast<int64_t>(lab[i + 4 * qd + 1]) * S + s0);
        __m128 a2 = _mm_loadu_ps(z + static_cast<int64_t>(lab[i + 4 * qd + 2]) * S + s0);
        __m128 a3 = _mm_loadu_ps(z + static_cast<int64_t>(lab[i + 4 * qd + 3]) * S + s0);
        _MM_TRANSPOSE4_PS(a0, a1, a2, a3);
        r[qd][0] = a0;
        r[qd][1] = a1;
        r[qd][2] = a2;
        r[qd][3] = a3;
      }
      for (int u = 0; u < 4; ++u) {
        float* o = out + (s0 + u) * n + i;
        for (int qd = 0; qd < 4; ++qd) {
          if (kStream) _mm_stream_ps(o + 4 * qd, r[qd][u]);
          else _mm_storeu_ps(o + 4 * qd, r[qd][u]);
        }
      }
    }
  }
#endif
  for (; i + kT <= i1; i += kT) {
    alignas(64) float tmp[G][kT];
    for (int t = 0; t < kT; ++t) {
      const float* q = z + static_cast<int64_t>(lab[i + t]) * S + s0;
      for (int u = 0; u < G; ++u) tmp[u][t] = q[u];
    }
    for (int u = 0; u < G; ++u) {
      float* o = out + (s0 + u) * n + i;
#if SWS_HAVE_SSE
      if (kStream) {
        for (int t = 0; t < kT; t += 4) _mm_stream_ps(o + t, _mm_load_ps(tmp[u] + t));
        continue;
      }
#endif
      std::memcpy(o, tmp[u], sizeof(tmp[u]));
    }
  }
  for (; i < i1; ++i) {
    const float* q = z + static_cast<int64_t>(lab[i]) * S + s0;
    for (int u = 0; u < G; ++u) out[(s0 + u) * n + i] = q[u];
  }
}

template <bool kStream, class L>
inline void gather_block(const L* lab, int64_t i0, int64_t i1, const float* z, int64_t S, int64_t n, float* out) {
  // One sample (the usual training step): AVX2 vgatherdps (n = 1M, 1 thread: 0.54 -> 0.50 ms per forward).
  if (S == 1 && gather1(lab + i0, i1 - i0, z, out + i0, kStream)) return;
  int64_t s0 = 0;
  for (; s0 + 4 <= S; s0 += 4) gather_group<4, kStream>(lab, i0, i1, z, S, s0, n, out);
  switch (S - s0) {
    case 3: gather_group<3, kStream>(lab, i0, i1, z, S, s0, n, out); break;
    case 2: gather_group<2, kStream>(lab, i0, i1, z, S, s0, n, out); break;
    case 1: gather_group<1, kStream>(lab, i0, i1, z, S, s0, n, out); break;
    default: break;
  }
}

}  // namespace

// A fresh op output lives in freshly mmap'd pages that fault in 4 KB at a time on first touch; for the
// 64 MB output of n = 4M, S = 4 that costs several times the writes themselves (measured on the 2-core dev
// machine: a fresh 64 MB fill took 34 ms, 8 ms with this hint). Asking for transparent huge pages on the
// page-aligned interior turns ~16K faults into ~32. It is only a hint: failure (or THP off) is harmless.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < (size_t(4) << 20)) return;
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + 4095) & ~uintptr_t(4095);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~uintptr_t(4095);
  if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

void sample_codebook_cpu(const ReconstructArgs& a, int64_t S, const CodebookOut& o) {
  const int64_t K = a.K;
  if (a.mode == kMean) {  // no noise: z_mu = m_mu for every sample
    if (o.mu != nullptr)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t s = 0; s < S; ++s) o.mu[s * o.mu_ss + k * o.mu_ks] = a.means[2 * k];
    return;
  }
  const Key key = seed_key(a.seed);
  const uint32_t cb_owner = static_cast<uint32_t>(a.codebook_owner);
  // softplus of the Cholesky diagonals once (the scalar per-component path cost ~0.3 ms of a ~0.7 ms
  // single-thread n = 1M, S = 1 forward), then per (sample, chunk of kCB components) the xi normals in one
  // normals_fill and z = m + L xi.
  constexpr int64_t kCB = 1024;
  std::vector<float> sp_a(static_cast<size_t>(K)), sp_c(o.sp_rho != nullptr ? static_cast<size_t>(K) : 0);
  for (int64_t k = 0; k < K; ++k) sp_a[k] = a.chol[3 * k];
  softplus_fill(sp_a.data(), sp_a.data(), K);
  if (o.sp_rho != nullptr) {
    for (int64_t k = 0; k < K; ++k) sp_c[k] = a.chol[3 * k + 2];
    softplus_fill(sp_c.data(), sp_c.data(), K);
  }
  const int64_t nck = (K + kCB - 1) / kCB;
  const int nt = parallel_threads(kNsNormal * 2.0 * static_cast<double>(S * K));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t t = 0; t < S * nck; ++t) {
    const int64_t s = t / nck, k0 = (t % nck) * kCB, cnt = std::min(kCB, K - k0);
    alignas(64) float xi[2 * kCB + 4];  // +4: the last counter of an odd chunk writes 2 extra floats
    alignas(64) float zr[kCB];
    normals_fill(key, static_cast<uint64_t>(k0 >> 1), (cnt + 1) >> 1, static_cast<uint32_t>(s), cb_owner,
                 kPurposeComponent, xi);
    for (int64_t q = 0; q < cnt; ++q) {
      const int64_t k = k0 + q;
      const float xi0 = xi[2 * q], xi1 = xi[2 * q + 1];
      if (o.mu != nullptr) o.mu[s * o.mu_ss + k * o.mu_ks] = a.means[2 * k] + sp_a[k] * xi0;
      if (o.sp_rho != nullptr) zr[q] = (a.means[2 * k + 1] + a.chol[3 * k + 1] * xi0) + sp_c[k] * xi1;
      if (o.xi != nullptr) {
        o.xi[s * o.xi_ss + 2 * k] = xi0;
        o.xi[s * o.xi_ss + 2 * k + 1] = xi1;
      }
    }
    if (o.sp_rho != nullptr) {
      softplus_fill(zr, zr, cnt);
      for (int64_t q = 0; q < cnt; ++q) o.sp_rho[s * o.sp_ss + (k0 + q) * o.sp_ks] = zr[q];
    }
  }
}

void reconstruct_cpu(const ReconstructArgs& a, float* out) {
  const char* fn = "reconstruct_cpu";
  validate_sizes(a, fn);
  advise_huge_pages(out, static_cast<size_t>(a.S) * static_cast<size_t>(a.n) * sizeof(float));
  const std::vector<uint64_t> mask = exclusion_mask(a, fn);  // validation only: positions are unique
  const int64_t K = a.K, S = a.S, n = a.n;
  const Key key = seed_key(a.seed);
  const uint32_t owner = static_cast<uint32_t>(a.owner);
  const ElemMap em = elem_map_of(a);  // a shard's global element mapping (identity: the plain stream)
  const bool ident = em.identity();
  const bool hier = a.mode == kHierarchical;

  // Prologue: z table. paper/mean: sample-interleaved zt[k*S + s] = z_mu (mean: m_mu), so one label
  // load serves all S outputs from one cache line. hierarchical: zt[2(s*K + k)] = z_mu,
  // zt[2(s*K + k) + 1] = softplus(z_rho), so one cache line serves both gathers of a weight.
  const int64_t zw = hier ? 2 : 1;
  std::vector<float> zt(static_cast<size_t>(S * K * zw));
  CodebookOut zo;
  zo.mu = zt.data();
  if (hier) {
    zo.mu_ss = zo.sp_ss = 2 * K;
    zo.mu_ks = zo.sp_ks = 2;
    zo.sp_rho = zt.data() + 1;
  } else {
    zo.mu_ss = 1;
    zo.mu_ks = S;
  }
  sample_codebook_cpu(a, S, zo);
  const float* z = zt.data();

  // Inliers (every position; ellipse/outlier positions are overwritten below). Labels are range-checked
  // per block first (a vectorised min/max), so the gathers themselves carry no branch.
  int bad = 0;
  const int64_t nb = (n + kFwdBlock - 1) / kFwdBlock;
  // Streaming (non-temporal) stores skip the read-for-ownership of output lines that will not be read
  // back from cache anyway; small outputs stay cached for the matmul that consumes them.
  const bool stream = S * n * static_cast<int64_t>(sizeof(float)) >= kStreamBytes && n % 4 == 0 &&
                      (reinterpret_cast<uintptr_t>(out) & 15) == 0;
  const int nt = parallel_threads((hier ? kNsNormal : kNsGather) * static_cast<double>(S * n));
  dispatch_labels(fn, a.labels_dtype, a.labels, [&](auto lab) {
    if (!hier) {
#pragma omp parallel for schedule(static) reduction(| : bad) num_threads(nt) if (nt > 1)
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t i0 = b * kFwdBlock, i1 = std::min(n, i0 + kFwdBlock);
        if (!labels_in_range(lab, i0, i1, K)) {
          bad = 1;
          continue;
        }
        if (stream) gather_block<true>(lab, i0, i1, z, S, n, out);
        else gather_block<false>(lab, i0, i1, z, S, n, out);
      }
#if SWS_HAVE_SSE
      if (stream) _mm_sfence();
#endif
    } else {
#pragma omp parallel for schedule(static) reduction(| : bad) num_threads(nt) if (nt > 1)
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t i0 = b * kFwdBlock, i1 = std::min(n, i0 + kFwdBlock);
        if (!labels_in_range(lab, i0, i1, K)) {
          bad = 1;
          continue;
        }
        alignas(64) float eps[kFwdBlock];  // the block's normals (bulk, AVX2 when available: vecmath.cpp)
        for (int64_t s = 0; s < S; ++s) {
          const float* zs = z + 2 * s * K;
          float* o = out + s * n;
          if (ident)
            normals_fill(key, static_cast<uint64_t>(i0 >> 2), (i1 - i0 + 3) >> 2, static_cast<uint32_t>(s), owner,
                         kPurposeWeight, eps);
          else  // a shard: its elements' global noise (elem_map.h)
            mapped_normals_fill(key, em, i0, i1 - i0, static_cast<uint32_t>(s), owner, kPurposeWeight, eps);
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t c = static_cast<int64_t>(lab[i]);
            o[i] = zs[2 * c] + zs[2 * c + 1] * eps[i - i0];
          }
        }
      }
    }
  });
  if (bad) bad_labels(fn, K);

  // Ellipses: the alpha-blend of two sampled components (plus blended noise in hierarchical mode).
  const int nte = parallel_threads((hier ? kNsScalarNormal : kNsGather) * static_cast<double>(S * a.E));
#pragma omp parallel for schedule(static) num_threads(nte) if (nte > 1)
  for (int64_t e = 0; e < a.E; ++e) {
    const int64_t p = a.e_pos[e], ca = a.e_a[e], cb = a.e_b[e];
    const float al = a.e_alpha[e], bl = 1.0f - al;
    for (int64_t s = 0; s < S; ++s) {
      float v;
      if (a.mode == kMean) {
        v = al * a.means[2 * ca] + bl * a.means[2 * cb];
      } else if (!hier) {
        v = al * z[ca * S + s] + bl * z[cb * S + s];
      } else {
        const float* zs = z + 2 * s * K;
        const float mu = al * zs[2 * ca] + bl * zs[2 * cb];
        const float sd = al * zs[2 * ca + 1] + bl * zs[2 * cb + 1];
        v = mu + sd * normal_at(key, em(p), static_cast<uint32_t>(s), owner, kPurposeWeight);
      }
      out[s * n + p] = v;
    }
  }
  // Outliers: their own (mu, rho).
  const int nto = parallel_threads(kNsScalarNormal * static_cast<double>(S * a.O));
#pragma omp parallel for schedule(static) num_threads(nto) if (nto > 1)
  for (int64_t o = 0; o < a.O; ++o) {
    const int64_t p = a.o_pos[o];
    const float mu = a.o_mu[o];
    const float sd = softplus(a.o_rho[o]);
    for (int64_t s = 0; s < S; ++s) {
      out[s * n + p] =
          a.mode == kMean ? mu : mu + sd * normal_at(key, em(p), static_cast<uint32_t>(s), owner, kPurposeWeight);
    }
  }
}

void reconstruct_backward_cpu(const ReconstructArgs& a, const float* grad_out, float* grad_means, float* grad_chol,
                              float* grad_mu_o, float* grad_rho_o) {
  const char* fn = "reconstruct_backward_cpu";
  validate_sizes(a, fn);
  const std::vector<uint64_t> mask_v = exclusion_mask(a, fn);
  const uint64_t* mask = mask_v.empty() ? nullptr : mask_v.data();
  const int64_t K = a.K, S = a.S, n = a.n;
  const Key key = seed_key(a.seed);
  const uint32_t owner = static_cast<uint32_t>(a.owner);
  const ElemMap em = elem_map_of(a);  // a shard's global element mapping (identity: the plain stream)
  const bool ident = em.identity();
  const bool hier = a.mode == kHierarchical;
  const int64_t nacc = hier ? 2 : 1;  // per (s, k): sum dW [, sum dW * eps]
  const int64_t width = S * K * nacc;

  // Fixed chunking: never depends on the thread count. Large S*K means fewer (longer) chunks so the
  // partials stay within kBwdPartialCap doubles; at worst one chunk (serial inlier pass).
  int64_t nchunks = std::max<int64_t>(1, (n + kBwdChunk - 1) / kBwdChunk);
  nchunks = std::min<int64_t>(nchunks, std::max<int64_t>(1, kBwdPartialCap / width));
  int64_t chunk = (n + nchunks - 1) / nchunks;
  chunk = std::max<int64_t>(4, (chunk + 3) / 4 * 4);  // chunks start on counter boundaries
  if (n > 0) nchunks = (n + chunk - 1) / chunk;
  else nchunks = 0;
  std::unique_ptr<double[]> partial(new double[static_cast<size_t>(std::max<int64_t>(1, nchunks) * width)]);

  int bad = 0;
  const int nt = parallel_threads(kNsBackward * (hier ? 2.0 : 1.0) * static_cast<double>(S * n));
  dispatch_labels(fn, a.labels_dtype, a.labels, [&](auto lab) {
#pragma omp parallel for schedule(static) reduction(| : bad) num_threads(nt) if (nt > 1)
    for (int64_t ci = 0; ci < nchunks; ++ci) {
      double* acc = partial.get() + ci * width;
      std::fill(acc, acc + width, 0.0);
      const int64_t i0 = ci * chunk, i1 = std::min(n, i0 + chunk);
      if (!labels_in_range(lab, i0, i1, K)) {  // every label, also those under ellipse/outlier positions
        bad = 1;
        continue;
      }
      for (int64_t s = 0; s < S; ++s) {
        const float* g = grad_out + s * n;
        double* as = acc + s * K * nacc;
        if (!hier) {
          for (int64_t i = i0; i < i1; ++i) {
            if (mask && masked(mask, i)) continue;
            as[static_cast<int64_t>(lab[i])] += static_cast<double>(g[i]);
          }
        } else {
          for (int64_t ib = i0; ib < i1; ib += kFwdBlock) {  // chunks start on counter boundaries
            alignas(64) float eps[kFwdBlock];
            const int64_t ie = std::min(i1, ib + kFwdBlock);
            if (ident)
              normals_fill(key, static_cast<uint64_t>(ib >> 2), (ie - ib + 3) >> 2, static_cast<uint32_t>(s), owner,
                           kPurposeWeight, eps);
            else  // a shard: its elements' global noise (elem_map.h)
              mapped_normals_fill(key, em, ib, ie - ib, static_cast<uint32_t>(s), owner, kPurposeWeight, eps);
            for (int64_t i = ib; i < ie; ++i) {
              if (mask && masked(mask, i)) continue;
              const int64_t c = static_cast<int64_t>(lab[i]);
              const double gv = static_cast<double>(g[i]);
              as[2 * c] += gv;
              as[2 * c + 1] += gv * static_cast<double>(eps[i - ib]);
            }
          }
        }
      }
    }
  });
  if (bad) bad_labels(fn, K);

  // Reduce chunk partials in chunk order.
  std::vector<double> dz(static_cast<size_t>(width), 0.0);
  const int ntr = parallel_threads(kNsGather * static_cast<double>(width * nchunks));
#pragma omp parallel for schedule(static) num_threads(ntr) if (ntr > 1)
  for (int64_t x = 0; x < width; ++x) {
    double v = 0.0;
    for (int64_t ci = 0; ci < nchunks; ++ci) v += partial[ci * width + x];
    dz[x] = v;
  }
  partial.reset();

  // Ellipse entries, added in entry order (serial: fixed order is the point). The noise they need in
  // hierarchical mode is drawn in parallel first.
  if (a.E > 0) {
    std::vector<float> eps_e;
    if (hier) {
      eps_e.resize(static_cast<size_t>(S * a.E));
      const int nte = parallel_threads(kNsScalarNormal * static_cast<double>(S * a.E));
#pragma omp parallel for schedule(static) num_threads(nte) if (nte > 1)
      for (int64_t e = 0; e < a.E; ++e)
        for (int64_t s = 0; s < S; ++s)
          eps_e[s * a.E + e] = normal_at(key, em(a.e_pos[e]), static_cast<uint32_t>(s), owner, kPurposeWeight);
    }
    for (int64_t s = 0; s < S; ++s) {
      const float* g = grad_out + s * n;
      double* ds = dz.data() + s * K * nacc;
      for (int64_t e = 0; e < a.E; ++e) {
        const int64_t ca = a.e_a[e], cb = a.e_b[e];
        const float al = a.e_alpha[e], bl = 1.0f - al;
        const double gv = static_cast<double>(g[a.e_pos[e]]);
        ds[nacc * ca] += static_cast<double>(al) * gv;
        ds[nacc * cb] += static_cast<double>(bl) * gv;
        if (hier) {
          const double ge = gv * static_cast<double>(eps_e[s * a.E + e]);
          ds[2 * ca + 1] += static_cast<double>(al) * ge;
          ds[2 * cb + 1] += static_cast<double>(bl) * ge;
        }
      }
    }
  }

  // Per component: chain rule through z = m + L xi, summed over samples in order. The component noise of
  // every (s, k) comes from the bulk codebook helper first (the scalar per-component Philox + Box-Muller was
  // ~0.25 ms of a ~0.85 ms single-thread n = 1M backward), and softplus' of the Cholesky diagonals in one
  // vector pass.
  const int64_t xrow = 2 * K;  // xiv[s * xrow + 2k + {0, 1}] = (xi0, xi1)
  std::vector<float> xiv;
  std::vector<float> sg_ac(static_cast<size_t>(2 * K));
  for (int64_t k = 0; k < K; ++k) {
    sg_ac[2 * k] = a.chol[3 * k];
    sg_ac[2 * k + 1] = a.chol[3 * k + 2];
  }
  softplus_grad_fill(sg_ac.data(), sg_ac.data(), 2 * K);  // = sigmoid (exactly 1.0f above 20 either way)
  if (a.mode != kMean) {
    xiv.resize(static_cast<size_t>(S * xrow));
    CodebookOut xo;
    xo.xi = xiv.data();
    xo.xi_ss = xrow;
    sample_codebook_cpu(a, S, xo);
  }
  const int ntk = parallel_threads(kNsScalarNormal * static_cast<double>(S * K));
#pragma omp parallel for schedule(static) num_threads(ntk) if (ntk > 1)
  for (int64_t k = 0; k < K; ++k) {
    double g_mmu = 0, g_mrho = 0, g_a = 0, g_b = 0, g_c = 0;
    for (int64_t s = 0; s < S; ++s) {
      const double dmu = dz[(s * K + k) * nacc];
      g_mmu += dmu;
      if (a.mode == kMean) continue;
      const float xi0 = xiv[s * xrow + 2 * k], xi1 = xiv[s * xrow + 2 * k + 1];
      g_a += dmu * xi0;
      if (hier) {
        float z_mu, z_rho;
        sample_component(a.means, a.chol, static_cast<uint64_t>(k), xi0, xi1, z_mu, z_rho);
        const double drho = dz[(s * K + k) * 2 + 1] * static_cast<double>(sigmoid(z_rho));
        g_mrho += drho;
        g_b += drho * xi0;
        g_c += drho * xi1;
      }
    }
    grad_means[2 * k] = static_cast<float>(g_mmu);
    grad_means[2 * k + 1] = static_cast<float>(g_mrho);
    grad_chol[3 * k] = static_cast<float>(g_a * static_cast<double>(sg_ac[2 * k]));
    grad_chol[3 * k + 1] = static_cast<float>(g_b);
    grad_chol[3 * k + 2] = static_cast<float>(g_c * static_cast<double>(sg_ac[2 * k + 1]));
  }

  // Outliers: independent per entry, samples summed in order.
  const int nto = parallel_threads(kNsScalarNormal * static_cast<double>(S * a.O));
#pragma omp parallel for schedule(static) num_threads(nto) if (nto > 1)
  for (int64_t o = 0; o < a.O; ++o) {
    const int64_t p = a.o_pos[o];
    double g_mu = 0, g_rho = 0;
    for (int64_t s = 0; s < S; ++s) {
      const double gv = static_cast<double>(grad_out[s * n + p]);
      g_mu += gv;
      if (a.mode != kMean)
        g_rho += gv * static_cast<double>(normal_at(key, em(p), static_cast<uint32_t>(s), owner, kPurposeWeight));
    }
    grad_mu_o[o] = static_cast<float>(g_mu);
    grad_rho_o[o] = a.mode == kMean ? 0.0f : static_cast<float>(g_rho * static_cast<double>(sigmoid(a.o_rho[o])));
  }
}

}  // namespace sws
