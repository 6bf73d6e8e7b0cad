// The label-histogram SWS linear forward on the CPU: S Monte Carlo samples for about the price of one pass.
//
// Why (issue 14): in paper and mean mode every inlier of component k takes one value per sample, z[s, k], so for
// an input row x and an output row j
//     y[s, j] = sum_k z[s, k] h[j, k] + (outlier terms),   h[j, k] = sum of x[i] over the inliers i of j with label k
// and h does not depend on s. One pass over the labels (n additions, independent of S) builds it; all S samples
// then cost a [out, K] x [K, S] product plus the outliers' O x S terms. The fused kernel (linear.cpp) instead
// pays S passes over the weights, and reconstruct + GEMM writes and reads S dense weight matrices.
//
// Two inner loops, chosen per call (simd_isa() and a cost estimate, see `gather` below); per work item of kRows
// output rows (OpenMP static over items):
//   gather (AVX-512, up to 64 samples): the same sums in the other order, y[s, j] = sum_i x[i] z[s, lab[j, i]]:
//      per weight one aligned load of its label's row of zt (16 samples per cache line) and one FMA per 16
//      samples and x row, 4 output rows sharing the x lanes; no stores, ~0.7 cycle per weight at S = 16. An
//      ellipse/outlier position then gets x[i] (w[s] - z[s, label]) added (correct_row).
//   histogram (AVX2 / scalar machines, and AVX-512 with 48-64 samples and a small K / in):
//   1. histogram of each row in L1: a run of equal neighbouring labels would chain every add through the same
//      bin (store-to-load forwarding, ~5 cycles each), so C interleaved copies take weights i % C and are summed
//      in a fixed order ((c0 + c1) + (c2 + c3)) afterwards (the store port bounds it: ~1 cycle per weight);
//   2. ellipse/outlier positions of the row: the main pass added x[i] to its label's bin; that is taken back, and
//      an ellipse adds alpha x[i] to bin a and (1 - alpha) x[i] to bin b (all S-independent);
//   3. the product y[s, m, j] = sum_k h[j, k] zt[k, s] for kRows rows at once (each zt row, S contiguous,
//      loaded once per kRows rows; AVX2 FMAs over samples), in k order;
//   4. + the row's outliers x[m, i] w_o[s] in entry order.
// Then + bias and the store. The ellipse/outlier entries come as CSRs by row (entry order kept within a row; cached
// per calling thread for repeated calls on the same entries); an item's outlier values w_o[s] = mu + softplus(rho)
// eps[s] are generated for that item (normals_at_fill: the reconstruct's Philox elements). Every y element is
// produced by one thread in a fixed order: the result does not depend on the thread count and is bit-identical
// run to run. Shared x only: with a per-sample x every (s, m) would need its own pass, which is what the fused
// kernel's FMA already is, so per_sample calls keep the fused / reconstruct + GEMM paths (the dispatch in
// _backend.py).
#include "histogram.h"
#include "parallel.h"  // issue 17: no parallel region below a grain (CLI helper)

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "codebook.h"
#include "vecmath.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SWS_HIST_X86 1
#define SWS_HIST_AVX2 __attribute__((target("avx2,fma")))
#define SWS_HIST_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#else
#define SWS_HIST_X86 0
#endif

// GCC 12 flags the AVX-512 intrinsics' own _mm512_undefined_* (self-initialised on purpose) under -Wall.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace sws {
namespace {

constexpr int kRows = 4;  // output rows per work item (and per product step: each zt load feeds 4 rows)

// One ellipse/outlier entry in row order (the CSRs below): its flat position and, for an ellipse, its entry index,
// for an outlier its (mu, rho). One 16-byte slot per entry: the counting sort's scattered writes touch one cache
// line per entry (three separate arrays cost three, which shows when the caches are cold).
struct Slot {
  int64_t pos;
  union {
    int64_t entry;
    struct {
      float mu, rho;
    } w;
  };
};

// One row's histogram with C interleaved copies (label i goes to copy i % C), labels already range-checked (so an
// int8/int16 label's bits are its value): 8 labels per step from one or two 64-bit loads.
template <int C, class L>
inline void hist_row(const L* lab, const float* x, int64_t n, float* bins, int64_t K) {
  int64_t i = 0;
  if constexpr (sizeof(L) == 1) {
    for (; i + 8 <= n; i += 8) {
      uint64_t w;
      std::memcpy(&w, lab + i, 8);
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) bins[(c % C) * K + static_cast<int64_t>((w >> (8 * c)) & 0xff)] += x[i + c];
    }
  } else if constexpr (sizeof(L) == 2) {
    for (; i + 8 <= n; i += 8) {
      uint64_t w[2];
      std::memcpy(w, lab + i, 16);
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c)
        bins[(c % C) * K + static_cast<int64_t>((w[c / 4] >> (16 * (c % 4))) & 0xffff)] += x[i + c];
    }
  }
  for (; i < n; ++i) bins[(i % C) * K + static_cast<int64_t>(lab[i])] += x[i];
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

