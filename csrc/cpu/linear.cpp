// Fused small-M SWS linear forward on the CPU (paper and mean modes): y[s, m, j] = sum_i x[m, i] W[s, j, i]
// (+ bias[j]) without materialising W.
//
// Why: at M = 16 the reconstruct -> GEMM path writes 4 bytes per weight and the GEMM reads them back
// (memory bound on W), while the weights are only a gather from a K-entry table z (a few KB, in L1).
// Here each weight costs one label load (1-2 bytes) and a broadcast of z[label]: x is transposed to
// xT[i, Mp] (Mp = M rounded up to 8) so the M products of one weight are MV = Mp / 8 contiguous FMAs, and
// R output rows share each xT load (R * MV accumulator registers, enough independent chains to hide the
// FMA latency). Rows are split over threads (OpenMP static) and each y[s, m, j] is one sequential sum over
// i, so the result does not depend on the thread count.
//
// Ellipse/outlier weights: the main pass uses their label's z like any inlier; afterwards a serial pass
// (fixed entry order: ellipses, then outliers) adds x[m, i] * (w_true - w_label), with w_true computed as
// reconstruct_cpu does (same blend, same Philox noise for outliers). Hierarchical mode (a normal per weight)
// keeps the reconstruct + GEMM path in Python.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "parallel.h"
#include "codebook.h"
#include "vecmath.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SWS_LIN_X86 1
#define SWS_AVX2 __attribute__((target("avx2,fma")))
#else
#define SWS_LIN_X86 0
#endif

namespace sws {
namespace {

// acc[r * Mp + m] = sum_i xT[i * Mp + m] * z[lab[r * in_f + i]] for r < R (portable version: the compiler
// vectorises the m loop).
template <int R, class L>
void rows_scalar(const L* lab, int64_t in_f, const float* z, const float* xT, int64_t Mp, float* acc) {
  std::fill(acc, acc + R * Mp, 0.0f);
  for (int64_t i = 0; i < in_f; ++i) {
    const float* xi = xT + i * Mp;
    for (int r = 0; r < R; ++r) {
      const float w = z[static_cast<int64_t>(lab[r * in_f + i])];
      float* ar = acc + r * Mp;
      for (int64_t m = 0; m < Mp; ++m) ar[m] += xi[m] * w;
    }
  }
}

#if SWS_LIN_X86
// acc[r * Mp + m] += sum_{i < cnt} xT[i * Mp + m] * z[lab[r * ld + i]] for r < R, in i order.
// The unroll pragmas are needed: without them GCC keeps acc[][] in memory and stores it every iteration
// (a store per FMA; measured 2x slower at M = 16).
template <int MV, int R, class L>
SWS_AVX2 void rows_avx2(const L* lab, int64_t ld, int64_t cnt, const float* z, const float* xT, float* acc_io) {
  constexpr int64_t Mp = 8 * MV;
  __m256 acc[R][MV];
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 4") for (int v = 0; v < MV; ++v) acc[r][v] = _mm256_loadu_ps(acc_io + r * Mp + 8 * v);
  for (int64_t i = 0; i < cnt; ++i) {
    __m256 xv[MV];
    _Pragma("GCC unroll 4") for (int v = 0; v < MV; ++v) xv[v] = _mm256_loadu_ps(xT + i * Mp + 8 * v);
    _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) {
      const __m256 w = _mm256_broadcast_ss(z + static_cast<int64_t>(lab[r * ld + i]));
      _Pragma("GCC unroll 4") for (int v = 0; v < MV; ++v) acc[r][v] = _mm256_fmadd_ps(xv[v], w, acc[r][v]);
    }
  }
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 4") for (int v = 0; v < MV; ++v) _mm256_storeu_ps(acc_io + r * Mp + 8 * v, acc[r][v]);
}

// Rows per block: R * MV accumulators (at most 12 of the 16 ymm registers: enough independent FMA chains to hide
// the latency, and each xT load, from L2 for M > 8, feeds R rows).
template <int MV>
constexpr int rows_for() {
  return MV == 1 ? 8 : MV == 2 ? 6 : MV == 3 ? 4 : 3;
}

// nrows (< R) leftover rows in one call with a compile-time row count.
template <int MV, int R, class L>
void rows_tail(const L* lab, int64_t nrows, int64_t ld, int64_t cnt, const float* z, const float* xT, float* acc) {
  if constexpr (R > 0) {
    if (nrows == R) rows_avx2<MV, R>(lab, ld, cnt, z, xT, acc);
    else rows_tail<MV, R - 1>(lab, nrows, ld, cnt, z, xT, acc);
  }
}

template <int MV, class L>
void block_avx2(const L* lab, int64_t nrows, int64_t ld, int64_t cnt, const float* z, const float* xT, float* acc) {
  constexpr int R = rows_for<MV>();
  if (nrows == R) rows_avx2<MV, R>(lab, ld, cnt, z, xT, acc);
  else rows_tail<MV, R - 1>(lab, nrows, ld, cnt, z, xT, acc);
}
#endif

}  // namespace

