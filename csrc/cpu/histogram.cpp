// The label-histogram SWS linear forward on the CPU: S Monte Carlo samples for about the price of one pass.
//
// Why (issue 14): in paper and mean mode every inlier of component k takes one value per sample, z[s, k], so for
// an input row x and an output row j
//     y[s, j] = sum_k z[s, k] h[j, k] + (outlier terms),   h[j, k] = sum of x[i] over the inliers i of j with label k
// and h does not depend on s. One pass over the labels (n additions, independent of S) builds it; all S samples
// then cost a [out, K] x [K, S] product plus the outliers' O x S terms. The fused kernel (linear.cpp) instead
// pays S passes over the weights, and reconstruct + GEMM writes and reads S dense weight matrices.
//
// Stages, per work item of kRows output rows (OpenMP static over items) and per input row m:
//   1. histogram of each row in L1: a run of equal neighbouring labels would chain every add through the same
//      bin (store-to-load forwarding, ~5 cycles each), so kCopies interleaved copies take weights i % kCopies
//      and are summed in a fixed order ((c0 + c1) + (c2 + c3)) afterwards;
//   2. ellipse/outlier positions of the row (a CSR by row, entries in the caller's order): the main pass added
//      x[i] to its label's bin; that is taken back, and an ellipse adds alpha x[i] to bin a and (1 - alpha)
//      x[i] to bin b (all S-independent);
//   3. the product y[s, m, j] = sum_k h[j, k] zt[k, s] for kRows rows at once (each zt row, S contiguous,
//      loaded once per kRows rows; AVX2 FMAs over samples), in k order;
//   4. + the row's outliers x[m, i] w_o[s] in entry order, + bias, store.
// Every y element is produced by one thread in a fixed order: the result does not depend on the thread count
// and is bit-identical run to run. The codebook table and the outlier values are computed once per call (the
// same helper and Philox elements as reconstruct: sample_codebook_cpu, normal_at of the weight stream).
// Shared x only: with a per-sample x every (s, m) would need its own histogram, which is what the fused kernel's
// FMA already is, so per_sample calls keep the fused / reconstruct + GEMM paths (the dispatch in _backend.py).
#include "histogram.h"
#include "parallel.h"  // issue 17: no parallel region below a grain (CLI helper)

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "codebook.h"
#include "vecmath.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SWS_HIST_X86 1
#define SWS_HIST_AVX2 __attribute__((target("avx2,fma")))
#else
#define SWS_HIST_X86 0
#endif