// 8 labels of a row as indices (range-checked: an int8/int16 label's bits are its value): one 64-bit load for
// 1-byte labels, two for int16, plain loads otherwise.
template <class L>
struct Lab8 {
  uint64_t w[sizeof(L) == 2 ? 2 : 1];
  const L* p;
  inline void load(const L* q) {
    if constexpr (sizeof(L) <= 2) std::memcpy(w, q, 8 * sizeof(L));
    else p = q;
  }
  // Nonzero when one of the 8 labels is negative or >= K (int8 / int16 only, K <= 2^7 / 2^15): per lane,
  // (x | H) - K has its top bit set iff x >= K for 0 <= x < H, and x's own top bit flags a negative label; the
  // lanes never borrow from each other since x | H >= H >= K.
  inline uint64_t bad(uint64_t krep, uint64_t hmask) const {
    uint64_t b = 0;
    for (int q = 0; q < (sizeof(L) == 2 ? 2 : 1); ++q) b |= (((w[q] | hmask) - krep) | w[q]) & hmask;
    return b;
  }
  inline int64_t operator[](int u) const {
    if constexpr (sizeof(L) == 1) return static_cast<int64_t>((w[0] >> (8 * u)) & 0xff);
    else if constexpr (sizeof(L) == 2) return static_cast<int64_t>((w[u / 4] >> (16 * (u % 4))) & 0xffff);
    else return static_cast<int64_t>(p[u]);
  }
};

// The sample-vector gather (AVX-512), R output rows at once:
//   out[(r * M + m) * 16V + s] = sum_i x[m * n + i] zt[lab[r * n + i] * 16V + s],  r < R, m < MB, s < 16V.
// Per weight: one aligned 16V-float load of its label's row of samples and MB x V FMAs (every sample and x row at
// once), no stores; the x values of 8 columns come in one load and reach the lanes by permutes shared by the R
// rows. U interleaved partial sums per (r, m, v) hide the FMA latency; they are added in a fixed tree order.
template <int R, int MB, int V>
constexpr int gather_unroll() {
  return R * MB * V >= 8 ? 1 : R * MB * V >= 4 ? 2 : R * MB * V >= 2 ? 4 : 8;
}

// Labels checked in the loop itself (no separate range pass over them) for int8 / int16 with K <= 2^7 / 2^15.
template <class L>
constexpr bool kInLoopCheck = (sizeof(L) == 2 && std::is_signed_v<L>) || (sizeof(L) == 1 && std::is_signed_v<L>);

template <class L>
inline bool in_loop_check(int64_t K) {
  return kInLoopCheck<L> && K <= (int64_t{1} << (8 * sizeof(L) - 1));
}

