// Raw Philox words and uniform/normal streams on the CPU: the test surface of the RNG contract (the fused
// kernels call the same inline functions from philox.h, so checking these checks theirs).
#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "../common.h"
#include "parallel.h"
#include "vecmath.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sws {

int omp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void omp_set_threads(int n) {
  if (n < 1) throw std::invalid_argument("set_num_threads: n must be >= 1, got " + std::to_string(n));
#ifdef _OPENMP
  omp_set_num_threads(n);
#endif
}

namespace {
int64_t grain_ns() {
  static const int64_t g = [] {
    const char* e = std::getenv("SWS_CPU_GRAIN_US");
    if (e == nullptr || *e == '\0') return kParallelGrainNs;
    char* end = nullptr;
    const double us = std::strtod(e, &end);
    return (end != e && us >= 0) ? static_cast<int64_t>(us * 1000.0) : kParallelGrainNs;
  }();
  return g;
}
}  // namespace

int parallel_threads(double work_ns) {
#ifdef _OPENMP
  const int64_t g = grain_ns();
  const int max_t = omp_get_max_threads();  // the calling thread's nthreads-var: torch.get_num_threads()
  if (max_t <= 1 || work_ns < static_cast<double>(g)) return 1;
  if (g == 0) return max_t;
  const double per = work_ns / static_cast<double>(g);  // grains of work: at least one per thread
  return per >= max_t ? max_t : std::max(1, static_cast<int>(per));
#else
  (void)work_ns;
  return 1;
#endif
}

void philox4x32_cpu(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n) {
  if (n < 0) throw std::invalid_argument("philox4x32: n must be >= 0, got " + std::to_string(n));
  const int nt = parallel_threads(kNsPhilox * static_cast<double>(n));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* c = counter + 4 * i;
    const int64_t* k = key + 2 * i;
    // int64 arrays carry uint32 words: the low 32 bits are the word.
    const Words4 w = philox4x32_10(static_cast<uint32_t>(c[0]), static_cast<uint32_t>(c[1]), static_cast<uint32_t>(c[2]),
                                   static_cast<uint32_t>(c[3]), static_cast<uint32_t>(k[0]), static_cast<uint32_t>(k[1]));
    for (int t = 0; t < 4; ++t) out[4 * i + t] = static_cast<int64_t>(w.w[t]);
  }
}

namespace {

void check_stream(const char* fn, int64_t n, uint64_t offset, int64_t sample, int64_t owner, int64_t purpose) {
  auto fail = [&](const std::string& what) { throw std::invalid_argument(std::string(fn) + ": " + what); };
  if (n < 0) fail("n must be >= 0, got " + std::to_string(n));
  if (offset > kMaxElement || static_cast<uint64_t>(n) > kMaxElement - offset)
    fail("offset + n = " + std::to_string(offset) + " + " + std::to_string(n) + " exceeds the per-stream limit of 2^34 elements");
  if (sample < 0 || sample > 0xffffffffll) fail("sample must be in [0, 2^32), got " + std::to_string(sample));
  if (owner < 0 || owner > 0xffffffffll) fail("owner must be in [0, 2^32), got " + std::to_string(owner));
  if (purpose < 0 || purpose > 0xffffffffll) fail("purpose must be in [0, 2^32), got " + std::to_string(purpose));
}

template <bool kNormal>
void stream_cpu(const char* fn, float* out, int64_t n, uint64_t offset, uint64_t seed, int64_t sample, int64_t owner,
                int64_t purpose) {
  check_stream(fn, n, offset, sample, owner, purpose);
  if (n == 0) return;
  const Key key = seed_key(seed);
  const uint64_t end = offset + static_cast<uint64_t>(n);
  const uint64_t j0 = offset >> 2, j1 = (end + 3) >> 2;
  const int64_t nj = static_cast<int64_t>(j1 - j0);
  if (kNormal) {
    // Bulk normals (AVX2 when available, vecmath.cpp) in blocks of kJ counters staged on the stack, then
    // the window [offset, end) copied out: same values as the fused kernels draw for these elements.
    constexpr int64_t kJ = 512;
    const int64_t nblk = (nj + kJ - 1) / kJ;
    const int nt = parallel_threads(kNsNormal * 4.0 * static_cast<double>(nj));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t b = 0; b < nblk; ++b) {
      alignas(64) float v[4 * kJ];
      const uint64_t jb = j0 + static_cast<uint64_t>(b * kJ);
      const int64_t cnt = std::min<int64_t>(kJ, nj - b * kJ);
      normals_fill(key, jb, cnt, static_cast<uint32_t>(sample), static_cast<uint32_t>(owner),
                   static_cast<uint32_t>(purpose), v);
      const uint64_t lo = std::max<uint64_t>(4 * jb, offset), hi = std::min<uint64_t>(4 * (jb + cnt), end);
      for (uint64_t i = lo; i < hi; ++i) out[i - offset] = v[i - 4 * jb];
    }
    return;
  }
  const int nt = parallel_threads(kNsPhilox * static_cast<double>(nj));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t jj = 0; jj < nj; ++jj) {
    const uint64_t j = j0 + static_cast<uint64_t>(jj);
    const Words4 w = stream_words(key, static_cast<uint32_t>(j), static_cast<uint32_t>(sample),
                                  static_cast<uint32_t>(owner), static_cast<uint32_t>(purpose));
    float v[4];
    if (kNormal) {
      words_to_normal4(w, v);
    } else {
      for (int t = 0; t < 4; ++t) v[t] = word_to_uniform(w.w[t]);
    }
    for (int t = 0; t < 4; ++t) {
      const uint64_t i = 4 * j + t;
      if (i >= offset && i < end) out[i - offset] = v[t];
    }
  }
}

}  // namespace

void uniform_cpu(float* out, int64_t n, uint64_t offset, uint64_t seed, int64_t sample, int64_t owner, int64_t purpose) {
  stream_cpu<false>("uniform", out, n, offset, seed, sample, owner, purpose);
}

void normal_cpu(float* out, int64_t n, uint64_t offset, uint64_t seed, int64_t sample, int64_t owner, int64_t purpose) {
  stream_cpu<true>("normal", out, n, offset, seed, sample, owner, purpose);
}

}  // namespace sws