void sws_linear_cpu(const ReconstructArgs& a, const LinearArgs& l) {
  const char* fn = "sws_linear_cpu";
  validate_sizes(a, fn);
  auto fail = [&](const std::string& what) { throw std::invalid_argument(std::string(fn) + ": " + what); };
  if (a.mode == kHierarchical) fail("hierarchical mode is not supported (use reconstruct + GEMM)");
  const int64_t out_f = l.out_f, in_f = l.in_f, M = l.M;
  const bool per_sample = l.per_sample, bias_per_sample = l.bias_per_sample;
  if (out_f < 0 || in_f < 0 || out_f * in_f != a.n) fail("out_f * in_f must equal n");
  if (M < 1 || M > kLinearCpuMaxM) fail("M must be in [1, " + std::to_string(kLinearCpuMaxM) + "], got " + std::to_string(M));
  if (l.x_dtype != kF32) fail("x_dtype must be 0 (float32), got " + std::to_string(l.x_dtype));
  if (l.x == nullptr || l.y == nullptr) fail("null x or y pointer");
  const float* x = static_cast<const float*>(l.x);
  const float* bias = l.bias;
  float* y = static_cast<float*>(l.y);
  const int64_t K = a.K, S = a.S;
  const Key key = seed_key(a.seed);
  const uint32_t owner = static_cast<uint32_t>(a.owner);
  const ElemMap em = elem_map_of(a);  // a shard: outlier noise of its global elements

  // Entry checks (memory safety; the same errors as reconstruct): positions in range and unique,
  // ellipse components in range.
  (void)exclusion_mask(a, fn);

  // The codebook table zt[s * K + k]: sampled z_mu in paper mode (the same helper and bits as reconstruct_cpu's
  // table), m_mu in mean mode (one row: it does not depend on the sample).
  const bool mean = a.mode == kMean;
  const int64_t SZ = mean ? 1 : S;
  std::vector<float> zt(static_cast<size_t>(SZ * K));
  CodebookOut zo;
  zo.mu = zt.data();
  zo.mu_ss = K;
  zo.mu_ks = 1;
  sample_codebook_cpu(a, SZ, zo);

  // xT[sx][i][Mp]: the M values of input i contiguous, zero-padded to Mp.
  const int64_t Mp = (M + 7) / 8 * 8, SX = per_sample ? S : 1;
  std::vector<float> xT(static_cast<size_t>(SX * in_f * Mp), 0.0f);
  for (int64_t sx = 0; sx < SX; ++sx)
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + (sx * M + m) * in_f;
      float* d = xT.data() + sx * in_f * Mp + m;
      for (int64_t i = 0; i < in_f; ++i) d[i * Mp] = xr[i];
    }

  const bool avx2 = SWS_LIN_X86 && std::strcmp(simd_level(), "avx2") == 0;
  constexpr int64_t kRB = 24;  // rows per work item (a multiple of every rows_for<MV>)
  const int64_t nb = (out_f + kRB - 1) / kRB;
  int bad = 0;
  const int nt = parallel_threads(kNsLinearMac * static_cast<double>(S * out_f * in_f * Mp));
  dispatch_labels(fn, a.labels_dtype, a.labels, [&](auto lab) {
#pragma omp parallel for schedule(static) reduction(| : bad) num_threads(nt) if (nt > 1)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t j0 = b * kRB, nr = std::min(kRB, out_f - j0);
      const auto* lb = lab + j0 * in_f;
      if (!labels_in_range(lb, 0, nr * in_f, K)) {
        bad = 1;
        continue;
      }
      alignas(64) float acc[kRB * 32];
      for (int64_t s = 0; s < S; ++s) {
        const float* z = zt.data() + (mean ? 0 : s * K);
        const float* xs = xT.data() + (per_sample ? s : 0) * in_f * Mp;
        bool done = false;
#if SWS_LIN_X86
        if (avx2) {
          const int64_t MV = Mp / 8;
          // i in chunks of ~16 KB of xT, so the chunk is read from L2 once per work item and then reused
          // from L1 by its row groups (xT is 64 KB at M = 16, in = 1024). Each sum still runs in i order.
          const int64_t ib = std::max<int64_t>(64, 4096 / Mp);
          std::fill(acc, acc + nr * Mp, 0.0f);
          auto run = [&](auto mv) {
            constexpr int V = decltype(mv)::value;
            constexpr int R = rows_for<V>();
            for (int64_t i0 = 0; i0 < in_f; i0 += ib) {
              const int64_t cnt = std::min(ib, in_f - i0);
              for (int64_t r = 0; r < nr; r += R)
                block_avx2<V>(lb + r * in_f + i0, std::min<int64_t>(R, nr - r), in_f, cnt, z, xs + i0 * Mp,
                              acc + r * Mp);
            }
          };
          if (MV == 1) run(std::integral_constant<int, 1>());
          else if (MV == 2) run(std::integral_constant<int, 2>());
          else if (MV == 3) run(std::integral_constant<int, 3>());
          else run(std::integral_constant<int, 4>());
          done = true;
        }
#endif
        if (!done)
          for (int64_t r = 0; r < nr; ++r) rows_scalar<1>(lb + r * in_f, in_f, z, xs, Mp, acc + r * Mp);
        const float* bs = bias ? bias + (bias_per_sample ? s * out_f : 0) : nullptr;
        for (int64_t m = 0; m < M; ++m) {
          float* yr = y + (s * M + m) * out_f + j0;
          for (int64_t r = 0; r < nr; ++r) yr[r] = bs ? acc[r * Mp + m] + bs[j0 + r] : acc[r * Mp + m];
        }
      }
    }
  });
  if (bad) fail("a label is outside [0, K) with K = " + std::to_string(K));

  // Sparse correction for ellipse/outlier positions, serial in entry order (deterministic).
  if (a.E + a.O == 0) return;
  dispatch_labels(fn, a.labels_dtype, a.labels, [&](auto lab) {
    auto correct = [&](int64_t p, int64_t s, float w_true) {
      const float* z = zt.data() + (mean ? 0 : s * K);
      const float d = w_true - z[static_cast<int64_t>(lab[p])];
      const int64_t j = p / in_f, i = p % in_f;
      const float* xs = x + (per_sample ? s : 0) * M * in_f;
      for (int64_t m = 0; m < M; ++m) y[(s * M + m) * out_f + j] += xs[m * in_f + i] * d;
    };
    for (int64_t e = 0; e < a.E; ++e) {
      const int64_t ca = a.e_a[e], cb = a.e_b[e];
      const float al = a.e_alpha[e], bl = 1.0f - al;
      for (int64_t s = 0; s < S; ++s) {
        const float v = mean ? al * a.means[2 * ca] + bl * a.means[2 * cb]
                             : al * zt[s * K + ca] + bl * zt[s * K + cb];
        correct(a.e_pos[e], s, v);
      }
    }
    for (int64_t o = 0; o < a.O; ++o) {
      const int64_t p = a.o_pos[o];
      const float mu = a.o_mu[o];
      const float sd = softplus(a.o_rho[o]);
      for (int64_t s = 0; s < S; ++s)
        correct(p, s, mean ? mu : mu + sd * normal_at(key, em(p), static_cast<uint32_t>(s), owner, kPurposeWeight));
    }
  });
}

}  // namespace sws