// Returns false (results undefined) at the first 8-label step with a label outside [0, K) when `check`.
template <int R, int MB, int V, class L>
SWS_HIST_AVX512 bool gather_block(const L* lab, int64_t n, const float* x, int64_t M, const float* zt, float* out,
                                  bool check, int64_t K) {
  const uint64_t lanes = sizeof(L) == 2 ? 0x0001000100010001ull : 0x0101010101010101ull;
  const uint64_t krep = static_cast<uint64_t>(K) * lanes, hmask = (sizeof(L) == 2 ? 0x8000ull : 0x80ull) * lanes;
  constexpr int U = gather_unroll<R, MB, V>();
  constexpr int64_t SP = 16 * V;
  __m512 acc[U][R][MB][V];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m)
        for (int v = 0; v < V; ++v) acc[u][r][m][v] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    Lab8<L> lw[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) lw[r].load(lab + r * n + i);
    // the next R rows' labels (the thread's next block, or past the array: a prefetch never faults) into L2 while
    // this block computes: one line per row every 64 / sizeof(L) labels
    if ((i * static_cast<int64_t>(sizeof(L))) % 64 == 0) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(lab + (R + r) * n + i), _MM_HINT_T1);
    }
    if constexpr (kInLoopCheck<L>) {
      if (check) {
        uint64_t b = 0;
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) b |= lw[r].bad(krep, hmask);
        if (b != 0) return false;
      }
    }
    __m512 xv[MB];
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_castps256_ps512(_mm256_loadu_ps(x + m * n + i));
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      __m512 xb[MB];
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) xb[m] = _mm512_permutexvar_ps(_mm512_set1_epi32(c), xv[m]);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const float* z = zt + lw[r][c] * SP;
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) {
          const __m512 zv = _mm512_load_ps(z + 16 * v);
#pragma GCC unroll 4
          for (int m = 0; m < MB; ++m) acc[c % U][r][m][v] = _mm512_fmadd_ps(xb[m], zv, acc[c % U][r][m][v]);
        }
      }
    }
  }
  for (; i < n; ++i) {
    for (int r = 0; r < R; ++r) {
      if (check && (static_cast<int64_t>(lab[r * n + i]) < 0 || static_cast<int64_t>(lab[r * n + i]) >= K)) return false;
      const float* z = zt + static_cast<int64_t>(lab[r * n + i]) * SP;
      for (int m = 0; m < MB; ++m) {
        const __m512 xb = _mm512_set1_ps(x[m * n + i]);
        for (int v = 0; v < V; ++v) acc[0][r][m][v] = _mm512_fmadd_ps(xb, _mm512_load_ps(z + 16 * v), acc[0][r][m][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int w = 1; w < U; w *= 2)
    for (int u = 0; u + w < U; u += 2 * w)
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m)
          for (int v = 0; v < V; ++v) acc[u][r][m][v] = _mm512_add_ps(acc[u][r][m][v], acc[u + w][r][m][v]);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + (r * M + m) * SP + 16 * v, acc[0][r][m][v]);
  return true;
}

// All M rows of x for R output rows: blocks of MB x rows (R * MB * V <= 16 accumulators).
template <int R, int V, class L>
SWS_HIST_AVX512 bool gather_rows(const L* lab, int64_t n, const float* x, int64_t M, const float* zt, float* out,
                                 bool check, int64_t K) {
  int64_t m = 0;
  if constexpr (R * V <= 4) {
    for (; m + 4 <= M; m += 4)
      if (!gather_block<R, 4, V>(lab, n, x + m * n, M, zt, out + m * 16 * V, check, K)) return false;
  }
  if constexpr (R * V <= 8 && V <= 2) {
    for (; m + 2 <= M; m += 2)
      if (!gather_block<R, 2, V>(lab, n, x + m * n, M, zt, out + m * 16 * V, check, K)) return false;
  }
  for (; m < M; ++m)
    if (!gather_block<R, 1, V>(lab, n, x + m * n, M, zt, out + m * 16 * V, check, K)) return false;
  return true;
}

// The ellipse/outlier entries of one output row on its gather results ar[m * Sp + s] (the gather added
// x[m, col] zt[label, s] at each entry's column): += x[m, col] (w[s] - zt[label, s]) with, for an ellipse,
// w = alpha z[a] + (1 - alpha) z[b], and for an outlier w = mu + softplus(rho) eps[s] (eps: its SZ normals, sd[q]
// its softplus(rho)). Entries in slot order; the row's results stay in registers (per x row m).
template <int V, class L>
SWS_HIST_AVX512 void correct_row(float* ar, int64_t M, const float* x, int64_t in_f, const L* lr, int64_t base,
                                 const float* zt, int64_t SZ, int64_t e0, int64_t e1, const Slot* es,
                                 const int64_t* e_a, const int64_t* e_b, const float* e_alpha,
                                 int64_t o0, int64_t o1, const int64_t* opos, const float* omu, const float* sd,
                                 const float* eps, int64_t tb) {
  constexpr int64_t SP = 16 * V;
  __mmask16 km[V];
  for (int v = 0; v < V; ++v) {
    const int64_t left = SZ - 16 * v;
    km[v] = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>(left <= 0 ? 0u : (1u << left) - 1u);
  }
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * in_f;
    __m512 acc[V];
    for (int v = 0; v < V; ++v) acc[v] = _mm512_loadu_ps(ar + m * SP + 16 * v);
    for (int64_t t = e0; t < e1; ++t) {
      const int64_t e = es[t].entry, col = es[t].pos - base;
      const float* za = zt + e_a[e] * SP;
      const float* zb = zt + e_b[e] * SP;
      const float* zl = zt + static_cast<int64_t>(lr[col]) * SP;
      const __m512 al = _mm512_set1_ps(e_alpha[e]), bl = _mm512_set1_ps(1.0f - e_alpha[e]);
      const __m512 xv = _mm512_set1_ps(xm[col]);
      for (int v = 0; v < V; ++v) {
        const __m512 w = _mm512_add_ps(_mm512_mul_ps(al, _mm512_load_ps(za + 16 * v)),
                                       _mm512_mul_ps(bl, _mm512_load_ps(zb + 16 * v)));
        acc[v] = _mm512_fmadd_ps(xv, _mm512_sub_ps(w, _mm512_load_ps(zl + 16 * v)), acc[v]);
      }
    }
    for (int64_t t = o0; t < o1; ++t) {
      const int64_t q = t - tb, col = opos[q] - base;
      const float* zl = zt + static_cast<int64_t>(lr[col]) * SP;
      const __m512 mu = _mm512_set1_ps(omu[q]), so = _mm512_set1_ps(sd[q]), xv = _mm512_set1_ps(xm[col]);
      for (int v = 0; v < V; ++v) {
        const __m512 w = _mm512_fmadd_ps(so, _mm512_maskz_loadu_ps(km[v], eps + q * SZ + 16 * v), mu);
        acc[v] = _mm512_fmadd_ps(xv, _mm512_sub_ps(w, _mm512_load_ps(zl + 16 * v)), acc[v]);
      }
    }
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(ar + m * SP + 16 * v, acc[v]);
  }
}
#endif