namespace sws {
namespace {

constexpr int kRows = 4;  // output rows per product step: 4 x 2 ymm accumulators, each zt load feeds 4 rows

// One row's histogram with C interleaved copies (bins c * K + k), labels already range-checked.
template <int C, class L>
inline void hist_row(const L* lab, const float* x, int64_t n, float* bins, int64_t K) {
  int64_t i = 0;
  for (; i + C <= n; i += C)
    for (int c = 0; c < C; ++c) bins[c * K + static_cast<int64_t>(lab[i + c])] += x[i + c];
  for (int c = 0; i < n; ++i, ++c) bins[c * K + static_cast<int64_t>(lab[i])] += x[i];
}

// h[k] = fixed-order sum of the C copies.
template <int C>
inline void reduce_copies(const float* bins, int64_t K, float* h) {
  if constexpr (C == 4) {
    for (int64_t k = 0; k < K; ++k) h[k] = (bins[k] + bins[K + k]) + (bins[2 * K + k] + bins[3 * K + k]);
  } else if constexpr (C == 2) {
    for (int64_t k = 0; k < K; ++k) h[k] = bins[k] + bins[K + k];
  } else {
    std::memcpy(h, bins, sizeof(float) * static_cast<size_t>(K));
  }
}

// out[r * Sp + s] = sum_k h[r * K + k] zt[k * Sp + s] for r < kRows, s < Sp (portable; the compiler vectorises s).
void product_scalar(const float* h, int64_t K, const float* zt, int64_t Sp, float* out) {
  std::fill(out, out + kRows * Sp, 0.0f);
  for (int64_t k = 0; k < K; ++k) {
    const float* zk = zt + k * Sp;
    for (int r = 0; r < kRows; ++r) {
      const float hv = h[r * K + k];
      float* o = out + r * Sp;
      for (int64_t s = 0; s < Sp; ++s) o[s] += hv * zk[s];
    }
  }
}

#if SWS_HIST_X86
// The same sums with FMAs, 16 samples (two ymm) at a time: 8 accumulators, one zt load per 4 rows.
SWS_HIST_AVX2 void product_avx2(const float* h, int64_t K, const float* zt, int64_t Sp, float* out) {
  for (int64_t s0 = 0; s0 < Sp; s0 += 16) {
    const bool two = Sp - s0 >= 16;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
    const float* h0 = h;
    const float* h1 = h + K;
    const float* h2 = h + 2 * K;
    const float* h3 = h + 3 * K;
    if (two) {
      for (int64_t k = 0; k < K; ++k) {
        const __m256 z0 = _mm256_loadu_ps(zt + k * Sp + s0), z1 = _mm256_loadu_ps(zt + k * Sp + s0 + 8);
        __m256 b = _mm256_broadcast_ss(h0 + k);
        a00 = _mm256_fmadd_ps(b, z0, a00);
        a01 = _mm256_fmadd_ps(b, z1, a01);
        b = _mm256_broadcast_ss(h1 + k);
        a10 = _mm256_fmadd_ps(b, z0, a10);
        a11 = _mm256_fmadd_ps(b, z1, a11);
        b = _mm256_broadcast_ss(h2 + k);
        a20 = _mm256_fmadd_ps(b, z0, a20);
        a21 = _mm256_fmadd_ps(b, z1, a21);
        b = _mm256_broadcast_ss(h3 + k);
        a30 = _mm256_fmadd_ps(b, z0, a30);
        a31 = _mm256_fmadd_ps(b, z1, a31);
      }
      _mm256_storeu_ps(out + 0 * Sp + s0 + 8, a01);
      _mm256_storeu_ps(out + 1 * Sp + s0 + 8, a11);
      _mm256_storeu_ps(out + 2 * Sp + s0 + 8, a21);
      _mm256_storeu_ps(out + 3 * Sp + s0 + 8, a31);
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const __m256 z0 = _mm256_loadu_ps(zt + k * Sp + s0);
        a00 = _mm256_fmadd_ps(_mm256_broadcast_ss(h0 + k), z0, a00);
        a10 = _mm256_fmadd_ps(_mm256_broadcast_ss(h1 + k), z0, a10);
        a20 = _mm256_fmadd_ps(_mm256_broadcast_ss(h2 + k), z0, a20);
        a30 = _mm256_fmadd_ps(_mm256_broadcast_ss(h3 + k), z0, a30);
      }
    }
    _mm256_storeu_ps(out + 0 * Sp + s0, a00);
    _mm256_storeu_ps(out + 1 * Sp + s0, a10);
    _mm256_storeu_ps(out + 2 * Sp + s0, a20);
    _mm256_storeu_ps(out + 3 * Sp + s0, a30);
  }
}
#endif

// One ellipse/outlier position of a row: its column, and its entry (e < E: ellipse e, else outlier e - E).
struct Special {
  int64_t col;
  int64_t entry;
};

}  // namespace