// Row r = p / d for 0 <= p < 2^34 without a division: a double reciprocal and a one-step fix.
struct RowOf {
  int64_t d;
  double inv;
  explicit RowOf(int64_t d_) : d(d_), inv(1.0 / static_cast<double>(d_)) {}
  int64_t operator()(int64_t p) const {
    int64_t q = static_cast<int64_t>(static_cast<double>(p) * inv);
    if (q * d > p) --q;
    else if ((q + 1) * d <= p) ++q;
    return q;
  }
};

// A CSR by output row of N entries with flat positions pos[e] (entry order kept within a row): off[out_f + 1],
// and slot[t] = {position, entry} (f0 null) or {position, (f0[e], f1[e])}, written in slot order here and read
// sequentially later. Counting sort over T chunks of entries (chunk c's entries of a row after those of chunks < c:
// the order does not depend on T). The slots are written only by the parallel fill, and kept by the calling thread
// for its next call (a fresh multi-MB allocation per call is fresh pages: their faults cost about as much as the
// fill).
template <class T>
struct Scratch {
  std::unique_ptr<T[]> p;
  size_t cap = 0;
  T* get(size_t n) {
    if (n > cap) p.reset(new T[n]), cap = n;
    return p.get();
  }
};

struct Csr {
  std::vector<int64_t> off;
  Scratch<Slot> buf;
  Slot* slot = nullptr;
};

// Returns -1, or the index of an entry whose position is outside [0, n) (nothing filled then).
int64_t csr_by_row(const int64_t* pos, int64_t N, int64_t n, int64_t out_f, const RowOf& row_of, int nt,
                   const float* f0, const float* f1, Csr& c) {
  c.off.assign(static_cast<size_t>(out_f + 1), 0);
  const size_t cap = static_cast<size_t>(std::max<int64_t>(N, 1));
  c.slot = c.buf.get(cap);
  if (N == 0) return -1;
  int64_t bad = N;
  const int T = N >= 65536 ? nt : 1;
  std::vector<int64_t> cnt(static_cast<size_t>(T) * static_cast<size_t>(out_f), 0);
#pragma omp parallel num_threads(T) if (T > 1)
  {
#ifdef _OPENMP
    const int ci = omp_get_thread_num();
#else
    const int ci = 0;
#endif
    const int64_t e0 = N * ci / T, e1 = N * (ci + 1) / T;
    int64_t* cc = cnt.data() + static_cast<int64_t>(ci) * out_f;
    int64_t first_bad = N;
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t p = pos[e];
      if (p < 0 || p >= n) {
        first_bad = e;
        break;
      }
      ++cc[row_of(p)];
    }
    if (first_bad < N) {
#pragma omp critical(sws_hist_csr)
      bad = std::min(bad, first_bad);
    }
#pragma omp barrier
#pragma omp single
    {
      int64_t run = 0;
      for (int64_t j = 0; j < out_f; ++j) {
        c.off[static_cast<size_t>(j)] = run;
        for (int t = 0; t < T; ++t) {
          int64_t& v = cnt[static_cast<size_t>(t) * static_cast<size_t>(out_f) + static_cast<size_t>(j)];
          const int64_t k = v;
          v = run;
          run += k;
        }
      }
      c.off[static_cast<size_t>(out_f)] = run;
    }
    if (bad == N) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t p = pos[e];
        const int64_t t = cc[row_of(p)]++;
        Slot q;
        q.pos = p;
        if (f0 != nullptr) q.w.mu = f0[e], q.w.rho = f1[e];
        else q.entry = e;
        c.slot[t] = q;
      }
    }
  }
  return bad < N ? bad : -1;
}

// The CSRs of the last few entry sets each calling thread used, for repeated inference calls on the same layer
// (their counting sort is ~10% of a call, more with cold caches: its writes are scattered). Exact: an entry is
// reused only when the caller's e_pos, o_pos, o_mu and o_rho are equal, element for element, to the copies taken
// when it was built (a sequential compare, ~5x cheaper than the sort); anything else rebuilds it. (e_a, e_b, e_alpha
// are read through the entry index at every call, never cached.) ~32 bytes per entry and cached set.
struct CsrCacheEntry {
  const void* key[4] = {nullptr, nullptr, nullptr, nullptr};
  int64_t E = -1, O = -1, n = -1, out_f = -1;
  std::vector<int64_t> e_pos, o_pos;
  std::vector<float> o_mu, o_rho;
  Csr ec, oc;
  uint64_t used = 0;
};
constexpr size_t kCsrCacheSets = 4;
constexpr int64_t kCsrCacheMaxEntries = int64_t{1} << 22;