void sws_linear_histogram_cpu(const ReconstructArgs& a, const LinearArgs& l) {
  const char* fn = "sws_linear_histogram_cpu";
  validate_sizes(a, fn);
  auto fail = [&](const std::string& what) { throw std::invalid_argument(std::string(fn) + ": " + what); };
  if (a.mode == kHierarchical) fail("hierarchical mode is not supported (a normal per weight: use reconstruct + GEMM)");
  const int64_t out_f = l.out_f, in_f = l.in_f, M = l.M, K = a.K, S = a.S;
  if (out_f < 0 || in_f < 0 || out_f * in_f != a.n) fail("out_f * in_f must equal n");
  if (M < 1) fail("M must be >= 1, got " + std::to_string(M));
  if (l.per_sample) fail("per_sample x is not supported (each (sample, row) would need its own histogram)");
  if (l.x_dtype != kF32) fail("x_dtype must be 0 (float32), got " + std::to_string(l.x_dtype));
  if (l.x == nullptr || l.y == nullptr) fail("null x or y pointer");
  const float* x = static_cast<const float*>(l.x);
  const float* bias = l.bias;
  float* y = static_cast<float*>(l.y);
  const Key key = seed_key(a.seed);
  const uint32_t owner = static_cast<uint32_t>(a.owner);
  (void)exclusion_mask(a, fn);  // positions in range and unique, ellipse components in range (memory safety)

  // The codebook table zt[k * Sp + s], samples contiguous and zero-padded to Sp (a multiple of 8); mean mode
  // has one column (the means do not depend on the sample).
  const bool mean = a.mode == kMean;
  const int64_t SZ = mean ? 1 : S, Sp = (SZ + 7) / 8 * 8;
  std::vector<float> zt(static_cast<size_t>(K * Sp), 0.0f);
  CodebookOut zo;
  zo.mu = zt.data();
  zo.mu_ss = 1;
  zo.mu_ks = Sp;
  sample_codebook_cpu(a, SZ, zo);

  // Ellipse then outlier entries as a CSR by output row (entry order kept within a row: a counting sort).
  const int64_t nsp = a.E + a.O;
  std::vector<int64_t> row_off(static_cast<size_t>(out_f + 1), 0);
  std::vector<Special> sp(static_cast<size_t>(nsp));
  auto pos_of = [&](int64_t e) { return e < a.E ? a.e_pos[e] : a.o_pos[e - a.E]; };
  if (nsp) {
    for (int64_t e = 0; e < nsp; ++e) ++row_off[static_cast<size_t>(pos_of(e) / in_f + 1)];
    for (int64_t j = 0; j < out_f; ++j) row_off[j + 1] += row_off[j];
    std::vector<int64_t> fill(row_off.begin(), row_off.end() - 1);
    for (int64_t e = 0; e < nsp; ++e) {
      const int64_t p = pos_of(e);
      sp[static_cast<size_t>(fill[p / in_f]++)] = Special{p % in_f, e};
    }
  }
  // Outlier values w_o[o * SZ + s] = mu + softplus(rho) eps[s, p] (the reconstruct's bits), mean mode: mu.
  // The noise is most of this prologue (S * O Philox calls: one per normal, outliers rarely share a counter),
  // so it runs in fixed chunks of outliers over the threads (vector normals: normals_at_fill).
  std::vector<float> wo(static_cast<size_t>(a.O * SZ));
  constexpr int64_t kOutChunk = 512;
  const int64_t nchunk = (a.O + kOutChunk - 1) / kOutChunk;
  const int nto = parallel_threads(kNsScalarNormal * static_cast<double>(a.O * SZ));
#pragma omp parallel for schedule(static) num_threads(nto) if (nto > 1)
  for (int64_t c = 0; c < nchunk; ++c) {
    const int64_t o0 = c * kOutChunk, o1 = std::min(a.O, o0 + kOutChunk);
    if (mean) {
      for (int64_t o = o0; o < o1; ++o) wo[o] = a.o_mu[o];
      continue;
    }
    float* w = wo.data() + o0 * S;
    normals_at_fill(key, a.o_pos + o0, o1 - o0, S, owner, kPurposeWeight, w);
    float sd[kOutChunk];
    softplus_fill(a.o_rho + o0, sd, o1 - o0);
    for (int64_t o = o0; o < o1; ++o) {
      const float mu = a.o_mu[o], so = sd[o - o0];
      for (int64_t s = 0; s < S; ++s) w[(o - o0) * S + s] = mu + so * w[(o - o0) * S + s];
    }
  }

  const int copies = K <= 1024 ? 4 : 2;
  const bool avx2 = SWS_HIST_X86 && std::strcmp(simd_level(), "avx2") == 0;
  const int64_t nb = (out_f + kRows - 1) / kRows;
  int bad = 0;
  // histograms (M passes over the labels) plus the [rows, K] x [K, Sp] products
  const int nt = parallel_threads(kNsGather * static_cast<double>(M * out_f * in_f) +
                                  kNsLinearMac * static_cast<double>(M * out_f * K * Sp));
  dispatch_labels(fn, a.labels_dtype, a.labels, [&](auto lab) {
#pragma omp parallel reduction(| : bad) num_threads(nt) if (nt > 1)
    {
      std::vector<float> bins(static_cast<size_t>(copies * K));
      std::vector<float> h(static_cast<size_t>(kRows * K), 0.0f);  // rows >= nr: computed, never stored
      std::vector<float> acc(static_cast<size_t>(kRows * Sp));
#pragma omp for schedule(static)
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t j0 = b * kRows, nr = std::min<int64_t>(kRows, out_f - j0);
        const auto* lb = lab + j0 * in_f;
        if (!labels_in_range(lb, 0, nr * in_f, K)) {
          bad = 1;
          continue;
        }
        for (int64_t m = 0; m < M; ++m) {
          const float* xm = x + m * in_f;
          // Stages 1-2: the histograms of the nr rows.
          for (int64_t r = 0; r < nr; ++r) {
            const auto* lr = lb + r * in_f;
            float* hr = h.data() + r * K;
            std::fill(bins.begin(), bins.end(), 0.0f);
            if (copies == 4) {
              hist_row<4>(lr, xm, in_f, bins.data(), K);
              reduce_copies<4>(bins.data(), K, hr);
            } else {
              hist_row<2>(lr, xm, in_f, bins.data(), K);
              reduce_copies<2>(bins.data(), K, hr);
            }
            const int64_t j = j0 + r;
            for (int64_t t = row_off[j]; t < row_off[j + 1]; ++t) {
              const Special& q = sp[static_cast<size_t>(t)];
              const float xv = xm[q.col];
              hr[static_cast<int64_t>(lr[q.col])] -= xv;
              if (q.entry < a.E) {
                const float al = a.e_alpha[q.entry];
                hr[a.e_a[q.entry]] += al * xv;
                hr[a.e_b[q.entry]] += (1.0f - al) * xv;
              }
            }
          }
          // Stage 3: the [nr, K] x [K, S] product.
#if SWS_HIST_X86
          if (avx2) product_avx2(h.data(), K, zt.data(), Sp, acc.data());
          else product_scalar(h.data(), K, zt.data(), Sp, acc.data());
#else
          product_scalar(h.data(), K, zt.data(), Sp, acc.data());
#endif
          // Stage 4: outliers, bias, store.
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t j = j0 + r;
            float* ar = acc.data() + r * Sp;
            for (int64_t t = row_off[j]; t < row_off[j + 1]; ++t) {
              const Special& q = sp[static_cast<size_t>(t)];
              if (q.entry < a.E) continue;
              const float xv = xm[q.col];
              const float* w = wo.data() + (q.entry - a.E) * SZ;
              for (int64_t s = 0; s < SZ; ++s) ar[s] += xv * w[s];
            }
            for (int64_t s = 0; s < S; ++s) {
              const float v = ar[mean ? 0 : s];
              const float* bs = bias ? bias + (l.bias_per_sample ? s * out_f : 0) : nullptr;
              y[(s * M + m) * out_f + j] = bs ? v + bs[j] : v;
            }
          }
        }
      }
    }
  });
  if (bad) fail("a label is outside [0, K) with K = " + std::to_string(K));
}

}  // namespace sws