template <class T>
bool same(const std::vector<T>& copy, const T* p, int64_t N) {
  return N == 0 || std::memcmp(copy.data(), p, sizeof(T) * static_cast<size_t>(N)) == 0;
}

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
  // Entry checks (memory safety): ellipse components here, positions in range while the CSRs are built, unique
  // positions per row in the main loop (exclusion_mask's checks, without its n-bit mask).
  for (int64_t e = 0; e < a.E; ++e)
    if (a.e_a[e] < 0 || a.e_a[e] >= K || a.e_b[e] < 0 || a.e_b[e] >= K)
      fail("ellipse " + std::to_string(e) + " has components (" + std::to_string(a.e_a[e]) + ", " +
           std::to_string(a.e_b[e]) + ") outside [0, " + std::to_string(K) + ")");
  if (out_f == 0 || in_f == 0) {
    if (a.E + a.O > 0) (void)exclusion_mask(a, fn);  // (every position is out of range: its message)
    for (int64_t i = 0; i < S * M * out_f; ++i) y[i] = 0.0f;
    return;
  }

  // The codebook table zt[k * Sp + s], samples contiguous and zero-padded to Sp (a multiple of 16), 64-byte
  // aligned (a row of 16 samples is one cache line); mean mode has one column (the means do not depend on s).
  const bool mean = a.mode == kMean;
  const int64_t SZ = mean ? 1 : S, Sp = (SZ + 15) / 16 * 16, V = Sp / 16;
  std::vector<float> zt_buf(static_cast<size_t>(K * Sp + 16), 0.0f);
  float* const zt_p = zt_buf.data() + ((64 - reinterpret_cast<uintptr_t>(zt_buf.data()) % 64) % 64) / sizeof(float);
  CodebookOut zo;
  zo.mu = zt_p;
  zo.mu_ss = 1;
  zo.mu_ks = Sp;
  sample_codebook_cpu(a, SZ, zo);

  // Which inner loop (both produce every y element on one thread, in a fixed order):
  //  gather (AVX-512, Sp <= 64): per weight its label's row of zt (all samples) times x: Sp / 16 vector loads and
  //    M * Sp / 16 FMAs, no stores (~0.18 ns per weight and x row at Sp = 16, ~0.14 ns more per further 16);
  //  histogram: per weight and x row one scalar add into an L1 bin (~0.35 ns: one scattered store per weight, the
  //    store port is the limit), then the [rows, K] x [K, Sp] product (K * Sp / in_f FMAs per weight and x row).
  // The gather unless the histogram's estimate is lower (small K / in_f with 48 or 64 samples).
  const char* isa = simd_isa();
  const bool avx2 = SWS_HIST_X86 && std::strcmp(isa, "scalar") != 0;
  const double kr = static_cast<double>(K) / static_cast<double>(std::max<int64_t>(in_f, 1));
  const bool gather = SWS_HIST_X86 && std::strcmp(isa, "avx512") == 0 && V <= 4 &&
                      0.04 + 0.14 * static_cast<double>(V) <= 0.35 + 0.15 * kr * static_cast<double>(V);

  // Ellipse and outlier entries as CSRs by output row (entry order kept within a row).
  const RowOf row_of(in_f);
  const int ntc = parallel_threads(20.0 * static_cast<double>(a.E + a.O));
  // ellipses: positions and entries; outliers: positions, mu and rho (slot order); from the cache when the
  // entries are those of a cached set
  thread_local std::vector<std::unique_ptr<CsrCacheEntry>> cache;
  thread_local uint64_t tick = 0;
  const void* ckey[4] = {a.e_pos, a.o_pos, a.o_mu, a.o_rho};
  CsrCacheEntry* ce = nullptr;
  for (auto& c : cache)
    if (std::equal(ckey, ckey + 4, c->key) && c->E == a.E && c->O == a.O && c->n == a.n && c->out_f == out_f) ce = c.get();
  const bool hit = ce != nullptr && same(ce->e_pos, a.e_pos, a.E) && same(ce->o_pos, a.o_pos, a.O) &&
                   same(ce->o_mu, a.o_mu, a.O) && same(ce->o_rho, a.o_rho, a.O);
  if (ce == nullptr) {
    if (cache.size() < kCsrCacheSets) {
      cache.push_back(std::make_unique<CsrCacheEntry>());
      ce = cache.back().get();
    } else {
      ce = std::min_element(cache.begin(), cache.end(), [](const auto& u, const auto& v) { return u->used < v->used; })
               ->get();
    }
  }
  ce->used = ++tick;
  if (!hit) {
    ce->E = -1;  // invalid until built and copied
    const int64_t be = csr_by_row(a.e_pos, a.E, a.n, out_f, row_of, ntc, nullptr, nullptr, ce->ec);
    const int64_t bo = be >= 0 ? -1 : csr_by_row(a.o_pos, a.O, a.n, out_f, row_of, ntc, a.o_mu, a.o_rho, ce->oc);
    if (be >= 0 || bo >= 0)
      fail(std::string(be >= 0 ? "e_pos[" : "o_pos[") + std::to_string(be >= 0 ? be : bo) + "] = " +
           std::to_string(be >= 0 ? a.e_pos[be] : a.o_pos[bo]) + " is out of range [0, " + std::to_string(a.n) + ")");
    if (a.E + a.O <= kCsrCacheMaxEntries) {
      ce->e_pos.assign(a.e_pos, a.e_pos + a.E);
      ce->o_pos.assign(a.o_pos, a.o_pos + a.O);
      ce->o_mu.assign(a.o_mu, a.o_mu + a.O);
      ce->o_rho.assign(a.o_rho, a.o_rho + a.O);
      std::copy(ckey, ckey + 4, ce->key);
      ce->E = a.E, ce->O = a.O, ce->n = a.n, ce->out_f = out_f;
    }
  }
  const std::vector<int64_t>&eoff = ce->ec.off, &ooff = ce->oc.off;
  const Slot *es = ce->ec.slot, *os = ce->oc.slot;

  const int copies = K <= 1024 ? 4 : 2;
  const int64_t nb = (out_f + kRows - 1) / kRows;
  int bad = 0;
  int64_t dup = -1;
  // 1-byte labels with K >= 256 cannot be out of range: no range pass over them
  // (int8 / int16 labels in the gather: checked inside its loop, see Lab8::bad)
  // histograms or gathers (M passes over the labels), products, and the outliers' S * O normals (one Philox call
  // each: outliers rarely share a counter)
  const double per_weight_ns =
      gather ? 0.25 * static_cast<double>(V)
             : 0.35 + 0.25 * static_cast<double>(K * Sp) / static_cast<double>(in_f) / 16.0;
  const int nt = parallel_threads(per_weight_ns * static_cast<double>(M * out_f * in_f) +
                                  (mean ? 20.0 : 1.5 * static_cast<double>(SZ) + 20.0) * static_cast<double>(a.E + a.O));
  dispatch_labels(fn, a.labels_dtype, a.labels, [&](auto lab) {
#pragma omp parallel reduction(| : bad) num_threads(nt) if (nt > 1)
    {
      std::vector<float> bins(gather ? 0 : static_cast<size_t>(copies * K));
      std::vector<float> h(gather ? 0 : static_cast<size_t>(kRows * K), 0.0f);  // rows >= nr: computed, never stored
      // acc[(r * M + m) * Sp + s]: the block's results (gather: every (row, x row); histogram: one x row at a time)
      std::vector<float> acc_buf(static_cast<size_t>(kRows * (gather ? M : 1) * Sp + 16), 0.0f);
      float* const acc = acc_buf.data() + ((64 - reinterpret_cast<uintptr_t>(acc_buf.data()) % 64) % 64) / sizeof(float);
      std::vector<int64_t> stamp(static_cast<size_t>(in_f), -1);  // stamp[col] = j: row j has an entry at col
      // the block's outliers (CSR slots tb ..): positions, mu, softplus(rho), normals eps[q * SZ + s]
      std::vector<int64_t> bpos;
      std::vector<float> beps, bmu, bsd;
#pragma omp for schedule(static)
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t j0 = b * kRows, nr = std::min<int64_t>(kRows, out_f - j0);
        const auto* lb = lab + j0 * in_f;
        using Lt = std::remove_cv_t<std::remove_pointer_t<decltype(lb)>>;
        const bool in_loop = gather && in_loop_check<Lt>(K);
        const bool check_first = !(std::is_same_v<Lt, uint8_t> && K >= 256) && !in_loop;
        if (check_first && !labels_in_range(lb, 0, nr * in_f, K)) {
          bad = 1;
          continue;
        }
        // Unique ellipse/outlier columns per row (a duplicate would be taken back out twice).
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t j = j0 + r;
          for (int pass = 0; pass < 2; ++pass) {
            const Slot* ps = pass ? os : es;
            for (int64_t t = (pass ? ooff : eoff)[j]; t < (pass ? ooff : eoff)[j + 1]; ++t) {
              int64_t& st = stamp[static_cast<size_t>(ps[t].pos - j * in_f)];
              if (st == j) {
#pragma omp critical(sws_hist_dup)
                dup = ps[t].pos;
              }
              st = j;
            }
          }
        }
        // The block's outliers: w_o[s] = mu + softplus(rho) eps[s, p] (the reconstruct's bits; mean mode: mu), the
        // normals generated here, where they are used (an O x S buffer's page faults and traffic cost more).
        const int64_t tb = ooff[static_cast<size_t>(j0)], nob = ooff[static_cast<size_t>(j0 + nr)] - tb;
        if (nob > 0) {
          if (static_cast<int64_t>(bsd.size()) < nob)
            bsd.resize(static_cast<size_t>(nob)), bmu.resize(static_cast<size_t>(nob)), bpos.resize(static_cast<size_t>(nob));
          if (static_cast<int64_t>(beps.size()) < nob * SZ) beps.resize(static_cast<size_t>(nob * SZ));
          for (int64_t q = 0; q < nob; ++q) {
            const Slot& sl = os[tb + q];
            bpos[q] = sl.pos;
            bmu[q] = sl.w.mu;
            bsd[q] = sl.w.rho;
          }
          if (mean) {
            std::fill(bsd.begin(), bsd.begin() + nob, 0.0f);  // w = mu + 0 * eps
            std::fill(beps.begin(), beps.begin() + nob, 0.0f);
          } else {
            normals_at_fill(key, bpos.data(), nob, S, owner, kPurposeWeight, beps.data());
            softplus_fill(bsd.data(), bsd.data(), nob);
          }
        }
        for (int64_t m = 0; m < (gather ? 1 : M); ++m) {
          const float* xm = x + m * in_f;
          if (gather) {
#if SWS_HIST_X86
            // Stage 1 (gather): acc rows of every x row (4 rows at once), then the ellipse/outlier corrections.
            bool ok = true;
            if (nr == kRows) {
              ok = (V == 1 ? gather_rows<kRows, 1, Lt> : V == 2 ? gather_rows<kRows, 2, Lt>
                    : V == 3 ? gather_rows<kRows, 3, Lt> : gather_rows<kRows, 4, Lt>)(lb, in_f, x, M, zt_p, acc,
                                                                                      in_loop, K);
            } else {
              for (int64_t r = 0; r < nr && ok; ++r)
                ok = (V == 1 ? gather_rows<1, 1, Lt> : V == 2 ? gather_rows<1, 2, Lt>
                      : V == 3 ? gather_rows<1, 3, Lt> : gather_rows<1, 4, Lt>)(lb + r * in_f, in_f, x, M, zt_p,
                                                                                acc + r * M * Sp, in_loop, K);
            }
            if (!ok) {  // a label out of range: nothing of this block is used (the call throws)
              bad = 1;
              break;
            }
            for (int64_t r = 0; r < nr; ++r) {
              const int64_t j = j0 + r;
              (V == 1 ? correct_row<1, Lt> : V == 2 ? correct_row<2, Lt> : V == 3 ? correct_row<3, Lt>
               : correct_row<4, Lt>)(
                  acc + r * M * Sp, M, x, in_f, lb + r * in_f, j * in_f, zt_p, SZ, eoff[j], eoff[j + 1], es,
                  a.e_a, a.e_b, a.e_alpha, ooff[j], ooff[j + 1], bpos.data(), bmu.data(), bsd.data(),
                  beps.data(), tb);
            }
#endif
          } else {
            // Stages 1-2 (histogram): the histograms of the nr rows, ellipse/outlier positions taken back out.
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
              for (int64_t t = eoff[j]; t < eoff[j + 1]; ++t) {
                const int64_t e = es[t].entry, col = es[t].pos - j * in_f;
                const float xv = xm[col];
                hr[static_cast<int64_t>(lr[col])] -= xv;
                const float al = a.e_alpha[e];
                hr[a.e_a[e]] += al * xv;
                hr[a.e_b[e]] += (1.0f - al) * xv;
              }
              for (int64_t t = ooff[j]; t < ooff[j + 1]; ++t) {
                const int64_t col = bpos[t - tb] - j * in_f;
                hr[static_cast<int64_t>(lr[col])] -= xm[col];
              }
            }
            // Stage 3: the [nr, K] x [K, S] product.
#if SWS_HIST_X86
            if (avx2) product_avx2(h.data(), K, zt_p, Sp, acc);
            else product_scalar(h.data(), K, zt_p, Sp, acc);
#else
            product_scalar(h.data(), K, zt_p, Sp, acc);
#endif
            // Stage 4: the outliers, in entry order.
            for (int64_t r = 0; r < nr; ++r) {
              const int64_t j = j0 + r;
              float* ar = acc + r * Sp;
              for (int64_t t = ooff[j]; t < ooff[j + 1]; ++t) {
                const int64_t q = t - tb;
                const float xv = xm[bpos[q] - j * in_f], mu = bmu[q], sd = bsd[q];
                const float* eps = beps.data() + q * SZ;
                for (int64_t s = 0; s < SZ; ++s) ar[s] += xv * (mu + sd * eps[s]);
              }
            }
          }
          // bias, store
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t j = j0 + r;
            for (int64_t mm = gather ? 0 : m; mm < (gather ? M : m + 1); ++mm) {
              const float* ar = acc + (gather ? (r * M + mm) * Sp : r * Sp);
              for (int64_t s = 0; s < S; ++s) {
                const float v = ar[mean ? 0 : s];
                const float* bs = bias ? bias + (l.bias_per_sample ? s * out_f : 0) : nullptr;
                y[(s * M + mm) * out_f + j] = bs ? v + bs[j] : v;
              }
            }
          }
        }
      }
    }
  });
  if (bad) fail("a label is outside [0, K) with K = " + std::to_string(K));
  if (dup >= 0) fail("position " + std::to_string(dup) + " appears twice among the ellipse/outlier positions");
}

}  // namespace sws

#pragma GCC diagnostic pop
